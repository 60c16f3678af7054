"""Fine-tune ONE-PEACE for image or audio classification with LoRA (PEFT), on one CPU or many GPUs.

LoRA adapts the shared attention and the FFN of the chosen modality only (`onepeace_hf.lora_config_for`): with
`--modality audio` the image and text FFN weights are not touched. The new classification head is trained in full
and saved with the adapter.

    accelerate launch examples/lora_classification.py --model path/to/converted --modality audio \
        --dataset my/sounds --input_column audio --eval_split validation --output_dir runs/lora \
        --num_epochs 10 --per_device_batch_size 32 --learning_rate 1e-3 --lora_r 8 --weight_decay 0.0

`--synthetic 512` trains on a generated set instead (offline try). The accuracy on the evaluation split before and
after training goes to `output_dir/eval_results.json`; the adapter, the head, the label names and the processor to
`output_dir/final`. Load it onto the base it was trained on (or `base_model="path/to/converted"`) with

    model = onepeace_hf.load_lora_classifier("runs/lora/final")   # .merge_and_unload() for a plain model
"""

from dataclasses import dataclass, field
from pathlib import Path

import onepeace_hf  # noqa: F401  (registers ONE-PEACE with the Auto classes)
import torch
from accelerate import PartialState
from peft import get_peft_model
from transformers import AutoProcessor, HfArgumentParser, set_seed

from onepeace_hf import lora_config_for
from onepeace_hf.training import TrainingArguments
from onepeace_hf.training.classification import (
    ClassificationDataArguments,
    finetune_classification,
    label_names,
    load_classification_model,
    load_classification_splits,
)
from onepeace_hf.training.recipes import load_before_the_model, parse_script_arguments


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling: the update is multiplied by alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    lora_attention: bool = field(default=True, metadata={"help": "adapt the shared attention (all modalities)"})
    lora_ffn: bool = field(default=True, metadata={"help": "adapt the FFNs of --lora_modalities"})
    lora_modalities: list[str] | None = field(default=None, metadata={"help": "FFNs to adapt (none: --modality's)"})


def main():
    parser = HfArgumentParser((ClassificationDataArguments, LoraArguments, TrainingArguments))
    parser.add_argument("--model", required=True, help="converted ONE-PEACE folder (or Hub id)")
    data, lora, args, extra = parse_script_arguments(parser)
    train_set, eval_set = load_before_the_model(parser, lambda: load_classification_splits(data, seed=args.seed))
    set_seed(args.seed)  # the new head (and LoRA weights): the same on every process, reproducible
    # The adapter records the base's path: make a local one absolute, so that the adapter reloads from anywhere.
    # float32: the LoRA weights are created in the base's dtype, and bf16 (a bf16 folder) loses small updates.
    base = str(Path(extra.model).resolve()) if Path(extra.model).exists() else extra.model
    labels = label_names(train_set, data.label_column)
    model = load_classification_model(base, data.modality, labels, dtype=torch.float32)
    config = lora_config_for(
        model, modalities=lora.lora_modalities or (data.modality,), attention=lora.lora_attention, ffn=lora.lora_ffn,
        r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    processor = AutoProcessor.from_pretrained(extra.model)
    result = finetune_classification(model, processor, data, args, train_set=train_set, eval_set=eval_set)
    if PartialState().is_main_process:  # the evaluation results (eval_results.json), not the last training batch's
        print({k: result[k] for k in ("accuracy_before", "accuracy_after") if k in result})


if __name__ == "__main__":
    main()
