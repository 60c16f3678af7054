"""The spoken/printed digits set (data/digits/, built by data/build_digits_dataset.py) as `datasets` pairs.

Each split folder holds `metadata.jsonl` (one item per line: id, label, label_name, modality, file, caption) with the
files beside it; items are single-modality (image-caption or audio-caption), so one call loads one modality.
"""

import json
import os
from pathlib import Path

import datasets
import numpy as np
import soundfile
from PIL import Image


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MODALITIES = ("image", "audio")


def check_digits_root(root, *splits: str | None) -> None:
    """A ValueError for a --digits_root that is not a folder, or that lacks one of `splits` (naming those it has):
    scripts check this before loading anything."""
    if not os.path.isdir(root):
        raise ValueError(f"--digits_root {root} is not a folder (the digits set is data/digits).")
    present = sorted(path.parent.name for path in Path(root).glob("*/metadata.jsonl"))
    for split in splits:
        if split is not None and split not in present:
            raise ValueError(f"The digits set at {root} has no split {split!r}; its splits are {present}.")


def read_digits_metadata(root, split: str, modality: str | None = None) -> list[dict]:
    """The split's metadata rows (of one modality if given), in file order."""
    path = Path(root) / split / "metadata.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; build the set with `python data/build_digits_dataset.py`.")
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if modality is None or row["modality"] == modality]


def load_digits_split(root, split: str, modality: str) -> datasets.Dataset:
    """`datasets.Dataset` with `id`, `text` (the caption), `label` (ClassLabel zero..nine) and `image` (RGB PIL) or
    `audio` ({"array", "sampling_rate"} as plain values: `datasets.Audio` would need torchcodec), read eagerly (the
    set is a few MB)."""
    rows = read_digits_metadata(root, split, modality)
    folder = Path(root) / split
    columns = {"id": [r["id"] for r in rows], "text": [r["caption"] for r in rows], "label": [r["label"] for r in rows]}
    if modality == "image":
        columns["image"] = [Image.open(folder / r["file"]).convert("RGB") for r in rows]
        media = datasets.Image()
    else:
        columns["audio"] = []
        for r in rows:
            waveform, rate = soundfile.read(folder / r["file"], dtype="float32")
            columns["audio"].append({"array": np.asarray(waveform), "sampling_rate": rate})
        media = {"array": datasets.List(datasets.Value("float32")), "sampling_rate": datasets.Value("int32")}
    features = datasets.Features({
        "id": datasets.Value("string"), "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(DIGIT_NAMES)), modality: media,
    })
    return datasets.Dataset.from_dict(columns, features=features)


def digits_retrieval_recall(model, processor, root, split: str = "test", batch_size: int = 64) -> dict[str, float]:
    """R@1 and R@5 (percent) by class on a split: a query is right when a top candidate shows the same digit.

    text_to_image / text_to_audio: each item's caption against all items of that modality; audio_to_image and
    image_to_audio: emergent, as no audio-image pair is ever trained on. Chance is about 10%.
    """
    from ..retrieval_metrics import retrieval_recall  # noqa: PLC0415
    from .data import PairCollator  # noqa: PLC0415
    from .recipes import embed_pairs  # noqa: PLC0415

    embeds, labels = {}, {}
    for modality in MODALITIES:
        dataset = load_digits_split(root, split, modality)
        collate = PairCollator(processor, image_column="image") if modality == "image" else PairCollator(
            processor, audio_column="audio")
        embeds[modality], embeds[f"{modality}_text"] = embed_pairs(model, collate, dataset, batch_size)
        labels[modality] = labels[f"{modality}_text"] = list(dataset["label"])

    def recall(queries: str, candidates: str) -> dict[str, float]:
        same = [[j for j, c in enumerate(labels[candidates]) if c == q] for q in labels[queries]]
        return retrieval_recall(embeds[queries], embeds[candidates], same, ks=(1, 5))

    directions = {"text_to_image": ("image_text", "image"), "text_to_audio": ("audio_text", "audio"),
                  "audio_to_image": ("audio", "image"), "image_to_audio": ("image", "audio")}
    return {
        f"{direction}_{k}": value
        for direction, pair in directions.items()
        for k, value in recall(*pair).items()
    }
