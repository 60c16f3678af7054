"""The training recipes behind the example scripts: retrieval fine-tuning and the two pretraining stages."""

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from torch.utils.data import DataLoader

from ..losses import AudioTextPretrainingLoss, ImageTextPretrainingLoss, RetrievalContrastiveLoss
from ..masking import OnePeaceMaskingCollator
from ..model_card import is_hub_model_id
from .data import PairCollator
from .objectives import freeze_for_audio_language_stage
from .trainer import TrainingArguments, refuse_previous_run, train


def parse_script_arguments(parser) -> tuple:
    """`parser.parse_args_into_dataclasses()` for the example scripts: an invalid setting, a --model or --config
    that is neither a local path nor a Hub id, or an --output_dir whose previous run is neither continued nor
    replaced, is argparse's one-line error (exit 2) before any model loads."""
    describe_negative_flags(parser)
    try:
        parsed = parser.parse_args_into_dataclasses()
        for arguments in parsed:
            if isinstance(arguments, TrainingArguments):
                refuse_previous_run(arguments)
            for option in ("model", "config"):
                check_model_location(getattr(arguments, option, None), option)
    except ValueError as error:
        parser.error(str(error))
    return parsed


def describe_negative_flags(parser) -> None:
    """`HfArgumentParser` gives `--no_X` (of a field X defaulting to True) the help of `--X` and shows its default as
    False, which reads as "X is off by default"; say what the flag does instead."""
    for action in parser._actions:
        negative = [option for option in action.option_strings if option.startswith("--no_")]
        if negative and isinstance(action, argparse._StoreFalseAction):
            action.help = f"turn --{negative[0][len('--no_'):]} off"
            action.default = argparse.SUPPRESS  # the dest's default comes from the --X action (True)


def check_model_location(location: str | None, option: str = "model") -> None:
    """Refuse a `--model` that names a missing local path: transformers would report it as a malformed Hub id."""
    if location is not None and not os.path.exists(location) and not is_hub_model_id(location):
        raise ValueError(f"--{option} {location}: no such file or folder (nor a Hub model id).")


