"""LoRA (PEFT) for ONE-PEACE: adapt the shared attention and chosen modality FFNs, leave the other branches alone.

Every fusion layer has one attention shared by all modalities and one GeGLU FFN per modality
(`encoder.layers.N.ffn.{text,image,audio}.{gate_proj,up_proj,down_proj}`). Targeting only the audio FFN (plus the
attention) adapts audio while the text and image FFN weights stay exactly as they were; with `attention=False`
the text and image outputs stay bit-identical too, since then nothing they pass through changes.

    config = lora_config_for(model, modalities=("audio",), r=8)   # a peft.LoraConfig
    model = peft.get_peft_model(model, config)

A PEFT adapter folder holds no model config, so a LoRA classifier's label names would be lost with it:
`save_classifier_labels` writes them next to the adapter and `load_lora_classifier` puts base, labels and adapter
back together (`lora_classifier_kwargs` gives them to PEFT's `AutoPeftModel`); `write_adapter_card` replaces PEFT's
blank README template with a card that says how.
"""

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from transformers.utils import cached_file

from .configuration_onepeace import OnePeaceConfig
from .fused_projections import FUSIONS
from .model_card import is_hub_model_id
from .modeling_onepeace_tasks import (
    OnePeaceForAudioClassification,
    OnePeaceForAudioLanguageClassification,
    OnePeaceForImageClassification,
    OnePeaceForVisionLanguageClassification,
)


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Task heads that start from scratch: trained and saved in full next to the adapter (PEFT's `modules_to_save`).
HEAD_MODULES = ("classification_head",)
# The classifier's class and label fields, saved next to an adapter (a `config.json` there would make transformers
# take the folder for a full model).
CLASSIFIER_LABELS_NAME = "classifier_labels.json"
CLASSIFIERS = {
    model_class.__name__: model_class
    for model_class in (
        OnePeaceForAudioClassification,
        OnePeaceForAudioLanguageClassification,
        OnePeaceForImageClassification,
        OnePeaceForVisionLanguageClassification,
    )
}


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


def save_classifier_labels(model: nn.Module, folder: str | Path) -> None:
    """Write the classifier's class, `id2label`, `label2id`, `problem_type` and head settings (`classifier_*`:
    pooling, pooler, MLP width...) into an adapter folder: the head's saved weights only fit a head built alike."""
    classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = classifier.config
    fields = {
        "architectures": [type(classifier).__name__],
        "id2label": {str(i): name for i, name in config.id2label.items()},
        "label2id": dict(config.label2id),
        "problem_type": config.problem_type,
        "head": {key: value for key, value in config.to_dict().items() if key.startswith("classifier_")},
    }
    (Path(folder) / CLASSIFIER_LABELS_NAME).write_text(json.dumps(fields, indent=2) + "\n")


_PIPELINE_TAGS = {
    "OnePeaceForAudioClassification": "audio-classification",
    "OnePeaceForImageClassification": "image-classification",
}
_LISTED_LABELS = 20


def write_adapter_card(model: nn.Module, folder: str | Path) -> None:
    """Write the adapter folder's README.md: what it adapts, its labels and how to load it.

    PEFT's own card is a template of "[More Information Needed]"; its metadata is kept, except a `base_model` that
    is a local path (the Hub refuses a card whose base_model is not a model id; the text names the path instead).
    The licence is the base's, when the base folder has a card that gives one.
    """
    folder = Path(folder)
    classifier = model.get_base_model()
    peft_config = model.peft_config[model.active_adapter]
    base = str(peft_config.base_model_name_or_path or "")
    card_path = folder / "README.md"
    data = ModelCard.load(card_path).data if card_path.exists() else ModelCardData()
    data.library_name = "peft"
    data.base_model = base if is_hub_model_id(base) else None
    tags = {tag for tag in data.tags or [] if data.base_model or not tag.startswith("base_model:")}  # PEFT's
    data.tags = sorted(tags | {"onepeace", "lora"})
    data.pipeline_tag = _PIPELINE_TAGS.get(type(classifier).__name__, data.pipeline_tag)
    base_card = Path(base, "README.md")
    if data.license is None and base_card.is_file():
        data.license = ModelCard.load(base_card).data.license

    labels = list(classifier.config.id2label.values())
    shown = ", ".join(f"`{label}`" for label in labels[:_LISTED_LABELS])
    if len(labels) > _LISTED_LABELS:
        shown += f" and {len(labels) - _LISTED_LABELS} more (`{CLASSIFIER_LABELS_NAME}`)"
    targets = peft_config.target_modules
    targets = targets if isinstance(targets, str) else ", ".join(sorted(targets))
    trained = ", ".join(peft_config.modules_to_save or []) or "none"
    base_text = f"[{base}](https://huggingface.co/{base})" if data.base_model else f"the local model `{base}`"
    text = f"""
# {type(classifier).__name__}: a LoRA adapter for ONE-PEACE

A LoRA adapter ([PEFT](https://github.com/huggingface/peft)) on {base_text}, made with
onepeace-hf: {len(labels)} classes ({classifier.config.problem_type or "single_label_classification"}): {shown}.

- LoRA rank {peft_config.r}, alpha {peft_config.lora_alpha}, on the modules matching `{targets}`.
- Trained in full and saved with the adapter: {trained}.

## Use

```python
import onepeace_hf

model = onepeace_hf.load_lora_classifier("path/to/this/adapter")  # base_model="..." if the base has moved
model = model.merge_and_unload()  # optional: a plain {type(classifier).__name__}, no PEFT at run time
```

`load_lora_classifier` loads the base recorded in `adapter_config.json` with this adapter's label names
(`{CLASSIFIER_LABELS_NAME}`), then the adapter. PEFT's `AutoPeftModel` works too, given the same fields (an adapter
folder holds no model config) and leave to import the classifier class:

```python
from peft import AutoPeftModel

kwargs = onepeace_hf.lora_classifier_kwargs("path/to/this/adapter")
model = AutoPeftModel.from_pretrained("path/to/this/adapter", import_allowlist=["onepeace_hf"], **kwargs)
```
"""
    if any((folder / name).exists() for name in ("processor_config.json", "preprocessor_config.json")):
        text += "The processor is saved here too: `AutoProcessor.from_pretrained(\"path/to/this/adapter\")`.\n"
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(card_path)


def _classifier_fields(adapter: str | Path) -> dict:
    labels_file = cached_file(str(adapter), CLASSIFIER_LABELS_NAME, _raise_exceptions_for_missing_entries=False)
    if labels_file is None:
        raise FileNotFoundError(
            f"{adapter} has no {CLASSIFIER_LABELS_NAME} (save_classifier_labels writes it; the LoRA example does). "
            "Load the base classifier with its num_labels/id2label yourself, then peft.PeftModel.from_pretrained."
        )
    fields = json.loads(Path(labels_file).read_text())
    name = fields["architectures"][0]
    if name not in CLASSIFIERS:
        raise ValueError(f"{CLASSIFIER_LABELS_NAME} names {name!r}; ONE-PEACE classifiers are {sorted(CLASSIFIERS)}.")
    return fields


def lora_classifier_kwargs(adapter: str | Path) -> dict:
    """What the base classifier's `from_pretrained` needs to take the adapter's head, read from the adapter folder
    (`save_classifier_labels`): `num_labels`, `id2label`, `label2id`, `problem_type`, the `classifier_*` head settings,
    and `dtype=torch.float32` (see [`load_lora_classifier`]). For PEFT's own loader, which cannot know them:

        AutoPeftModel.from_pretrained(adapter, import_allowlist=["onepeace_hf"], **lora_classifier_kwargs(adapter))
    """
    fields = _classifier_fields(adapter)
    id2label = {int(i): label for i, label in fields["id2label"].items()}
    return {
        "num_labels": len(id2label), "id2label": id2label, "label2id": fields["label2id"],
        "problem_type": fields["problem_type"], "dtype": torch.float32, **fields.get("head", {}),
    }


def load_lora_classifier(adapter: str | Path, base_model: str | Path | None = None, **kwargs):
    """A `peft.PeftModel`: the base classifier with the labels from `save_classifier_labels`, and the adapter.

    base_model: the converted base (default: the `base_model_name_or_path` the adapter was trained on).
    kwargs: go to the base's `from_pretrained` (e.g. `attn_implementation`, `revision` of the base). `dtype` is
    float32 unless given, whatever the base stores: the adapter was trained on float32 weights, and a bf16 base
    shifts its outputs and rounds away part of the update in `merge_and_unload`.
    """
    from peft import PeftConfig, PeftModel  # noqa: PLC0415 (optional dependency: the `train` extra)

    classifier = CLASSIFIERS[_classifier_fields(adapter)["architectures"][0]]
    recorded = base_model is None
    if recorded:
        base_model = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
        if not is_hub_model_id(base_model) and not Path(base_model).exists():  # a local path, and not there
            raise FileNotFoundError(
                f"The adapter's base model {base_model} (adapter_config.json) is not there: pass base_model=."
            )
    try:
        base = classifier.from_pretrained(base_model, **{**lora_classifier_kwargs(adapter), **kwargs})
    except OSError as error:
        if not recorded:
            raise
        # A folder name recorded relative to where the adapter was trained reads as a Hub id from anywhere else.
        raise OSError(f"{error}\nThe adapter's base model {base_model!r} (adapter_config.json) could not be loaded; "
                      "if it is a local folder, pass its path as base_model=.") from error
    return PeftModel.from_pretrained(base, str(adapter))


__all__ = [
    "load_lora_classifier",
    "lora_classifier_kwargs",
    "lora_config_for",
    "lora_target_modules",
    "lora_target_names",
    "save_classifier_labels",
    "write_adapter_card",
]
