"""LoRA (PEFT) for ONE-PEACE: adapt the shared attention and chosen modality FFNs, leave the other branches alone.

Every fusion layer has one attention shared by all modalities and one GeGLU FFN per modality
(`encoder.layers.N.ffn.{text,image,audio}.{gate_proj,up_proj,down_proj}`). Targeting only the audio FFN (plus the
attention) adapts audio while the text and image FFN weights stay exactly as they were; with `attention=False`
the text and image outputs stay bit-identical too, since then nothing they pass through changes.

    config = lora_config_for(model, modalities=("audio",), r=8)   # a peft.LoraConfig
    model = peft.get_peft_model(model, config)
"""

import re
from collections.abc import Iterable

from torch import nn

from .configuration_onepeace import OnePeaceConfig
from .fused_projections import FUSIONS


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Task heads that start from scratch: trained and saved in full next to the adapter (PEFT's `modules_to_save`).
HEAD_MODULES = ("classification_head",)


def _modalities(config: OnePeaceConfig, modalities: str | Iterable[str]) -> tuple[str, ...]:
    modalities = (modalities,) if isinstance(modalities, str) else tuple(modalities)
    unknown = [m for m in modalities if m not in config.modalities]
    if unknown:
        raise ValueError(f"Unknown modality {unknown}: this model's modality FFNs are {tuple(config.modalities)}.")
    return tuple(dict.fromkeys(modalities))


def lora_target_modules(
    config: OnePeaceConfig,
    modalities: str | Iterable[str] = ("audio",),
    attention: bool = True,
    ffn: bool = True,
) -> str:
    """A regex for `peft.LoraConfig(target_modules=...)` (PEFT full-matches it against module names).

    attention: the shared Q/K/V/out projections of every fusion layer (they serve every modality).
    ffn: the gate/up/down projections of the FFNs of `modalities` only; the other modalities' FFNs are not matched.
    The decoder of a pretraining model (`decoder.layers...`) is never matched.
    """
    modalities = _modalities(config, modalities)
    alternatives = []
    if attention:
        alternatives.append(rf"self_attn\.(?:{'|'.join(ATTENTION_PROJECTIONS)})")
    if ffn and modalities:
        alternatives.append(rf"ffn\.(?:{'|'.join(modalities)})\.(?:{'|'.join(FFN_PROJECTIONS)})")
    if not alternatives:
        raise ValueError("Nothing to adapt: give attention=True, or ffn=True with at least one modality.")
    return rf"(?:.*\.)?encoder\.layers\.\d+\.(?:{'|'.join(alternatives)})"


def lora_config_for(
    model: nn.Module,
    modalities: str | Iterable[str] | None = None,
    attention: bool = True,
    ffn: bool = True,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
    **kwargs,
):
    """A `peft.LoraConfig` for `model` with `target_modules` from [`lora_target_modules`] filled in.

    modalities: whose FFNs to adapt; default the branches the model reads (`("audio",)` for
        `OnePeaceForAudioClassification`).
    modules_to_save: default the task head (`classification_head`) when the model has one, since a new head has
        to be trained in full and saved with the adapter.
    kwargs: any other `LoraConfig` field (e.g. `use_rslora`, `init_lora_weights`).
    """
    from peft import LoraConfig  # noqa: PLC0415 (optional dependency: the `train` extra)

    fused = sorted({name for m in model.modules() for name in FUSIONS if isinstance(getattr(m, name, None), nn.Module)})
    if fused:
        raise ValueError(
            f"The model's projections are fused ({', '.join(fused)}); LoRA targets the separate projections: call "
            "model.unfuse_projections() first."
        )
    if modalities is None:
        read = getattr(model, "input_modalities", model.config.modalities)
        modalities = [m for m in read if m in model.config.modalities]
    if modules_to_save is None:
        modules_to_save = [name for name in HEAD_MODULES if isinstance(getattr(model, name, None), nn.Module)] or None
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(model.config, modalities, attention, ffn),
        modules_to_save=modules_to_save,
        **kwargs,
    )


def lora_target_names(model: nn.Module, target_modules: str) -> list[str]:
    """The module names of `model` that a `target_modules` regex selects (to check a config before training)."""
    pattern = re.compile(target_modules)
    return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]


__all__ = ["lora_config_for", "lora_target_modules", "lora_target_names"]
