"""Reading original ONE-PEACE checkpoints safely and lazily.

Two formats exist: the fairseq trainer's `torch.save` zip archives (`.pt`: pretraining, retrieval, classification)
and the vision branch's plain pickle (`one-peace-vision.pkl`, written by the original's `convert_to_vision.py`).
Both are read with a restricted unpickler that only rebuilds tensors, plain containers and numpy scalars, so a
checkpoint cannot run code. Tensors of a zip archive stay on disk until `load()` is called, one at a time, so
converting a 4B checkpoint needs little more memory than the shard being written. A plain pickle cannot be read
partially: the vision branch is read whole.
"""

import io
import pickle
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class CheckpointConversionError(ValueError):
    """The checkpoint cannot be converted faithfully; the message says why."""


# Kinds of original checkpoint: the fairseq model names, and the vision branch.
PRETRAIN, RETRIEVAL, CLASSIFY, VISION = "one_peace_pretrain", "one_peace_retrieval", "one_peace_classify", "vision"
CHECKPOINT_KINDS = (PRETRAIN, RETRIEVAL, CLASSIFY, VISION)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _StorageRecord:
    """Where a storage of a zip checkpoint lives; the bytes are read only when a tensor is loaded."""

    archive: Path
    member: str
    dtype: torch.dtype


class LazyTensor:
    """Shape and dtype of a checkpoint tensor, with its data read from disk on `load()`."""

    def __init__(self, storage, offset: int, size: tuple, stride: tuple):
        self._storage, self._offset, self._stride = storage, offset, tuple(stride)
        self.shape = torch.Size(size)

    @property
    def dtype(self) -> torch.dtype:
        return self._storage.dtype

    def load(self) -> torch.Tensor:
        storage = self._storage
        if isinstance(storage, _StorageRecord):
            try:
                with zipfile.ZipFile(storage.archive) as archive, archive.open(storage.member) as member:
                    raw = torch.empty(archive.getinfo(storage.member).file_size, dtype=torch.uint8)
                    member.readinto(memoryview(raw.numpy()))
            except (zipfile.BadZipFile, zlib.error, EOFError, KeyError) as error:
                raise _damaged(storage.archive, error) from None
            return raw.view(storage.dtype).as_strided(self.shape, self._stride, self._offset).clone()
        # A storage of a plain pickle, already in memory.
        empty = torch.empty(0, dtype=storage.dtype)
        return empty.set_(storage.untyped, self._offset, self.shape, self._stride).clone()

    def meta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A data-less tensor of the same shape (for planning shards and checking against a model)."""
        return torch.empty(self.shape, dtype=dtype or self.dtype, device="meta")

    def __repr__(self):
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"


def _load_storage_from_bytes(data: bytes) -> "_InMemoryStorage":
    """How a plain pickle stores a tensor's storage: a `torch.save` of it, which is itself read weights-only."""
    typed = torch.load(io.BytesIO(data), weights_only=True)
    return _InMemoryStorage(typed.dtype, typed.untyped_storage() if isinstance(typed, torch.Tensor) else typed._untyped_storage)


