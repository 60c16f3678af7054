"""`onepeace-hf convert`: an original (fairseq) ONE-PEACE checkpoint to a transformers folder, optionally on the Hub.

Every original kind converts: pretraining (the denoising decoder dropped, or kept with --task pretraining),
retrieval of any head type, classification of any head type (image, audio, VQA, NLVR2, grounding, audio-language,
AQA) and the vision branch (one-peace-vision.pkl). The kind is read from the file; --kind makes it a requirement.

What the command checks before it succeeds:
  - every written tensor equals its (cast) source, and the folder reloads through its Auto class with no missing
    or unexpected key;
  - with --expected-outputs, the converted model reproduces outputs recorded with the original code (see
    conversion/README.md) within --atol/--rtol;
  - a SHA256SUMS manifest is written last; --push-to-hub refuses a folder that no longer matches it, and checks
    the repository id, offline mode and the Hub login before converting.
The files are built in a hidden subfolder and moved into place once checked: a failed or interrupted conversion leaves
--output-dir as it was, so no unverified folder is left to load by mistake. --overwrite replaces the files of a
previous conversion there and keeps every other file.

The folder also loads with trust_remote_code=True for users without onepeace_hf, and gets a model card (README.md).
"""

import argparse
import contextlib
import re
import signal
import sys
import threading

import torch
from safetensors import SafetensorError

from .common import add_subcommand, progress_bars, show_progress


def shard_size(text: str) -> int | str:
    """--max-shard-size as huggingface_hub reads it: a byte count, or a number with KB, MB, GB or TB (not zero)."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*[KMGT]B", text.strip(), flags=re.IGNORECASE)
    if size and float(size.group(1)) > 0:
        return text
    raise argparse.ArgumentTypeError(f"expected bytes or a size such as 500MB or 5GB (KB, MB, GB, TB), got {text!r}")


def tolerance(text: str) -> float:
    """--atol / --rtol: a finite number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of 0 or more, got {text!r}")
    return value


def add_arguments(parser) -> None:
    """The conversion options, shared by `onepeace-hf convert` and conversion/convert_original_checkpoint.py."""
    from ..conversion import DTYPES  # noqa: PLC0415
    from ..original_checkpoint import CHECKPOINT_KINDS  # noqa: PLC0415

    parser.add_argument("--checkpoint", required=True, help="original .pt checkpoint or one-peace-vision.pkl")
    parser.add_argument("--output-dir", required=True, help="folder to write the transformers model into")
    parser.add_argument("--kind", choices=CHECKPOINT_KINDS, help="fail unless the checkpoint is of this kind")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of the saved weights (default: float32)")
    parser.add_argument(
        "--task", default="encoder", choices=["encoder", "pretraining"],
        help="encoder: drop the pretraining decoder; pretraining: keep it (OnePeaceForPretraining)",
    )
    parser.add_argument("--max-shard-size", default="5GB", type=shard_size,
                        help="largest safetensors shard: bytes, or a size in KB, MB, GB or TB (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous conversion in --output-dir")
    parser.add_argument("--no-model-card", action="store_true", help="do not write README.md")
    parser.add_argument("--base-model", help="Hub id of the converted pretrained model, named by fine-tuned cards")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    check = parser.add_argument_group("verification against the original's recorded outputs")
    check.add_argument("--expected-outputs", help="safetensors file of outputs recorded with the original code")
    check.add_argument("--expected-inputs", help="file holding the recorded inputs, if not the outputs file")
    check.add_argument("--atol", type=tolerance, help=f"absolute tolerance (default by --dtype: {tolerances(0)})")
    check.add_argument("--rtol", type=tolerance, help=f"relative tolerance (default by --dtype: {tolerances(1)})")
    hub = parser.add_argument_group("publishing")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    hub.add_argument("--private", action="store_true", help="create the repository as private")
    hub.add_argument("--revision", help="branch to push to (created if missing)")
    hub.add_argument("--commit-message", help="message of the Hub commit")


def tolerances(which: int) -> str:
    """The default --atol (0) or --rtol (1) of each dtype, as `output_verification` applies them."""
    from ..output_verification import DEFAULT_TOLERANCES  # noqa: PLC0415

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return ", ".join(f"{names[dtype]} {values[which]:g}" for dtype, values in DEFAULT_TOLERANCES.items())


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (a scheduler's kill, `timeout`) raises SystemExit, so that the conversion removes its hidden staging
    folder as it does on Ctrl-C (the output folder is only changed once the conversion is checked)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_parser(subparsers) -> None:
    parser = add_subcommand(subparsers, "convert", "convert an original checkpoint into a transformers folder", __doc__)
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    """Convert (and push); a missing input file or an unusable output folder prints `error: ...` and returns 2, a
    refused checkpoint or failed check returns 1."""
    from ..conversion import CheckpointConversionError, OutputFolderError, convert_checkpoint  # noqa: PLC0415
    from ..hub import HubPushError, check_push_access, push_folder_to_hub  # noqa: PLC0415
    from ..output_verification import OutputMismatchError  # noqa: PLC0415

    progress = show_progress(args.quiet)
    publishing = [name for name in ("private", "revision", "commit_message") if getattr(args, name)]
    if publishing and not args.push_to_hub:
        options = ", ".join("--" + name.replace("_", "-") for name in publishing)
        print(f"error: {options}: used only with --push-to-hub REPO_ID", file=sys.stderr)
        return 2
    if args.push_to_hub:  # a push that cannot happen is said before a conversion of many GB, not after
        try:
            check_push_access(args.push_to_hub)
        except HubPushError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    try:
        with progress_bars(progress), _terminate_as_exit():
            result = convert_checkpoint(
                args.checkpoint, args.output_dir, args.dtype, args.max_shard_size, task=args.task, kind=args.kind,
                expected_outputs=args.expected_outputs, expected_inputs=args.expected_inputs, atol=args.atol,
                rtol=args.rtol, model_card=not args.no_model_card, repo_id=args.push_to_hub,
                revision=args.revision if args.push_to_hub else None, base_model=args.base_model,
                overwrite=args.overwrite,
            )
    except (FileNotFoundError, OutputFolderError) as error:  # bad arguments, as in the other subcommands
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (CheckpointConversionError, OutputMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (OSError, SafetensorError) as error:  # unreadable input, no permission, disk full
        print(f"error: the conversion could not read or write a file: {error}", file=sys.stderr)
        return 1
    config = result.config
    print(f"Converted {args.checkpoint} ({result.kind}: {', '.join(config.modalities)}; {config.num_hidden_layers} "
          f"layers, hidden {config.hidden_size}) to {args.output_dir} as {result.model_class.__name__}; reloaded and "
          "verified bit-exact.")
    if result.verification is not None:
        print(f"Outputs match {result.verification.expected_file}:\n{result.verification.summary()}")
    if args.push_to_hub:
        try:
            with progress_bars(progress):
                pushed = push_folder_to_hub(args.output_dir, args.push_to_hub, private=args.private or None,
                                            revision=args.revision, commit_message=args.commit_message)
        except (HubPushError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"Pushed to {pushed.repo_url} ({pushed.revision}): {pushed.commit_url}")
    return 0
