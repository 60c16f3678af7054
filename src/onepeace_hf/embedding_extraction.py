"""Embed a column of a `datasets.Dataset` with every process of an `accelerate launch`, resumably, in input order.

The rows are cut into chunks of `chunk_size`; chunk i belongs to process i % num_processes and is written, once
finished, as `chunks/chunk_{i:06d}.parquet` (atomically: written aside, then renamed). `manifest.json` records what
the chunks are made of (model fingerprint, dataset fingerprint, column, batching, dtype); a run with anything
different over an `output_dir` that holds embeddings is refused, and a rerun of the same one (after an interruption,
possibly with another number of processes) only embeds the chunks that are missing. Once all chunks exist, the main
process joins them into `embeddings.parquet`: columns `index` (row of the input), any `id_columns`, and `embedding`
(float32; null for rows left out by `skip_unreadable`), in input order; `load_embeddings(output_dir)` opens it as a
`datasets.Dataset`.

Batches are laid out by chunk (they never cross a chunk boundary), so results do not depend on the number of
processes. That matters beyond rounding for audio: as in the original, the convolutional position embedding sees the
zero padding of a batch, so a clip's embedding depends on the longest clip batched with it.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .training.data import as_image, audio_inputs


MODALITIES = ("text", "image", "audio")
MANIFEST_VERSION = 1
FINAL_NAME = "embeddings.parquet"
_DIGEST_KEY = b"onepeace_hf.manifest_digest"
# Rows of a chunk left null (unreadable with skip_unreadable) and why, as JSON: a resumed run reports them too.
_SKIPPED_KEY = b"onepeace_hf.skipped_rows"
# Config entries that differ between a loaded and a freshly built model without changing a single output.
_CONFIG_NOISE = {"transformers_version", "architectures", "dtype", "torch_dtype"}
_SLICE = 1 << 22  # elements per step of the weight checksum (bounds its temporary memory)


@dataclass
class ExtractionCollator:
    """Raw rows of one column (texts; PIL images or paths; audio dicts or paths) -> the model's keyword arguments."""

    processor: object
    column: str
    modality: str

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        values = [row[self.column] for row in rows]
        if self.modality == "text":
            if not all(isinstance(value, str) for value in values):
                raise ValueError(f"Text column {self.column!r} must hold strings.")
            return dict(self.processor(text=values, return_tensors="pt"))
        if self.modality == "image":
            return dict(self.processor(images=[as_image(value) for value in values], return_tensors="pt"))
        return audio_inputs(self.processor, values)


def embed_batch(model, inputs: dict[str, torch.Tensor], modality: str, normalize: bool = True) -> torch.Tensor:
    """(batch, hidden) float32 CPU embeddings of one collated batch, with `get_{modality}_features`."""
    device, dtype = model.device, model.dtype
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    features = getattr(model, f"get_{modality}_features")(**inputs).float()
    return (F.normalize(features, dim=-1) if normalize else features).cpu()


def model_fingerprint(model) -> str:
    """Config plus exact integer checksums of every tensor's bits: any changed weight shows, the result is the same
    on every device (integer sums do not depend on reduction order), and it stays cheap for 4B weights on a GPU."""
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_NOISE}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    weights: dict[torch.device, torch.Tensor] = {}  # position weights, made once per device
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().contiguous().reshape(-1)
            # 16-bit words (bytes for 1-byte dtypes) times weights below 2**16: no int64 overflow in a slice.
            words = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
            if words.device not in weights:
                weights[words.device] = torch.arange(_SLICE, device=words.device) % 65521 + 1
            total, weighted = 0, 0
            for start in range(0, words.numel(), _SLICE):
                piece = words[start : start + _SLICE].long()
                total += int(piece.sum())
                weighted += int((piece * weights[words.device][: piece.numel()]).sum())
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}:{total},{weighted};".encode())
    return digest.hexdigest()[:20]


@dataclass
class ExtractionSummary:
    """What a call did: `output` is the final Parquet file, or None when stopped early by `max_chunks`."""

    output: Path | None
    num_chunks: int
    embedded_chunks: int  # in this call, over all processes
    reused_chunks: int  # found complete from an earlier call
    # Unreadable rows left null (skip_unreadable) in the chunks written so far, by this call or an earlier one.
    skipped_rows: list[int] = field(default_factory=list)
    skip_reasons: dict[int, str] = field(default_factory=dict)  # what went wrong with each of them, in one line


