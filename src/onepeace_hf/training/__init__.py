"""Training ONE-PEACE on Accelerate: objectives, optimizer/schedule of the original recipes, the loop."""

from .objectives import TrainingObjective, freeze_for_audio_language_stage
from .optimization import cosine_schedule_with_warmup, create_optimizer, layer_id, parameter_groups
from .trainer import (
    TrainingArguments,
    TrainingProgress,
    create_accelerator,
    enable_activation_checkpointing,
    save_final_model,
    train,
)


__all__ = [
    "TrainingArguments",
    "TrainingObjective",
    "TrainingProgress",
    "cosine_schedule_with_warmup",
    "create_accelerator",
    "create_optimizer",
    "enable_activation_checkpointing",
    "freeze_for_audio_language_stage",
    "layer_id",
    "parameter_groups",
    "save_final_model",
    "train",
]
