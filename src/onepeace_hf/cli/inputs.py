"""Command-line inputs: which texts, image files and audio files to embed, checked before the model loads.

Files are checked for existence up front (a typo should fail in a second, not after loading a model) and decoded
only when their batch is embedded, so long lists do not sit in memory; a file that cannot be decoded still stops the
run with a one-line error naming it.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageFile, UnidentifiedImageError

from ..audio_utils import load_audio
from ..image_utils import load_image
from .common import CliError


MODALITIES = ("text", "image", "audio")


def image_suffixes() -> set[str]:
    """Suffixes of the formats Pillow can decode here (used to pick files out of a folder): not the ones it only
    identifies (stubs such as HDF5 or GRIB, MPEG video) nor EPS without Ghostscript, so that a folder of photos
    with a video or data file beside them still embeds."""
    Image.init()  # registers every plugin; before that Image.OPEN only knows the formats imported so far
    return {suffix.lower() for suffix, name in Image.registered_extensions().items() if _decodable(name)}


def _decodable(format_name: str) -> bool:
    if format_name not in Image.OPEN:
        return False
    if format_name == "MPEG":  # identified from its header, no decoder
        return False
    if format_name == "EPS":
        from PIL import EpsImagePlugin  # noqa: PLC0415

        return bool(EpsImagePlugin.gs_binary)
    opener = Image.OPEN[format_name][0]
    return not (isinstance(opener, type) and issubclass(opener, ImageFile.StubImageFile))


def audio_suffixes() -> set[str]:
    """Suffixes of the formats this soundfile/libsndfile build decodes (WAV, FLAC, OGG, MP3 with libsndfile 1.1+)."""
    # Headerless RAW needs its rate and encoding told, which a file list cannot carry.
    suffixes = {f".{name.lower()}" for name in soundfile.available_formats() if name != "RAW"} | {".aif"}
    return suffixes | {".oga", ".opus"} if ".ogg" in suffixes else suffixes


@dataclass
class Inputs:
    """Texts and files of each modality in the order given; `names` are what results are labelled with."""

    values: dict[str, list] = field(default_factory=lambda: {m: [] for m in MODALITIES})

    def names(self, modality: str) -> list[str]:
        return [str(value) for value in self.values[modality]]

    def present(self) -> list[str]:
        return [m for m in MODALITIES if self.values[m]]


def read_list_file(path: Path) -> list[str]:
    """Non-empty lines of a list file (one text or path per line); relative paths stay relative to the cwd.

    `-` reads standard input, and pipes (`<(ls ...)`, /dev/stdin) are read like files. A UTF-8 byte-order mark
    (Notepad, Excel's "CSV UTF-8") is dropped: kept, it would become part of the first text or path.
    """
    if str(path) == "-":
        data = sys.stdin.buffer.read()
    elif path.is_dir():
        raise CliError(f"list file {path} is a folder")
    elif not path.exists():
        raise CliError(f"list file {path} does not exist")
    else:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CliError(f"cannot read list file {path}: {error.strerror}") from None
    try:
        return [line.strip() for line in data.decode("utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CliError(f"list file {path} is not UTF-8 text") from None


def expand_paths(paths, modality: str) -> list[Path]:
    """Existing files as given; a folder gives its files of a known format, sorted by name."""
    suffixes = image_suffixes() if modality == "image" else audio_suffixes()
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise CliError(f"folder {path} holds no {modality} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CliError(f"{modality} file {path} does not exist")
    return files


def collect_inputs(texts=(), images=(), audio=(), text_lists=(), image_lists=(), audio_lists=()) -> Inputs:
    inputs = Inputs()
    inputs.values["text"] = list(texts) + [line for path in text_lists for line in read_list_file(Path(path))]
    for modality, given, lists in (("image", images, image_lists), ("audio", audio, audio_lists)):
        raw = list(given) + [line for path in lists for line in read_list_file(Path(path))]
        inputs.values[modality] = expand_paths(raw, modality)
    if any(not text.strip() for text in inputs.values["text"]):
        raise CliError("texts must not be empty")
    return inputs


def read_image(path: Path) -> Image.Image:
    """The decoded image, turned as displayed (`load_image`), or a `CliError` naming the file."""
    try:
        return load_image(path)
    except UnidentifiedImageError:
        raise CliError(f"cannot read image {path}: not a format Pillow can open") from None
    except (OSError, Image.DecompressionBombError) as error:  # truncated or unreadable files; oversized images
        raise CliError(f"cannot read image {path}: {error}") from None


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """`(waveform, rate)` at the file's own rate (the feature extractor resamples to the model's), or a `CliError`."""
    try:
        waveform, rate = load_audio(path)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        formats = ", ".join(sorted(soundfile.available_formats()))
        raise CliError(
            f"cannot read audio {path}: not a format soundfile can decode ({str(error).strip()}); "
            f"readable formats: {formats}"
        ) from None
    if waveform.size == 0:
        raise CliError(f"audio file {path} holds no samples")
    return waveform, rate


def add_input_arguments(parser, modalities=MODALITIES, prefix: str = "", role: str = "") -> None:
    """`--{prefix}text/image/audio` (repeatable, several values each) and `--{prefix}MODALITY-list FILE` options."""
    role = f"{role} " if role else ""
    helps = {
        "text": f"{role}text(s), e.g. --{prefix}text 'a dog' 'a cat'; repeatable",
        "image": f"{role}image file(s) or folder(s) of images; repeatable",
        "audio": f"{role}audio file(s) (any rate: resampled) or folder(s); repeatable",
    }
    for modality in modalities:
        parser.add_argument(f"--{prefix}{modality}", nargs="+", action="extend", default=[], metavar=modality.upper(),
                            help=helps[modality])
        parser.add_argument(f"--{prefix}{modality}-list", action="append", default=[], metavar="FILE",
                            help=f"file with one {role}{modality}{' path' if modality != 'text' else ''} per line")


def inputs_from_args(args, modalities=MODALITIES, prefix: str = "") -> Inputs:
    def get(name):
        return getattr(args, f"{prefix}{name}".replace("-", "_"), [])

    given = {}
    for modality in MODALITIES:
        given[modality] = get(modality) if modality in modalities else []
        given[f"{modality}_lists"] = get(f"{modality}-list") if modality in modalities else []
    return collect_inputs(
        texts=given["text"], images=given["image"], audio=given["audio"],
        text_lists=given["text_lists"], image_lists=given["image_lists"], audio_lists=given["audio_lists"],
    )