@dataclass
class DataArguments:
    """Where the pairs come from: a `datasets` dataset (Hub name, local script/folder, or `save_to_disk` folder) or a
    synthetic set (offline tries)."""

    dataset: str | None = field(default=None, metadata={"help": "datasets name/path, or a save_to_disk folder"})
    dataset_config: str | None = field(default=None, metadata={"help": "the dataset's configuration name"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: str | None = field(default=None, metadata={"help": "split to measure retrieval recall on"})
    text_column: str = field(default="text", metadata={"help": "caption column"})
    image_column: str | None = field(default=None, metadata={"help": "image column (image-text pairs)"})
    audio_column: str | None = field(default=None, metadata={"help": "audio column (audio-text pairs)"})
    synthetic: int = field(default=0, metadata={"help": "use N synthetic pairs instead of --dataset"})
    synthetic_eval: int = field(default=8, metadata={"help": "synthetic eval pairs (8 = one per class)"})
    digits_root: str | None = field(
        default=None, metadata={"help": "the spoken/printed digits set folder (data/digits) instead of --dataset"}
    )
    streaming: bool = field(
        default=False, metadata={"help": "not supported (the schedule needs a length): load a slice, train[:100000]"}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N pairs only"})

    def __post_init__(self):
        if sum((self.dataset is not None, self.synthetic != 0, self.digits_root is not None)) != 1:
            raise ValueError("Give exactly one of --dataset, --synthetic N and --digits_root.")
        if self.digits_root is not None:
            from .digits import check_digits_root  # noqa: PLC0415

            check_digits_root(self.digits_root, self.train_split, self.eval_split)
        if self.image_column and self.audio_column:
            raise ValueError("Give one of --image_column and --audio_column.")
        if self.synthetic or self.digits_root:  # generated sets have fixed column names
            self.text_column = "text"
            if self.audio_column:
                self.audio_column = "audio"
            else:
                self.image_column = "image"
        if not (self.image_column or self.audio_column):
            raise ValueError("Give --image_column or --audio_column.")


def load_pairs(data: DataArguments, split: str, synthetic_seed: int = 0, columns: list[str] | None = None):
    """One split of pairs; `columns` (default the text and image/audio columns) must be in it."""
    from .synthetic import synthetic_pairs  # noqa: PLC0415 (only for --synthetic)

    modality = "audio" if data.audio_column else "image"
    if data.synthetic:
        count = data.synthetic if split == data.train_split else data.synthetic_eval
        dataset = synthetic_pairs(count, modality, seed=synthetic_seed + (split != data.train_split))
    elif data.digits_root:
        from .digits import load_digits_split  # noqa: PLC0415

        dataset = load_digits_split(data.digits_root, split, modality)
    elif data.streaming:
        raise ValueError(
            "Streaming datasets need a length for the schedule and a resumable position; materialize the split "
            "(or a slice of it) first, e.g. `load_dataset(..., split='train[:100000]')`."
        )
    elif is_saved_to_disk(data.dataset):
        dataset = load_saved_split(data.dataset, split, data.train_split)
    elif os.path.isfile(data.dataset):
        dataset = load_data_file(data.dataset, split, data.train_split)
    else:
        dataset = datasets.load_dataset(data.dataset, data.dataset_config, split=split)
    columns = columns or [data.text_column, data.image_column or data.audio_column]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Split {split!r} has no column {missing}; its columns are {dataset.column_names}.")
    text = dataset.features.get(data.text_column) if data.text_column in columns else None
    if isinstance(text, (datasets.Sequence, datasets.LargeList, list)):
        raise ValueError(
            f"Column {data.text_column!r} holds several texts per row (COCO-style captions): give one caption per "
            "row, e.g. dataset.map(lambda batch: ..., batched=True) repeating the image for each caption (the "
            "evaluation counts rows showing the same image as one answer)."
        )
    return dataset


# A single data file given as --dataset: the `datasets` builder that reads it.
DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_data_file(path: str, split: str, train_split: str = "train") -> datasets.Dataset:
    """A CSV, JSON Lines or Parquet file: the training split (a folder of split-named files holds several)."""
    suffix = os.path.splitext(path)[1]
    builder = DATA_FILE_BUILDERS.get(suffix.lower())
    if builder is None:
        raise ValueError(f"--dataset {path} is a file of unknown format; give a {', '.join(DATA_FILE_BUILDERS)} "
                         "file, a folder, a save_to_disk folder or a Hub dataset name.")
    if split != train_split:
        raise ValueError(
            f"--dataset {path} is one file, which stands for the {train_split!r} split; split {split!r} needs a "
            f"folder of split-named files ({train_split}{suffix}, {split}{suffix})."
        )
    return datasets.load_dataset(builder, data_files={train_split: path}, split=train_split)


def is_saved_to_disk(path: str) -> bool:
    """A `save_to_disk` folder: of a DatasetDict, or of a single Dataset."""
    markers = ("dataset_dict.json", "state.json")
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in markers)


def load_saved_split(folder: str, split: str, train_split: str = "train") -> datasets.Dataset:
    """One split of a `save_to_disk` folder; a single saved Dataset stands for `train_split` only."""
    saved = datasets.load_from_disk(folder)
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"{folder} has no split {split!r}; its splits are {list(saved)}.")
        return saved[split]
    if split != train_split:
        raise ValueError(
            f"{folder} holds a single saved Dataset, which stands for the {train_split!r} split; split {split!r} "
            f"needs a DatasetDict folder (DatasetDict({{{train_split!r}: ..., {split!r}: ...}}).save_to_disk)."
        )
    return saved


def load_before_the_model(parser, load):
    """`load()` (the training split) before the model loads, so that a wrong column or file fails in a second, as
    the script's usage error, rather than as a traceback after loading many GB."""
    try:
        return load()
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))


