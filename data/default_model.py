"""The two ends of data/train_default_model.sh: a random starting folder, and the export of the trained model.

    python data/default_model.py init runs/default/start
    python data/default_model.py export runs/default/stage2/final src/onepeace_hf/default_model \
        --stage1_log runs/default/stage1/training_log.jsonl --stage1b_log runs/default/stage1b/training_log.jsonl \
        --stage2_log runs/default/stage2/training_log.jsonl

`export` keeps the encoder only (what AutoModel loads; the denoising decoder is for pretraining), stores it in
bfloat16 without tokenizer.json, measures retrieval on the digits test split with the stored folder, and writes the
model card from model_cards/tiny_default.md.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoProcessor

from onepeace_hf import (
    OnePeaceConfig,
    OnePeaceFeatureExtractor,
    OnePeaceForPretraining,
    OnePeaceImageProcessor,
    OnePeaceModel,
    OnePeaceProcessor,
)
from onepeace_hf.model_card import render_model_card
from onepeace_hf.training.digits import digits_retrieval_recall


REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "data" / "digits"
IMAGE_SIZE = 48
MAX_AUDIO_SAMPLES = 160_000
CONFIG = dict(
    # The 50264-row text embedding dominates the size (hidden 64: 3.2M of ~3.7M parameters, 6.4 MB in bf16).
    hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE_SIZE,
    # Stride 5*2^5 = 160 samples: 100 frames per second, ~50-100 frames per clip. Clips up to 10 s: 15 s would be
    # 1500 positions, more than the 1024 x 1024 relative-position table holds.
    audio_conv_spec=[[32, 10, 5], [32, 3, 2], [64, 3, 2], [64, 3, 2], [64, 2, 2], [64, 2, 2]],
    audio_max_samples=MAX_AUDIO_SAMPLES,
    audio_conv_pos_depth=2, audio_conv_pos_width=31,
    # Layer scale starts the residual branches at 1e-6, which a few hundred steps do not grow out of.
    use_layer_scale=False, drop_path_rate=0.0,
    decoder_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4},
)


def init(output: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    OnePeaceForPretraining(OnePeaceConfig(**CONFIG)).save_pretrained(output)
    image_processor = OnePeaceImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = OnePeaceProcessor(
        image_processor=image_processor, feature_extractor=OnePeaceFeatureExtractor(max_samples=MAX_AUDIO_SAMPLES)
    )
    processor.save_pretrained(output)


def last_values(log: Path) -> dict:
    merged = {}
    for line in log.read_text().splitlines():
        merged.update(json.loads(line))
    return merged


def export(trained: Path, output: Path, logs: dict[str, Path | None]) -> dict:
    model = OnePeaceModel.from_pretrained(trained)  # drops the decoder
    model.to(torch.bfloat16).save_pretrained(output)
    processor = AutoProcessor.from_pretrained(trained)
    processor.save_pretrained(output)
    # 3.5 MB we need not ship: without tokenizer.json, OnePeaceTokenizer rebuilds the same BPE from the package.
    (output / "tokenizer.json").unlink()
    processor = AutoProcessor.from_pretrained(output)
    stored = OnePeaceModel.from_pretrained(output, dtype=torch.float32).eval()
    recall = digits_retrieval_recall(stored, processor, DIGITS, "test")
    size_mb = sum(p.stat().st_size for p in output.iterdir() if p.is_file()) / 1e6
    fields = {key.replace("@", "_at_"): f"{value:.1f}" for key, value in recall.items()}
    train_recall = digits_retrieval_recall(stored, processor, DIGITS, "train")  # how far test falls behind
    fields.update({"train_" + key.replace("@", "_at_"): f"{value:.1f}" for key, value in train_recall.items()})
    fields["size_mb"] = f"{size_mb:.1f}"
    fields["parameters"] = f"{sum(p.numel() for p in stored.parameters()) / 1e6:.2f}M"
    for name, log in logs.items():
        fields[f"{name}_steps"] = str(last_values(log)["step"]) if log and log.exists() else "0"
    render_model_card("tiny_default", fields).save(output / "README.md")  # validated; a missing field is an error
    return {**recall, "size_mb": size_mb}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("init")
    start.add_argument("output", type=Path)
    start.add_argument("--seed", type=int, default=0)
    done = commands.add_parser("export")
    done.add_argument("trained", type=Path)
    done.add_argument("output", type=Path)
    done.add_argument("--stage1_log", type=Path)
    done.add_argument("--stage1b_log", type=Path)
    done.add_argument("--stage2_log", type=Path)
    args = parser.parse_args()
    if args.command == "init":
        init(args.output, args.seed)
    else:
        logs = {"stage1": args.stage1_log, "stage1b": args.stage1b_log, "stage2": args.stage2_log}
        print(json.dumps(export(args.trained, args.output, logs), indent=1))


if __name__ == "__main__":
    main()
