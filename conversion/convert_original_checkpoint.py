"""Convert an original (fairseq) ONE-PEACE checkpoint into a transformers model folder, optionally on the Hub.

    python conversion/convert_original_checkpoint.py --checkpoint one-peace.pt --output-dir onepeace-4b \
        --dtype bf16 --max-shard-size 5GB --expected-outputs expected_one-peace.safetensors --push-to-hub ORG/NAME

The same as `onepeace-hf convert` (options and code in onepeace_hf.cli.convert): every original kind (pretraining,
retrieval, classification, the vision branch), streamed shard by shard, reloaded and compared bit-exact, optionally
checked against outputs recorded with the original code, with a model card and a SHA256SUMS manifest. See
conversion/README.md.
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
