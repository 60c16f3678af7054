"""What every subcommand shares: the error type the entry point turns into one line, and loading the model."""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers.utils import logging as transformers_logging

from ..default_model_path import DEFAULT_MODEL_PATH
from ..modeling_onepeace import ARCHITECTURES_WITH_PROJECTIONS, OnePeaceModel
from ..processing_onepeace import OnePeaceProcessor


class CliError(Exception):
    """A problem with the user's arguments or inputs: printed as `error: <message>` without a traceback.

    exit_code: 2 for bad arguments and inputs (as argparse uses for usage errors), 1 for a job that failed.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def add_subcommand(subparsers, name: str, help: str, doc: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its module docstring: the first paragraph (after "`onepeace-hf NAME`: ")
    as the description, the rest verbatim as the epilog (it holds lists and formats that reflowing would mangle)."""
    first, _, rest = doc.partition("\n\n")
    return subparsers.add_parser(
        name, help=help, description=first.split(": ", 1)[-1], epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def positive_int(text: str) -> int:
    """argparse type for counts (--top-k, --batch-size): a usage error, not a traceback, for 0 or less."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_argument(parser) -> None:
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL_PATH,
        help="ONE-PEACE model folder (config.json, weights, processor files); default: the tiny model shipped with "
             "the package, trained on the digits set",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")


def check_model_folder(path: Path) -> dict:
    """The folder's config as a dict, or a `CliError` saying why the folder is not a ONE-PEACE encoder."""
    if not path.exists():
        if path == DEFAULT_MODEL_PATH:
            raise CliError(f"the default model is missing from this installation ({path}); pass --model FOLDER")
        raise CliError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise CliError(f"--model must be a model folder, but {path} is a file")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CliError(f"{path} is not a model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CliError(f"{config_file} is not valid JSON ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "onepeace":
        raise CliError(f"{path} holds a {model_type!r} model, not ONE-PEACE (model_type 'onepeace')")
    architectures = set(config.get("architectures") or ["OnePeaceModel"])
    if not architectures & set(ARCHITECTURES_WITH_PROJECTIONS):
        # A classification folder lacks the projection heads; loading it as OnePeaceModel would make random ones.
        raise CliError(
            f"{path} is a {', '.join(sorted(architectures))} folder, which has no embedding projections; "
            "use a pretrained or retrieval model (OnePeaceModel)"
        )
    return config


def load_model(path: Path, needs=(), device: str | None = None, progress: bool = False):
    """`(model, processor)` from a checked folder, the model in float32 (bf16 folders too: CPUs are slow at bf16).

    needs: the modalities the command will embed; a model without one of them is refused before loading.
    progress: show transformers' weight-loading bar (worth it for the 4B model, noise in pipes and logs).
    """
    path = Path(path)
    config = check_model_folder(path)
    modalities = config.get("modalities") or ["text", "image", "audio"]
    missing = [m for m in needs if m not in modalities]
    if missing:
        raise CliError(
            f"the model at {path} has no {' or '.join(missing)} branch (its modalities: {', '.join(modalities)})"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        processor = OnePeaceProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CliError(f"{path} has no usable processor files ({error})") from None
    try:
        with progress_bars(progress):
            model = OnePeaceModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, SafetensorError) as error:  # missing, unreadable or truncated weight files
        raise CliError(f"could not load the weights in {path} ({error})") from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as error:  # unknown device name, or no CUDA in this torch
        raise CliError(f"cannot use device {device!r}: {str(error).splitlines()[0]}") from None
    return model.eval(), processor


def prepare_output(path: Path, folder: bool = False) -> None:
    """Create what `path` needs (its parent folder, or itself with `folder=True`) and check that it can be written,
    before any model runs: an unwritable path found only when writing the results wastes the whole job."""
    directory = path if folder else path.parent
    if not folder and path.is_dir():
        raise CliError(f"{path} is a folder; give a file name")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create {directory} for {path} ({error.strerror or error})") from None
    if not os.access(directory, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CliError(f"cannot write {path}: permission denied")


def show_progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: not with --quiet and not when stderr is a file or a pipe."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Switch transformers' and huggingface_hub's progress bars (weight loading, uploads) off inside the block."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            transformers_logging.enable_progress_bar()
