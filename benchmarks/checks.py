"""Argument checks shared by the benchmark scripts: a bad setting fails at once with argparse's one-line message, not
as a traceback after minutes of timing (or with the results of those minutes unwritable)."""

import argparse
import copy
from pathlib import Path

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help states every option's default, except None (the help says what happens then) and False (a flag); the
    description keeps its line breaks (usage examples)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

    def add_argument(self, action):
        if action.help is None and action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)  # an option without help gets a line for its default only
            action.help = "default: %(default)s"
        super().add_argument(action)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def check_device(parser: argparse.ArgumentParser, device: str) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        parser.error(f"--device {device}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device} requested but CUDA is not available")
    return device


def check_output_file(parser: argparse.ArgumentParser, path: Path | str) -> Path:
    """The results file's folder, created now; refused if it cannot take the file."""
    path = Path(path)
    if path.is_dir():
        parser.error(f"results file {path} is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create the folder of {path} ({error.strerror or error})")
    existed = path.exists()
    try:  # opening is the only reliable test (root passes os.access checks where files still cannot be made)
        with open(path, "a"):
            pass
    except OSError as error:
        parser.error(f"cannot write {path} ({error.strerror or error})")
    if not existed:
        path.unlink()
    return path