@dataclass(frozen=True)
class _InMemoryStorage:
    """A storage a plain pickle held in memory, with the dtype of its tensors."""

    dtype: torch.dtype
    untyped: torch.UntypedStorage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return LazyTensor(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors lazily and refuses every global that is not a tensor, container or numpy scalar."""

    def __init__(self, file, archive: Path | None = None, prefix: str = ""):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): lambda text, encoding="utf-8": text.encode(encoding),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module.startswith("numpy") and name.endswith("DType"):  # numpy 2 dtype classes, e.g. Float64DType
            return getattr(np.dtypes, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid):
        # Zip archives reference storages as ("storage", storage type, key, location, numel); `find_class` has
        # already turned the storage type into its dtype (or refused it).
        if self._archive is None or not isinstance(pid, tuple) or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return _StorageRecord(self._archive, f"{self._prefix}data/{pid[2]}", pid[1])


def _unsafe(path, error) -> CheckpointConversionError:
    return CheckpointConversionError(
        f"Refusing to load {path}: it needs objects that a weights-only load does not allow ({error}). "
        "Only checkpoints made of tensors, plain containers and numpy scalars are read."
    )


def _damaged(path, error) -> CheckpointConversionError:
    return CheckpointConversionError(
        f"{path} is damaged or incomplete ({error}): download or copy it again (compare its checksum if one is "
        "published)."
    )


def _read_pickle(path: Path):
    """The unpickled top-level object; tensors in it are `LazyTensor`s."""
    with open(path, "rb") as data:
        start = data.read(4)
    pickled = start[:1] == b"\x80"  # the PROTO opcode every torch.save pickle starts with
    if start == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # a zip archive whose end (its directory) is missing
        raise _damaged(path, "a zip archive without its central directory")
    if not (pickled or zipfile.is_zipfile(path)):
        raise CheckpointConversionError(
            f"{path} is not a torch.save checkpoint: give an original ONE-PEACE .pt file (or one-peace-vision.pkl)."
        )
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
                if len(pickles) != 1:
                    raise CheckpointConversionError(f"{path} is a zip file but not a torch.save archive.")
                prefix = pickles[0][: -len("data.pkl")]
                with archive.open(pickles[0]) as data:
                    return _RestrictedUnpickler(data, archive=path, prefix=prefix).load()
        with open(path, "rb") as data:
            top = _RestrictedUnpickler(data).load()
        return _read_legacy_torch_file(path) if top == _LEGACY_TORCH_MAGIC else top
    except CheckpointConversionError:
        raise
    except (EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise _damaged(path, error) from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as error:
        if "truncated" in str(error):  # pickle's message when the data ends early
            raise _damaged(path, error) from None
        raise _unsafe(path, error) from error


# The first pickle of a pre-zip (`_use_new_zipfile_serialization=False`) torch.save file.
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy_torch_file(path: Path):
    """Pre-zip torch files keep storages after several pickles: read them whole with torch's weights-only loader."""
    numpy_scalars = [
        (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"), np._core.multiarray.scalar, np.dtype,
        *[type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")],
    ]
    with torch.serialization.safe_globals(numpy_scalars):
        top = torch.load(path, map_location="cpu", weights_only=True)
    state = top.get("model") if isinstance(top, dict) else None
    if isinstance(state, dict):
        top["model"] = {
            key: LazyTensor(_InMemoryStorage(t.dtype, t.untyped_storage()), t.storage_offset(), t.shape, t.stride())
            if isinstance(t, torch.Tensor) else t
            for key, t in state.items()
        }
    return top


def checkpoint_kind(checkpoint: dict) -> str | None:
    """The fairseq model name of a checkpoint, or "vision" for the vision branch (tensor names, no cfg)."""
    cfg = checkpoint.get("cfg")
    if isinstance(cfg, dict):
        return (cfg.get("model") or {}).get("_name")
    model = checkpoint.get("model")
    if isinstance(model, dict) and any(key.startswith("image_adapter.") for key in model):
        return VISION
    return None


def read_original_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """The checkpoint's top-level dict with `LazyTensor`s (data stays on disk); `kind` asserts what it must be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    checkpoint = _read_pickle(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointConversionError(
            f"{path} is neither a fairseq ONE-PEACE checkpoint (a dict with 'model' and 'cfg') nor the vision branch "
            "(a dict with 'model' holding 'image_adapter.*' tensors)."
        )
    detected = checkpoint_kind(checkpoint)
    if detected is None:
        raise CheckpointConversionError(
            f"{path} has no fairseq 'cfg' and no 'image_adapter.*' tensors: not an original ONE-PEACE checkpoint."
        )
    if detected not in CHECKPOINT_KINDS:
        raise CheckpointConversionError(
            f"Unknown checkpoint kind {detected!r} in {path}; supported: {', '.join(CHECKPOINT_KINDS)}."
        )
    if kind is not None and kind != detected:
        raise CheckpointConversionError(f"The checkpoint kind {kind} was asked for, but {path} is a {detected} checkpoint.")
    odd = sorted(key for key, value in checkpoint["model"].items() if not isinstance(value, LazyTensor))
    if odd:
        raise CheckpointConversionError(f"{path}: entries of the state dict that are not tensors: {odd}.")
    return checkpoint


def load_original_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """Like `read_original_checkpoint`, with every tensor read into memory (for small checkpoints and tests)."""
    checkpoint = read_original_checkpoint(path, kind)
    checkpoint["model"] = {key: tensor.load() for key, tensor in checkpoint["model"].items()}
    return checkpoint


def materialize(tensor) -> torch.Tensor:
    """A tensor from either a `LazyTensor` or an in-memory tensor."""
    return tensor.load() if isinstance(tensor, LazyTensor) else tensor