@torch.no_grad()
def embed_pairs(model, collate_fn: PairCollator, dataset, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized (image or audio, text) embeddings of every row, in order (separate passes per modality, so that
    pretraining models, whose joint call is the fused pass, work too)."""
    others, texts = [], []
    device = next(model.parameters()).device
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
        batch = {k: v.to(device) for k, v in batch.items()}
        texts.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds)
        if "pixel_values" in batch:
            others.append(model(pixel_values=batch["pixel_values"]).image_embeds)
        else:
            others.append(model(input_values=batch["input_values"], padding_mask=batch["padding_mask"]).audio_embeds)
    return torch.cat(others).float().cpu(), torch.cat(texts).float().cpu()


def content_key(value) -> str:
    """What identifies an image or clip of a dataset row: its file path, or a digest of its bytes or pixels."""
    if isinstance(value, dict):  # datasets' undecoded {"bytes", "path"}, or a decoded audio {"array", ...}
        value = next((value[key] for key in ("bytes", "path", "array") if value.get(key) is not None), repr(value))
    if isinstance(value, (str, os.PathLike)):
        return "path:" + os.path.abspath(value)
    if isinstance(value, Image.Image):
        value = value.mode.encode() + str(value.size).encode() + value.tobytes()
    elif not isinstance(value, bytes):
        value = np.ascontiguousarray(np.asarray(value)).tobytes()
    return "sha256:" + hashlib.sha256(value).hexdigest()


def retrieval_evaluator(
    collate_fn: PairCollator, dataset, batch_size: int = 64, modality: str = "image", group_column: str | None = None
):
    """evaluate_fn for `train`: R@1/5/10 in both directions over the eval pairs (row i of each side is a pair).

    Rows with the same `group_column` value are interchangeable answers (default the text column: identical
    captions cannot be told apart; the digits set uses `label`: any caption or picture of the same digit is right),
    and so are rows showing the same image or clip (a set flattened to one caption per row repeats each image).
    Every process evaluates the whole (small) eval set, so every process logs the same numbers."""
    from ..retrieval_metrics import grouped_pairs_recall  # noqa: PLC0415

    groups = list(dataset[group_column or collate_fn.text_column])
    column = collate_fn.image_column or collate_fn.audio_column
    items = [content_key(value) for value in dataset.select_columns([column]).with_format(None)[column]]

    def evaluate(model) -> dict:
        other, text = embed_pairs(model, collate_fn, dataset, batch_size)
        return grouped_pairs_recall(other, text, groups, a_name=modality, b_name="text", a_groups=items)

    return evaluate


def load_pair_splits(data: DataArguments, seed: int) -> tuple:
    """(training pairs, evaluation pairs or None), both loaded, as the scripts do before loading the model."""
    return load_pairs(data, data.train_split, synthetic_seed=seed), load_eval_pairs(data, seed)


def load_eval_pairs(data: DataArguments, seed: int):
    """The evaluation pairs (`--eval_split`, or the synthetic set's), cut to `--max_eval_samples`; None without."""
    if not (data.eval_split or (data.synthetic and data.synthetic_eval)):
        return None
    eval_set = load_pairs(data, data.eval_split or "validation", synthetic_seed=seed)
    if data.max_eval_samples:
        eval_set = eval_set.select(range(min(data.max_eval_samples, len(eval_set))))
    return eval_set


def _evaluator(data: DataArguments, args: TrainingArguments, collate_fn: PairCollator, eval_set=None):
    if eval_set is None:
        eval_set = load_eval_pairs(data, args.seed)
    if eval_set is None:
        return None
    modality = "audio" if data.audio_column else "image"
    group_column = "label" if data.digits_root else None  # one class per digit, several captions each
    return retrieval_evaluator(collate_fn, eval_set, args.per_device_batch_size, modality, group_column)


def finetune_retrieval(
    model, processor, data: DataArguments, args: TrainingArguments, train_set=None, eval_set=None
) -> dict:
    """Contrastive fine-tuning for image-text or audio-text retrieval, as the original's retrieval tasks.

    train_set / eval_set: already loaded splits (default: loaded from `data`). The recall on the evaluation pairs
    after training is written to `output_dir/eval_results.json`.
    """
    collate_fn = PairCollator(processor, data.text_column, data.image_column, data.audio_column)
    if train_set is None:
        train_set = load_pairs(data, data.train_split, synthetic_seed=args.seed)
    logged = train(
        model, RetrievalContrastiveLoss(), train_set, collate_fn, args,
        evaluate_fn=_evaluator(data, args, collate_fn, eval_set),
        save_fn=lambda _, folder: processor.save_pretrained(folder),
    )
    write_eval_results(args, logged)
    return logged


def write_eval_results(args: TrainingArguments, logged: dict) -> dict:
    """The final evaluation (the `eval/` metrics of the last log) as `output_dir/eval_results.json`, written by the
    main process; returns it (empty, and nothing written, without an evaluation set)."""
    results = {name: value for name, value in logged.items() if name.startswith("eval/")}
    if results and PartialState().is_main_process:
        (Path(args.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


PRETRAINING_STAGES = ("vision_language", "audio_language")


def pretrain(
    model, processor, data: DataArguments, args: TrainingArguments, stage: str, train_set=None, eval_set=None
) -> dict:
    """One stage of the original's pretraining on an [`OnePeaceForPretraining`].

    vision_language: cross-modal contrast + denoising contrast of the text, image and joint passes.
    audio_language: the same for audio, with everything but the audio branch of the encoder frozen (the original's
    `stage2_pretrain`), so audio joins the space that text and images share and audio-image retrieval emerges.
    train_set / eval_set: already loaded splits (default: loaded from `data`); the final retrieval recall on the
    evaluation pairs goes to `output_dir/eval_results.json`.
    """
    if stage not in PRETRAINING_STAGES:
        raise ValueError(f"stage must be one of {PRETRAINING_STAGES}, got {stage!r}.")
    if (stage == "audio_language") != bool(data.audio_column):
        raise ValueError(f"The {stage} stage needs --{'audio' if stage == 'audio_language' else 'image'}_column.")
    pairs = PairCollator(processor, data.text_column, data.image_column, data.audio_column)
    masking = OnePeaceMaskingCollator.for_model(
        model.config, processor.tokenizer, stage="image_text" if stage == "vision_language" else "audio_text",
        base_collator=pairs, seed=args.seed,
    )
    if stage == "audio_language":
        freeze_for_audio_language_stage(model)
        criterion = AudioTextPretrainingLoss()
    else:
        criterion = ImageTextPretrainingLoss()
    if train_set is None:
        train_set = load_pairs(data, data.train_split, synthetic_seed=args.seed)
    logged = train(
        model, criterion, train_set, masking, args, evaluate_fn=_evaluator(data, args, pairs, eval_set),
        save_fn=lambda _, folder: processor.save_pretrained(folder),
    )
    write_eval_results(args, logged)
    return logged
