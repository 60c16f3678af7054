"""Convert an original (fairseq) ONE-PEACE checkpoint into a transformers model folder.

    python conversion/convert_original_checkpoint.py --checkpoint one-peace.pt --output-dir onepeace-4b \
        --dtype bfloat16 --max-shard-size 5GB

Supports pretraining checkpoints (the denoising decoder is dropped, or kept with `--task pretraining`), retrieval
checkpoints of any head type, and classification checkpoints (image, audio, vision-language incl. NLVR2, audio-language
incl. AQA, visual grounding), which load as the matching `OnePeaceFor...` class. The folder is reloaded and compared
tensor by tensor before the command succeeds.
"""

import argparse
import sys

from onepeace_hf.conversion import DTYPES, CheckpointConversionError, convert_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="original .pt checkpoint")
    parser.add_argument("--output-dir", required=True, help="folder to write the transformers model into")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument(
        "--task", default="encoder", choices=["encoder", "pretraining"],
        help="encoder: drop the pretraining decoder; pretraining: keep it (OnePeaceForPretraining)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB or 500MB")
    args = parser.parse_args(argv)
    try:
        config = convert_checkpoint(
            args.checkpoint, args.output_dir, args.dtype, args.max_shard_size, task=args.task
        )
    except (CheckpointConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {args.checkpoint} ({', '.join(config.modalities)}; {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}) to {args.output_dir}; reloaded and verified bit-exact.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
