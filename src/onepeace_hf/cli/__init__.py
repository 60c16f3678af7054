"""The `onepeace-hf` command: embed, rank, classify, convert, demo (one module per subcommand).

`main(argv)` returns the exit status: 0 on success, 2 for bad arguments or inputs (missing or unreadable files, a
folder that is not a ONE-PEACE model, a modality the model lacks), 1 when a job itself fails (e.g. a refused
checkpoint). Errors are one line on stderr, `error: ...`, without a traceback.
"""

import argparse
import os
import sys

from . import classify, convert, demo, embed, rank
from .common import CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onepeace-hf", description="ONE-PEACE text/image/audio embeddings from the command line.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (demo, embed, rank, classify, convert):
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help (0) or a usage error (2, message already printed by argparse)
        return exit.code if isinstance(exit.code, int) else 2
    try:
        status = args.run(args)
        sys.stdout.flush()  # a reader gone (see below) shows up here, not in Python's flush at exit
        return status
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped early (`onepeace-hf demo | head`): no traceback, and none again when Python flushes
        # stdout at exit (the Python docs' recipe for SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


__all__ = ["CliError", "build_parser", "main"]