def _write_atomically(table: pa.Table, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def _chunk_is_valid(path: Path, num_rows: int, digest: str) -> bool:
    """A chunk counts only if it is readable, has the right rows and was written under the same manifest."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid):
        return False
    metadata = parquet.schema_arrow.metadata or {}
    return parquet.metadata.num_rows == num_rows and metadata.get(_DIGEST_KEY) == digest.encode()


def _check_manifest(path: Path, manifest: dict) -> None:
    """Refuse to mix with embeddings made differently; a manifest with no embeddings yet (a run that failed before
    its first chunk) protects nothing and is replaced."""
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    made = any((path.parent / "chunks").glob("*.parquet")) or (path.parent / "embeddings.parquet").exists()
    if previous != manifest and made:
        changed = sorted(k for k in set(manifest) | set(previous) if previous.get(k) != manifest.get(k))
        # The model fingerprint covers the weights' bits, so another dtype alone changes it too.
        note = " (the model's fingerprint changes with its dtype)" if {"dtype", "model"} <= set(changed) else ""
        raise ValueError(
            f"{path.parent} holds embeddings made with different {changed} ({[previous.get(k) for k in changed]} "
            f"there, {[manifest.get(k) for k in changed]} now){note}; use another output_dir or delete it."
        )


def extract_embeddings(
    model,
    processor,
    dataset: datasets.Dataset,
    column: str,
    modality: str,
    output_dir: str | os.PathLike,
    accelerator=None,
    batch_size: int = 64,
    chunk_size: int = 1024,
    id_columns: tuple[str, ...] | list[str] = (),
    normalize: bool = True,
    num_workers: int = 0,
    max_chunks: int | None = None,
    skip_unreadable: bool = False,
) -> ExtractionSummary:
    """Embed `dataset[column]` (`modality` text, image or audio) into `output_dir` (see the module docstring).

    model: an `OnePeaceModel` already on this process's device, in the wanted dtype. accelerator: an `Accelerator`
    or `PartialState` (default: the current `PartialState`); every process must call this with the same arguments.
    normalize: L2-normalize the embeddings (the original's retrieval embeddings are). num_workers: DataLoader
    workers for decoding and preprocessing. max_chunks: embed at most this many chunks per process in this call,
    for time-limited jobs and tests; call again to go on. skip_unreadable: a row that cannot be read or preprocessed
    gets a null embedding (and is listed in the summary, with the reason) instead of stopping the run; the other rows
    of its batch are then embedded one by one (for audio, without the batch's padding). A missing decoder
    (ImportError) still stops the run, and so does a call in which no row at all could be read. Without it the
    error names the rows; editing the dataset to drop them changes its fingerprint, so the chunks already written
    could not be reused.
    """
    state = accelerator if accelerator is not None else PartialState()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError(
            "Streaming (iterable) datasets have no stable row order to cut into resumable chunks; load a map-style "
            "dataset (load_dataset(..., streaming=False)), or take a slice with dataset.take(n) and "
            "Dataset.from_generator."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    id_columns = list(id_columns)
    missing = [c for c in (column, *id_columns) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Columns {missing} are not in the dataset (columns: {dataset.column_names}).")
    feature = dataset.features[column]
    for kind, name in ((datasets.Image, "image"), (datasets.Audio, "audio")):
        if isinstance(feature, kind) and modality != name:
            raise ValueError(f"Column {column!r} holds {name}s (a datasets {kind.__name__} feature), not {modality}.")
    if {"index", "embedding"} & set(id_columns):
        raise ValueError("id_columns cannot be named 'index' or 'embedding': those are the output's own columns.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be positive, got {batch_size} and {chunk_size}.")
    if max_chunks is not None and max_chunks < 0:
        raise ValueError(f"max_chunks must be >= 0, got {max_chunks}.")

    output_dir, num_rows = Path(output_dir), len(dataset)
    chunk_dir, manifest_path = output_dir / "chunks", output_dir / "manifest.json"
    manifest = {
        "version": MANIFEST_VERSION, "model": model_fingerprint(model), "dtype": str(model.dtype).split(".")[-1],
        "dataset": dataset._fingerprint, "num_rows": num_rows, "column": column, "modality": modality,
        "id_columns": id_columns, "normalize": normalize, "chunk_size": chunk_size,
        # Part of the manifest because audio embeddings depend on their batch's padding (module docstring).
        "batch_size": batch_size,
    }
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    _check_manifest(manifest_path, manifest)  # on every process, so that all of them stop on a mismatch
    state.wait_for_everyone()
    if state.is_main_process:
        chunk_dir.mkdir(parents=True, exist_ok=True)
        # New, the same, or replacing one that protected no embeddings (`_check_manifest` let the run through).
        partial = manifest_path.with_name("manifest.json.partial")
        partial.write_text(json.dumps(manifest, indent=2))
        os.replace(partial, manifest_path)
    state.wait_for_everyone()

    num_chunks = -(-num_rows // chunk_size)
    bounds = [(i * chunk_size, min((i + 1) * chunk_size, num_rows)) for i in range(num_chunks)]
    chunk_path = [chunk_dir / f"chunk_{i:06d}.parquet" for i in range(num_chunks)]
    mine = range(state.process_index, num_chunks, state.num_processes)
    todo = [i for i in mine if not _chunk_is_valid(chunk_path[i], bounds[i][1] - bounds[i][0], digest)]
    reused = len(mine) - len(todo)
    if max_chunks is not None:
        todo = todo[:max_chunks]

    # One loader over all of this process's batches, so that workers live through the whole run.
    plan = [(chunk, start, min(start + batch_size, bounds[chunk][1]))
            for chunk in todo for start in range(bounds[chunk][0], bounds[chunk][1], batch_size)]
    loader = DataLoader(
        dataset.select_columns([column]).with_format(None),
        batch_sampler=[list(range(start, stop)) for _, start, stop in plan],
        collate_fn=ExtractionCollator(processor, column, modality),
        num_workers=num_workers,
    )
    was_training = model.training
    model.eval()
    ids = dataset.select_columns(id_columns).with_format("arrow") if id_columns else None
    pieces: list[torch.Tensor] = []
    progress = tqdm(total=sum(stop - start for _, start, stop in plan), unit="rows", disable=not state.is_main_process,
                    desc=f"{modality} embeddings (process 0 of {state.num_processes})")
    batches = iter(loader)
    skipped: list[int] = []
    with torch.inference_mode():
        for chunk, start, stop in plan:
            try:
                inputs = next(batches)  # in plan order, also with workers (each re-raises its batch's error)
            except Exception as error:
                if isinstance(error, ImportError):  # a missing decoder (e.g. torchcodec) fails every row alike
                    raise
                if not skip_unreadable:
                    row, reason = _first_unreadable_row(dataset, column, modality, processor, range(start, stop))
                    where = f"Row {row}" if row is not None else f"Rows {start} to {stop - 1}"
                    raise ValueError(
                        f"{where} of column {column!r} could not be read or preprocessed "
                        f"({reason or _last_line(error)}); with skip_unreadable (--skip_unreadable), unreadable rows "
                        "get a null embedding and the others are embedded."
                    ) from error
                pieces.append(_embed_row_by_row(model, dataset, column, modality, processor, range(start, stop),
                                                normalize, skipped))
            else:
                pieces.append(embed_batch(model, inputs, modality, normalize))
            progress.update(stop - start)
            if stop == bounds[chunk][1]:
                table = _chunk_table(*bounds[chunk], torch.cat(pieces), ids, digest, dict(skipped))
                _write_atomically(table, chunk_path[chunk])
                pieces = []
    progress.close()
    model.train(was_training)

    embedded, reused = sum(gather_object([len(todo)])), sum(gather_object([reused]))
    skipped = sorted(gather_object(skipped))
    rows_read = sum(gather_object([sum(stop - start for _, start, stop in plan)]))
    if skipped and len(skipped) == rows_read and reused == 0:
        # Nothing could be read: the cause is rather the column, the modality or the environment than the rows. (With
        # chunks of an earlier call, some rows were read: this call's rows may simply all be bad ones.)
        for chunk in todo:
            chunk_path[chunk].unlink(missing_ok=True)
        state.wait_for_everyone()
        row, reason = skipped[0]
        raise ValueError(
            f"None of the {rows_read} rows of column {column!r} could be read or preprocessed as {modality}, so no "
            f"embeddings were written (row {row}: {reason})."
        )
    final = output_dir / FINAL_NAME
    state.wait_for_everyone()
    if state.is_main_process:
        complete = all(_chunk_is_valid(chunk_path[i], stop - start, digest) for i, (start, stop) in enumerate(bounds))
        if complete and not (embedded == 0 and _chunk_is_valid(final, num_rows, digest)):
            _join_chunks(chunk_path, final)
    complete = broadcast_object_list([complete if state.is_main_process else None])[0]
    left_out = _rows_left_out(chunk_path, bounds, digest) if state.is_main_process else None
    left_out = broadcast_object_list([left_out])[0]
    state.wait_for_everyone()
    return ExtractionSummary(final if complete else None, num_chunks, embedded, reused, sorted(left_out), left_out)


def _rows_left_out(chunk_paths: list[Path], bounds: list[tuple[int, int]], digest: str) -> dict[int, str]:
    """Rows left null in the valid chunks, with their reasons, read from the chunks' metadata (no embeddings)."""
    left_out = {}
    for path, (start, stop) in zip(chunk_paths, bounds):
        if _chunk_is_valid(path, stop - start, digest):
            recorded = (pq.read_schema(path).metadata or {}).get(_SKIPPED_KEY)
            left_out.update({int(row): reason for row, reason in json.loads(recorded or b"{}").items()})
    return left_out


def _last_line(error: Exception) -> str:
    """What went wrong, in one line: a DataLoader worker's error carries its whole traceback as the message."""
    lines = str(error).strip().splitlines()
    return lines[-1] if len(lines) > 1 else f"{type(error).__name__}: {error}"


def _rows_read_alone(dataset, column, modality, processor, rows):
    """Each of `rows` read and preprocessed on its own: (row, inputs, None), or (row, None, why) when it fails (a
    missing decoder, ImportError, fails every row alike and is raised)."""
    collate = ExtractionCollator(processor, column, modality)
    values = dataset.select_columns([column]).with_format(None)
    for row in rows:
        try:
            inputs = collate([values[row]])
        except ImportError:
            raise
        except Exception as error:
            yield row, None, _last_line(error)
        else:
            yield row, inputs, None


def _first_unreadable_row(dataset, column, modality, processor, rows) -> tuple[int | None, str | None]:
    """The first of `rows` that fails to read or preprocess on its own, with why (None, None if each reads alone)."""
    failed = (
        (row, reason) for row, inputs, reason in _rows_read_alone(dataset, column, modality, processor, rows)
        if inputs is None
    )
    return next(failed, (None, None))


def _embed_row_by_row(model, dataset, column, modality, processor, rows, normalize, skipped: list[int]):
    """Embeddings of `rows` one at a time; rows that cannot be read are recorded in `skipped` (row, reason) and get a
    NaN placeholder, which the chunk writer stores as null."""
    blank = torch.full((model.config.hidden_size,), float("nan"))
    embeddings = []
    for row, inputs, reason in _rows_read_alone(dataset, column, modality, processor, rows):
        if inputs is None:
            skipped.append((row, reason))
            embeddings.append(blank)
        else:
            embeddings.append(embed_batch(model, inputs, modality, normalize)[0])
    return torch.stack(embeddings)


def _chunk_table(first: int, last: int, embeddings: torch.Tensor, ids, digest: str, skipped: dict[int, str]
                 ) -> pa.Table:
    """Rows first..last-1: `index`, the id columns (Arrow slices: the same types in every chunk), `embedding`."""
    columns = {"index": pa.array(range(first, last), pa.int64())}
    if ids is not None:
        id_table = ids[first:last]
        columns.update({name: id_table.column(name) for name in id_table.column_names})
    values = embeddings.numpy()
    unreadable = pa.array([row in skipped for row in range(first, last)])  # rows left out: null, not NaN
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1],
                                                             mask=unreadable)
    mine = {row: reason for row, reason in skipped.items() if first <= row < last}
    return pa.table(columns).replace_schema_metadata({_DIGEST_KEY: digest.encode(),
                                                      _SKIPPED_KEY: json.dumps(mine).encode()})


def _join_chunks(chunk_paths: list[Path], final: Path) -> None:
    """One Parquet file in input order, written chunk by chunk (never more than one chunk in memory), atomically."""
    partial = final.with_name(final.name + ".partial")
    schema = pq.read_schema(chunk_paths[0])
    schema = schema.with_metadata({_DIGEST_KEY: schema.metadata[_DIGEST_KEY]})  # not the first chunk's skipped rows
    with pq.ParquetWriter(partial, schema) as writer:
        for path in chunk_paths:
            writer.write_table(pq.read_table(path).replace_schema_metadata(schema.metadata))
    os.replace(partial, final)


def load_embeddings(output_dir: str | os.PathLike) -> datasets.Dataset:
    """The finished result of `extract_embeddings` as a `datasets.Dataset` (columns index, id columns, embedding)."""
    final = Path(output_dir) / FINAL_NAME
    if not final.exists():
        raise FileNotFoundError(f"{final} does not exist: the extraction has not finished (run it again to resume).")
    return datasets.Dataset.from_parquet(str(final))


__all__ = [
    "ExtractionCollator",
    "ExtractionSummary",
    "embed_batch",
    "extract_embeddings",
    "load_embeddings",
    "model_fingerprint",
]
