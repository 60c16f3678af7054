"""The image / audio classification recipe behind `examples/finetune_classification.py` (full fine-tuning, layer-wise
LR decay) and `examples/lora_classification.py` (LoRA): data, collation, criterion and an `evaluate` accuracy.

Both scripts run the same `finetune_classification`; they differ only in the model they hand it (a plain
`OnePeaceFor{Image,Audio}Classification` or a `peft` model wrapping one).
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

from ..modeling_onepeace_tasks import OnePeaceForAudioClassification, OnePeaceForImageClassification
from ..peft_utils import save_classifier_labels, write_adapter_card
from .data import as_image, audio_inputs
from .recipes import DataArguments, load_pairs
from .trainer import TrainingArguments, create_accelerator, train


logger = logging.getLogger(__name__)

CLASSIFICATION_MODELS = {"image": OnePeaceForImageClassification, "audio": OnePeaceForAudioClassification}
ACCURACY_MODULE = Path(__file__).resolve().parents[1] / "metrics" / "accuracy" / "accuracy.py"


@dataclass
class ClassificationDataArguments:
    """Labelled images or audio clips: a `datasets` dataset (Hub name, local script/folder, or a `save_to_disk`
    DatasetDict folder) or a synthetic set (8 classes of coloured squares / tones, offline tries)."""

    modality: str = field(default="image", metadata={"help": "image or audio", "choices": ["image", "audio"]})
    dataset: str | None = field(default=None, metadata={"help": "datasets name/path, or a save_to_disk folder"})
    dataset_config: str | None = field(default=None, metadata={"help": "the dataset's configuration name"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: str | None = field(default=None, metadata={"help": "accuracy is measured on it before and after"})
    input_column: str | None = field(
        default=None, metadata={"help": "image / audio column; when not given, the column named after --modality"}
    )
    label_column: str = field(default="label", metadata={"help": "class column: ClassLabel, integers or strings"})
    synthetic: int = field(default=0, metadata={"help": "use N synthetic examples instead of --dataset"})
    synthetic_eval: int = field(default=64, metadata={"help": "synthetic evaluation examples"})
    digits_root: str | None = field(
        default=None, metadata={"help": "the spoken/printed digits set folder (data/digits) instead of --dataset"}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N examples only"})

    def __post_init__(self):
        if self.modality not in CLASSIFICATION_MODELS:
            raise ValueError(f"modality must be one of {tuple(CLASSIFICATION_MODELS)}, got {self.modality!r}.")
        if sum((self.dataset is not None, self.synthetic != 0, self.digits_root is not None)) != 1:
            raise ValueError("Give exactly one of --dataset, --synthetic N and --digits_root.")
        if self.digits_root is not None:
            from .digits import check_digits_root  # noqa: PLC0415

            check_digits_root(self.digits_root, self.train_split, self.eval_split)
        if self.synthetic or self.digits_root:  # generated sets have fixed column names
            self.input_column, self.label_column = self.modality, "label"
        if self.synthetic and self.synthetic_eval:
            self.eval_split = self.eval_split or "validation"
        self.input_column = self.input_column or self.modality


def load_classification_split(
    data: ClassificationDataArguments, split: str, seed: int = 0, class_names: list[str] | None = None
) -> datasets.Dataset:
    """One split as a `datasets.Dataset` (the same loading rules as the retrieval and pretraining recipes).

    Text labels (CSV/JSON files) become a `ClassLabel` column: sorted, or `class_names` (the training split's, so
    that every split numbers the classes alike).
    """
    pairs = DataArguments(
        dataset=data.dataset, dataset_config=data.dataset_config, train_split=data.train_split,
        eval_split=data.eval_split, synthetic=data.synthetic, synthetic_eval=data.synthetic_eval,
        digits_root=data.digits_root, **{f"{data.modality}_column": data.input_column},
    )
    dataset = load_pairs(pairs, split, synthetic_seed=seed, columns=[data.input_column, data.label_column])
    if split != data.train_split and data.max_eval_samples:
        dataset = dataset.select(range(min(data.max_eval_samples, len(dataset))))
    dataset = encode_text_labels(dataset, data.label_column, class_names)
    check_labels_are_classes(dataset, data.label_column, split)
    if class_names is not None:
        check_labels_fit(dataset, data.label_column, class_names, split)
    return dataset


def check_labels_are_classes(dataset: datasets.Dataset, label_column: str, split: str) -> None:
    """Refuse an empty split, and labels below 0: `datasets` marks unlabelled rows -1, which would fail training
    mid-run (an index error at whichever step draws one) or count as wrong in the accuracy."""
    if len(dataset) == 0:
        raise ValueError(f"The {split!r} split has no rows.")
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("uint"):
        return
    unlabelled = sum(1 for label in dataset[label_column] if label is None or label < 0)
    if unlabelled:
        raise ValueError(
            f"The {split!r} split has {unlabelled} rows without a label ({label_column!r} below 0 or empty, as "
            f"`datasets` marks unlabelled rows); drop them first, e.g. dataset.filter(lambda row: "
            f"row[{label_column!r}] >= 0)."
        )


def check_labels_fit(dataset: datasets.Dataset, label_column: str, class_names: list[str], split: str) -> None:
    """Refuse a split whose classes are not the training split's: scored against another numbering, it would
    report a meaningless accuracy."""
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        if list(feature.names) != list(class_names):
            raise ValueError(
                f"The {split!r} split's classes {feature.names[:10]} are not the training split's {class_names[:10]}."
            )
    elif len(dataset) and max(dataset[label_column]) >= len(class_names):
        raise ValueError(
            f"The {split!r} split has label {max(dataset[label_column])}; the training split has "
            f"{len(class_names)} classes."
        )


def encode_text_labels(dataset: datasets.Dataset, label_column: str, class_names: list[str] | None = None):
    """`dataset` with a text label column cast to `ClassLabel` (other columns unchanged)."""
    feature = dataset.features[label_column]
    if not isinstance(feature, datasets.Value) or feature.dtype not in ("string", "large_string"):
        return dataset
    found = set(dataset.unique(label_column))
    if None in found:
        raise ValueError(f"{label_column!r} has empty labels.")
    class_names = list(class_names) if class_names else sorted(found)
    unknown = sorted(found - set(class_names))
    if unknown:
        raise ValueError(f"{label_column!r} has labels that the training split lacks: {unknown[:10]}")
    return dataset.cast_column(label_column, datasets.ClassLabel(names=class_names))


def label_names(dataset: datasets.Dataset, label_column: str = "label") -> list[str]:
    """Class names from a `ClassLabel` column, or "0".."n-1" for plain integer labels."""
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif feature.dtype in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"):
        names = [str(i) for i in range(max(list(dataset[label_column])) + 1)]
    else:
        raise ValueError(
            f"Labels must be class indices; {label_column!r} holds {feature.dtype}. Encode it first, e.g. "
            f"dataset.class_encode_column({label_column!r})."
        )
    if len(names) < 2:  # one logit would make transformers treat the task as regression
        raise ValueError(f"{label_column!r} has a single class; a classifier needs at least two.")
    return names


def load_classification_model(name_or_path: str, modality: str, labels: list[str], **kwargs):
    """`OnePeaceFor{Image,Audio}Classification` with a head for `labels` (a new head when the folder has none)."""
    if modality not in CLASSIFICATION_MODELS:
        raise ValueError(f"modality must be one of {tuple(CLASSIFICATION_MODELS)}, got {modality!r}.")
    return CLASSIFICATION_MODELS[modality].from_pretrained(
        name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, **kwargs,
    )


@dataclass
class ClassificationCollator:
    """Rows of (image or audio, label) -> `pixel_values` or `input_values`/`padding_mask`, and `labels`."""

    processor: object
    modality: str = "image"
    input_column: str = "image"
    label_column: str = "label"

    def __post_init__(self):
        if self.modality not in CLASSIFICATION_MODELS:
            raise ValueError(f"modality must be one of {tuple(CLASSIFICATION_MODELS)}, got {self.modality!r}.")

    def __call__(self, rows: list[dict]) -> dict:
        labels = torch.tensor([row[self.label_column] for row in rows], dtype=torch.long)
        if self.modality == "image":
            images = [as_image(row[self.input_column]) for row in rows]
            return {**self.processor(images=images, return_tensors="pt"), "labels": labels}
        return {**audio_inputs(self.processor, [row[self.input_column] for row in rows]), "labels": labels}


def save_extras(model, processor, folder: str, modality: str) -> None:
    """The processor next to the weights; for an adapter (no config.json of its own) also the label names and a
    card that says how to load it.

    An adapter folder gets only the part the classifier reads (image processor or feature extractor): PEFT's
    `AutoPeftModel` takes a tokenizer there as a sign to resize the text embeddings, which an image or audio
    classifier does not have. A full model folder keeps the whole processor, which `AutoProcessor` expects next to
    a ONE-PEACE config.json.
    """
    if not hasattr(model, "peft_config"):
        processor.save_pretrained(folder)
        return
    part = {"image": "image_processor", "audio": "feature_extractor"}[modality]
    getattr(processor, part, processor).save_pretrained(folder)
    save_classifier_labels(model, folder)
    write_adapter_card(model, folder)


def classification_criterion(model, labels: torch.Tensor, **inputs) -> dict:
    """Criterion for `train`: the model's own loss (its `problem_type`), plus the batch accuracy for the log."""
    output = model(**inputs, labels=labels)
    result = {"loss": output.loss}
    if labels.dim() == 1 and not labels.is_floating_point():
        result["accuracy"] = (output.logits.argmax(-1) == labels.to(output.logits.device)).float().mean().detach()
    return result


