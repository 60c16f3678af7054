"""Convert an original (fairseq) ONE-PEACE checkpoint into a transformers model folder.

    python conversion/convert_original_checkpoint.py --checkpoint one-peace.pt --output-dir onepeace-4b \
        --dtype bfloat16 --max-shard-size 5GB

The same as `onepeace-hf convert` (options and code in onepeace_hf.cli.convert). Supports pretraining checkpoints
(the denoising decoder is dropped, or kept with `--task pretraining`), retrieval checkpoints of any head type, and
classification checkpoints (image, audio, vision-language incl. NLVR2, audio-language incl. AQA, visual grounding),
which load as the matching `OnePeaceFor...` class. The folder is reloaded and compared tensor by tensor before the
command succeeds.
"""

import argparse
import sys

from onepeace_hf.cli.convert import add_arguments, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
