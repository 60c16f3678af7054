"""Writing a model as sharded safetensors one shard at a time, and the folder's checksum manifest.

Tensors are produced on demand (read from the original checkpoint, cast, written, released), so the peak memory is
about one shard. Shard names and the index follow huggingface_hub's conventions, so `from_pretrained` reads them.
The manifest is a `SHA256SUMS` file in `sha256sum` format: `sha256sum -c SHA256SUMS` checks a download by hand.
"""

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE
from safetensors.torch import save_file
from transformers.utils.logging import tqdm  # off with transformers' disable_progress_bar()


MANIFEST_NAME = "SHA256SUMS"


class ChecksumMismatchError(ValueError):
    """Files of a folder differ from its checksum manifest; the message lists them."""


def write_sharded_safetensors(
    tensors: Mapping[str, tuple[torch.Tensor, Callable[[], torch.Tensor]]],
    output_dir: str | Path,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Write `name -> (meta tensor, loader)` as safetensors shards; returns the written file names.

    The meta tensors (shape and final dtype) plan the shards up front; each loader is called once, when its shard is
    written, and must return the tensor with that shape and dtype.
    """
    output_dir = Path(output_dir)
    split = split_torch_state_dict_into_shards(
        {name: meta for name, (meta, _) in tensors.items()}, max_shard_size=max_shard_size
    )
    total = sum(meta.numel() * meta.element_size() for meta, _ in tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards", disable=None) as progress:
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                meta, load = tensors[name]
                tensor = load()
                if tensor.shape != meta.shape or tensor.dtype != meta.dtype:
                    raise ValueError(f"{name}: loaded {tuple(tensor.shape)} {tensor.dtype}, planned "
                                     f"{tuple(meta.shape)} {meta.dtype}.")
                shard[name] = tensor.contiguous()
                progress.update(meta.numel() * meta.element_size())
            save_file(shard, output_dir / filename, metadata={"format": "pt"})
            _permissions_from_umask(output_dir / filename)
            del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (output_dir / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [*split.filename_to_tensors, SAFETENSORS_INDEX_FILE]
    return list(split.filename_to_tensors)


def _permissions_from_umask(path: Path) -> None:
    """safetensors writes owner-only files (0600); give the weights what the umask gives the folder's other files,
    so that a shared model folder is readable by its other users."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def read_weight_files(folder: str | Path):
    """Yield `(name, tensor)` of every weight of a (sharded) safetensors folder, one tensor in memory at a time."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for filename in files:
        with safe_open(folder / filename, "pt") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    return sorted(
        str(path.relative_to(folder)) for path in folder.rglob("*")
        if path.is_file() and path.name != MANIFEST_NAME and not any(part.startswith(".") for part in
                                                                     path.relative_to(folder).parts)
    )


def write_checksum_manifest(folder: str | Path) -> Path:
    """Write `SHA256SUMS` for every file of the folder (hidden files such as `.cache` excluded)."""
    folder = Path(folder)
    lines = [f"{_sha256(folder / name)}  {name}\n" for name in tqdm(_listed_files(folder), desc="Checksums",
                                                                     disable=None)]
    manifest = folder / MANIFEST_NAME
    manifest.write_text("".join(lines))
    return manifest


def verify_checksum_manifest(folder: str | Path) -> None:
    """Check every file against `SHA256SUMS`; raise listing the files that differ, are missing or are not listed."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise ChecksumMismatchError(f"{folder} has no {MANIFEST_NAME} manifest.")
    listed = {}
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = set(_listed_files(folder))
    problems = []
    for name, digest in sorted(listed.items()):
        if name not in present:
            problems.append(f"missing: {name}")
        elif _sha256(folder / name) != digest:
            problems.append(f"checksum differs: {name}")
    problems += [f"not in the manifest: {name}" for name in sorted(present - listed.keys())]
    if problems:
        raise ChecksumMismatchError(f"{folder} does not match its {MANIFEST_NAME}: " + "; ".join(problems))