def load_accuracy_metric(**kwargs):
    """Accuracy as an `evaluate` module from the package's own script: `evaluate.load("accuracy")` needs the Hub.

    In memory by default, so that several processes evaluating at once do not contend for one cache file."""
    import evaluate  # noqa: PLC0415 (optional dependency: the `train` extra)

    return evaluate.load(str(ACCURACY_MODULE), **{"keep_in_memory": True, **kwargs})


def accuracy_evaluator(collate_fn: ClassificationCollator, dataset, batch_size: int = 64):
    """evaluate_fn for `train`: accuracy over `dataset` with `evaluate`. Every process scores the whole (small)
    evaluation set, so every process logs the same number."""

    @torch.no_grad()
    def evaluate_fn(model) -> dict:
        metric = load_accuracy_metric()
        device = next(model.parameters()).device
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
            references = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            metric.add_batch(predictions=logits.argmax(-1).cpu(), references=references)
        return metric.compute()

    return evaluate_fn


def load_classification_splits(data: ClassificationDataArguments, seed: int) -> tuple:
    """(training split, evaluation split or None), both loaded, as the scripts do before loading the model."""
    train_set = load_classification_split(data, data.train_split, seed=seed)
    return train_set, load_classification_eval_split(data, train_set, seed)


def load_classification_eval_split(data: ClassificationDataArguments, train_set, seed: int):
    """The `--eval_split` with the training split's label names (the same class numbers), or None without one."""
    if not data.eval_split:
        return None
    names = label_names(train_set, data.label_column)
    return load_classification_split(data, data.eval_split, seed=seed, class_names=names)


