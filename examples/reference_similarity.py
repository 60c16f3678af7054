"""Main demo: convert the tiny reference checkpoint, then print text/image/audio similarity tables.

    python examples/reference_similarity.py [--checkpoint PATH] [--output-dir DIR]

The reference checkpoint has random weights, so the numbers carry no meaning: the demo shows the whole path
(original checkpoint -> conversion -> AutoModel/AutoProcessor -> embeddings) working on the sample assets.
"""

import argparse
from pathlib import Path

from transformers import AutoModel, AutoProcessor

import onepeace_hf  # noqa: F401  (registers the Auto classes)
from onepeace_hf.conversion import convert_checkpoint
from onepeace_hf.similarity import similarity_report


REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
TEXTS = ["cow", "dog", "elephant", "a photo of a dog playing in the snow"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="original checkpoint to convert (default: the tiny "
                        "reference one; its conversion in --output-dir is reused when there)")
    parser.add_argument("--output-dir", default=Path("outputs") / "onepeace-tiny-reference", type=Path)
    parser.add_argument("--assets", default=REFERENCE / "assets", type=Path)
    args = parser.parse_args()
    # A checkpoint given explicitly is always converted (over an earlier conversion in --output-dir).
    reuse = args.checkpoint is None and (args.output_dir / "config.json").exists()
    checkpoint = args.checkpoint or REFERENCE / "one_peace_tiny_pretrain.pt"
    if not reuse and not checkpoint.is_file():
        parser.error(f"--checkpoint {checkpoint}: no such file")
    if not args.assets.is_dir():
        parser.error(f"--assets {args.assets}: no such folder")

    if reuse:
        print(f"Using the earlier conversion in {args.output_dir} (pass --checkpoint to convert again)")
    else:
        convert_checkpoint(checkpoint, args.output_dir, overwrite=True)
        print(f"Converted {checkpoint.name} -> {args.output_dir}")
    model = AutoModel.from_pretrained(args.output_dir).eval()
    processor = AutoProcessor.from_pretrained(args.output_dir)
    images = sorted(args.assets.glob("*.JPEG"))
    audios = sorted(args.assets.glob("*.flac"))
    print(similarity_report(model, processor, TEXTS, images, audios))


if __name__ == "__main__":
    main()
