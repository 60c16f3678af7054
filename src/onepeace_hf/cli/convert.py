"""`onepeace-hf convert`: an original (fairseq) ONE-PEACE checkpoint to a transformers model folder.

The same options as conversion/convert_original_checkpoint.py, which is a thin wrapper over this module. Pretraining
checkpoints (the denoising decoder dropped, or kept with --task pretraining), retrieval checkpoints of any head type
and classification checkpoints are supported; the folder is reloaded and compared tensor by tensor before success.
"""

import sys

from .common import add_subcommand


def add_arguments(parser) -> None:
    """The conversion options, shared by `onepeace-hf convert` and conversion/convert_original_checkpoint.py."""
    from ..conversion import DTYPES  # noqa: PLC0415

    parser.add_argument("--checkpoint", required=True, help="original .pt checkpoint")
    parser.add_argument("--output-dir", required=True, help="folder to write the transformers model into")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument(
        "--task", default="encoder", choices=["encoder", "pretraining"],
        help="encoder: drop the pretraining decoder; pretraining: keep it (OnePeaceForPretraining)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB or 500MB")


def add_parser(subparsers) -> None:
    parser = add_subcommand(subparsers, "convert", "convert an original checkpoint into a transformers folder", __doc__)
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    """Convert; a refused checkpoint prints `error: ...` and returns 1 (the conversion itself failed)."""
    from ..conversion import CheckpointConversionError, convert_checkpoint  # noqa: PLC0415

    try:
        config = convert_checkpoint(args.checkpoint, args.output_dir, args.dtype, args.max_shard_size, task=args.task)
    except (CheckpointConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {args.checkpoint} ({', '.join(config.modalities)}; {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}) to {args.output_dir}; reloaded and verified bit-exact.")
    return 0