def finetune_classification(
    model, processor, data: ClassificationDataArguments, args: TrainingArguments, train_set=None, eval_set=None
) -> dict:
    """Fine-tune a classification model (or a PEFT model wrapping one) with cross-entropy; the accuracy on the
    evaluation split is measured before and after and written to `output_dir/eval_results.json`.

    train_set / eval_set: already loaded splits (default: loaded from `data`). Returns the last logged metrics with
    `accuracy_before` and `accuracy_after` added.
    """
    if train_set is None:
        train_set = load_classification_split(data, data.train_split, seed=args.seed)
    if eval_set is None:
        eval_set = load_classification_eval_split(data, train_set, seed=args.seed)
    collate_fn = ClassificationCollator(processor, data.modality, data.input_column, data.label_column)
    evaluate_fn = None
    if eval_set is not None:
        evaluate_fn = accuracy_evaluator(collate_fn, eval_set, args.per_device_batch_size)
    else:
        logger.warning("No --eval_split: accuracy is not measured.")
    accelerator = create_accelerator(args)
    results = {}
    if evaluate_fn is not None:
        model.to(accelerator.device).eval()
        results["accuracy_before"] = evaluate_fn(model)["accuracy"]
        model.train()
    logged = train(
        model, classification_criterion, train_set, collate_fn, args, evaluate_fn=evaluate_fn,
        accelerator=accelerator, save_fn=lambda trained, folder: save_extras(trained, processor, folder, data.modality),
    )
    if "eval/accuracy" in logged:
        results["accuracy_after"] = logged["eval/accuracy"]
    if accelerator.is_main_process and results:
        path = Path(args.output_dir) / "eval_results.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("accuracy: %s", results)
    return {**logged, **results}


__all__ = [
    "ClassificationCollator",
    "ClassificationDataArguments",
    "accuracy_evaluator",
    "check_labels_fit",
    "classification_criterion",
    "encode_text_labels",
    "finetune_classification",
    "label_names",
    "load_accuracy_metric",
    "load_classification_model",
    "load_classification_split",
]
