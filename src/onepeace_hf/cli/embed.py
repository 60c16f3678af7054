"""`onepeace-hf embed`: texts, images and audio files to an embeddings file.

Output formats, chosen by the suffix of --output:
- .safetensors: one (n, hidden) float32 tensor per modality, named "text" / "image" / "audio"; the inputs (texts or
  paths) as JSON lists in the header metadata under the same names, plus "model" and "normalized".
- .npz: the same arrays, plus "<modality>_inputs" string arrays (no pickle needed to load).
- .npy: a single (n, hidden) array; only for inputs of one modality, rows in input order.

A file that cannot be read (or that the processor refuses: NaN samples, 32-bit pixel values) stops the run before
anything is written. With --skip-unreadable it is left out instead, named on stderr and listed under "skipped" (the
safetensors metadata, or the "skipped_inputs" array of .npz), so that one bad file in a large folder does not cost
the rest; .npy, which has no room to say which rows are missing, is refused then.
"""

import json
from pathlib import Path

import numpy as np

from .common import CliError, add_model_argument, add_subcommand, load_model, positive_int, show_progress
from .common import prepare_output
from .embedding import add_skip_argument, embed_readable
from .inputs import add_input_arguments, inputs_from_args


FORMATS = (".safetensors", ".npz", ".npy")


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers, "embed", "embed texts, images and audio files into a .safetensors / .npz / .npy file", __doc__,
    )
    add_input_arguments(parser)
    parser.add_argument("--output", "-o", type=Path, required=True, help=f"output file ({', '.join(FORMATS)})")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="inputs per forward pass (default 32)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="store the raw projected [CLS] embeddings instead of L2-normalized ones")
    add_skip_argument(parser, "files (not with .npy)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_model_argument(parser)
    parser.set_defaults(run=run)


def write_embeddings(path: Path, embeddings: dict, names: dict, model: str, normalized: bool,
                     skipped: list[str] | None = None) -> None:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file  # noqa: PLC0415

        metadata = {m: json.dumps(names[m]) for m in embeddings}
        metadata.update(model=model, normalized=str(normalized).lower())
        if skipped is not None:
            metadata["skipped"] = json.dumps(skipped)
        save_file({m: e.contiguous() for m, e in embeddings.items()}, path, metadata=metadata)
    elif path.suffix.lower() == ".npz":
        arrays = {m: e.numpy() for m, e in embeddings.items()}
        arrays.update({f"{m}_inputs": np.array(names[m], dtype=str) for m in embeddings})
        if skipped is not None:
            arrays["skipped_inputs"] = np.array(skipped, dtype=str)
        with open(path, "wb") as file:  # a file, not a name: NumPy would append ".npz" to "out.NPZ"
            np.savez(file, **arrays)
    else:
        (embedding,) = embeddings.values()
        with open(path, "wb") as file:
            np.save(file, embedding.numpy())


def run(args) -> int:
    suffix = args.output.suffix.lower()
    if suffix not in FORMATS:
        raise CliError(f"unsupported output format {args.output.suffix or '(no suffix)'!r}; use one of {FORMATS}")
    inputs = inputs_from_args(args)
    present = inputs.present()
    if not present:
        raise CliError("nothing to embed: give --text, --image or --audio (or a --*-list file)")
    if suffix == ".npy" and len(present) > 1:
        raise CliError(f".npy holds one array, but inputs of {len(present)} modalities were given; use .npz or "
                       ".safetensors")
    if args.skip_unreadable and suffix == ".npy":
        raise CliError("--skip-unreadable needs .npz or .safetensors, which record the inputs each row belongs to")
    prepare_output(args.output)
    progress = show_progress(args.quiet)
    model, processor = load_model(args.model, present, args.device, progress)
    embeddings, names, left_out = {}, {}, []
    for m in present:
        embeddings[m], kept, skipped = embed_readable(model, processor, m, inputs.values[m], args.batch_size,
                                                      progress, args.skip_unreadable, not args.no_normalize)
        names[m] = [str(value) for value in kept]
        left_out += skipped
    try:
        write_embeddings(args.output, embeddings, names, str(args.model), not args.no_normalize,
                         left_out if args.skip_unreadable else None)
    except OSError as error:  # a path that passed prepare_output but refuses files (/proc, a full disk)
        raise CliError(f"cannot write {args.output} ({error.strerror or error})", exit_code=1) from None
    counts = ", ".join(f"{m} {len(e)}" for m, e in embeddings.items())
    note = f" ({len(left_out)} unreadable files left out, listed above)" if left_out else ""
    print(f"Wrote embeddings (dim {model.config.hidden_size}) to {args.output}: {counts}{note}")
    return 0
