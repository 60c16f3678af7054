"""Batched embedding of command-line inputs, with a progress bar.

Audio clips are batched only with clips of the same preprocessed length: as in the original, a clip's embedding
depends on the padding of its batch (the convolutional position embedding sees it), and a command-line tool should
give a file the same embedding whatever else is on the command line.
"""

import os
import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import CliError
from .inputs import read_image


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _to_device(inputs, device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


@torch.no_grad()
def embed_texts(model, processor, texts: list[str], batch_size: int, progress) -> torch.Tensor:
    pieces = []
    for batch in _batches(texts, batch_size):
        inputs = _to_device(processor(text=batch, return_tensors="pt"), model.device)
        pieces.append(model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).float().cpu())
        progress.update(len(batch))
    return torch.cat(pieces)


def prepared(path, prepare, skipped: list | None):
    """`prepare()`, or None for a file that cannot be read or that the processor refuses (NaN samples, 32-bit pixel
    values...) when `skipped` collects such files as (path, reason); otherwise a `CliError` naming the file."""
    try:
        return prepare()
    except ValueError as error:  # the processor's messages about files name the file already
        problem = CliError(str(error) if os.fspath(path) in str(error) else f"cannot use {path}: {error}")
    except CliError as error:
        problem = error
    if skipped is None:
        raise problem from None
    skipped.append((path, str(problem)))
    return None


@torch.no_grad()
def embed_images(model, processor, paths: list, batch_size: int, progress, skipped=None) -> torch.Tensor:
    pieces = []
    for batch in _batches(paths, batch_size):
        images = [
            prepared(path, lambda: processor(images=[read_image(path)], return_tensors="pt")["pixel_values"], skipped)
            for path in batch
        ]
        images = [image for image in images if image is not None]
        if images:
            pieces.append(model.get_image_features(torch.cat(images).to(model.device)).float().cpu())
        progress.update(len(batch))
    return torch.cat(pieces) if pieces else torch.empty(0)


def prepared_clip(extractor, path) -> np.ndarray:
    """The decoded clip, mixed down, resampled (soxr), normalized, cropped and tiled as the model takes it. The
    extractor decodes the file block by block: an hour-long recording never sits in memory at 48 kHz stereo."""
    return extractor(os.fspath(path))["input_values"][0]


@torch.no_grad()
def embed_audio(model, processor, paths: list, batch_size: int, progress, skipped=None) -> torch.Tensor:
    extractor = processor.feature_extractor
    result = [None] * len(paths)
    for first in range(0, len(paths), batch_size):
        chunk = paths[first : first + batch_size]
        by_length = defaultdict(list)
        for offset, path in enumerate(chunk):
            clip = prepared(path, lambda: prepared_clip(extractor, path), skipped)
            if clip is not None:
                by_length[len(clip)].append((first + offset, clip))
        for group in by_length.values():
            values = torch.as_tensor(np.stack([clip for _, clip in group]), device=model.device)
            mask = torch.ones(values.shape, dtype=torch.long, device=model.device)
            features = model.get_audio_features(values, mask).float().cpu()
            for (index, _), feature in zip(group, features):
                result[index] = feature
        progress.update(len(chunk))
    kept = [feature for feature in result if feature is not None]
    return torch.stack(kept) if kept else torch.empty(0)


EMBEDDERS = {"text": embed_texts, "image": embed_images, "audio": embed_audio}


def embed_inputs(model, processor, modality: str, values: list, batch_size: int = 32, progress: bool = False,
                 normalize: bool = True, skipped: list | None = None) -> torch.Tensor:
    """(n, hidden) float32 CPU embeddings of `values` (texts or file paths) of one modality, in input order.

    A file that cannot be read stops the run with a `CliError`, unless `skipped` is a list: the file is then left out
    and recorded there as (path, reason), so one bad file does not cost the work done on the others.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    extra = {} if modality == "text" else {"skipped": skipped}
    with tqdm(total=len(values), desc=f"{modality} embeddings", unit=modality, disable=not progress) as bar:
        embeddings = EMBEDDERS[modality](model, processor, list(values), batch_size, bar, **extra)
    if not len(embeddings):
        raise CliError(f"none of the {len(values)} {modality} files could be used")
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


def embed_readable(model, processor, modality: str, values: list, batch_size: int, progress: bool,
                   skip_unreadable: bool, normalize: bool = True) -> tuple[torch.Tensor, list, list[str]]:
    """`embed_inputs`, and the values embedded and the paths left out: with `skip_unreadable` a file that cannot be
    read is left out and reported on stderr (`skipped: <why>`); without it, it stops the run."""
    skipped = [] if skip_unreadable else None
    embeddings = embed_inputs(model, processor, modality, values, batch_size, progress, normalize, skipped)
    left_out = [str(path) for path, _ in skipped or ()]
    for _, reason in skipped or ():
        print(f"skipped: {reason}", file=sys.stderr)
    dropped = set(left_out)
    return embeddings, [value for value in values if str(value) not in dropped], left_out


def add_skip_argument(parser, what: str = "files") -> None:
    parser.add_argument("--skip-unreadable", action="store_true",
                        help=f"leave out {what} that cannot be read, listing them, instead of stopping")
