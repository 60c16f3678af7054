"""Training throughput: samples/s of one optimizer step (forward + backward + AdamW) per objective and size.

Objectives: `retrieval` (image-text contrast, what fine-tuning runs) and `pretrain-vl` / `pretrain-al` (the full
pretraining criteria: unmasked, masked and joint passes plus the denoising decoder, masks from the package's masking
collator). The model is randomly initialized (this measures speed, not quality) and trained in train mode with the
original's optimizer groups. Every objective is timed in the same process; `--gradient-checkpointing` and `--dtype`
(autocast) apply to all. `--compile` also times a copy of the model whose fusion layers are compiled one by one
(regional compilation, as the trainer does under `accelerate launch --dynamo_use_regional_compilation`), same weights,
its own optimizer. Steps alternate between objectives (and between the eager and compiled copies) so that a change in
the machine's load hits them alike; the reported time is the median step, compilation done in the warmup steps.

Run from the repository root:
    PYTHONPATH=src .venv/bin/python benchmarks/train.py --size tiny
    PYTHONPATH=src .venv/bin/python benchmarks/train.py --size base --batch-size 4 --iters 3 --warmup 1
    PYTHONPATH=src .venv/bin/python benchmarks/train.py --size base --batch-size 4 --objectives pretrain-vl --compile
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from checks import HelpFormatter, check_output_file, non_negative_int, positive_int  # noqa: E402  (same folder)
from embed import SIZES  # noqa: E402  (benchmarks/embed.py, same folder)

from onepeace_hf import OnePeaceConfig, OnePeaceForPretraining  # noqa: E402
from onepeace_hf.losses import (  # noqa: E402
    AudioTextPretrainingLoss,
    ImageTextPretrainingLoss,
    RetrievalContrastiveLoss,
)
from onepeace_hf.training import create_optimizer, enable_activation_checkpointing  # noqa: E402
from onepeace_hf.training.compilation import compile_fusion_layers, training_recompile_limit  # noqa: E402


OBJECTIVES = ("retrieval", "pretrain-vl", "pretrain-al")
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pretraining_config(size: str, layers: int | None = None, image_size: int = 256) -> OnePeaceConfig:
    overrides = dict(SIZES[size], image_size=image_size)
    # The decoder of the original's recipes (768 wide, 2 layers) for base / 4b; the reference checkpoint's for tiny.
    if size == "tiny":
        overrides["decoder_config"] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2}
    if layers:
        overrides["num_hidden_layers"] = layers
    return OnePeaceConfig(**overrides)


def make_batch(objective: str, config: OnePeaceConfig, args) -> dict:
    """Random inputs shaped as the processor gives them, plus masks for the pretraining objectives."""
    from onepeace_hf.masking import OnePeaceMaskingCollator  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 50000, (args.batch_size, args.text_length), generator=generator)
    input_ids[:, -1] = config.eos_token_id
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if objective in ("retrieval", "pretrain-vl"):
        batch["pixel_values"] = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    else:
        samples = round(args.audio_seconds * 16000)
        batch["input_values"] = torch.randn(args.batch_size, samples, generator=generator)
        batch["padding_mask"] = torch.ones(args.batch_size, samples, dtype=torch.long)
    if objective == "retrieval":
        return batch
    stage = "image_text" if objective == "pretrain-vl" else "audio_text"
    return OnePeaceMaskingCollator.for_model(config, stage=stage, seed=0).add_masks(batch)


@training_recompile_limit()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--layers", type=positive_int, default=None, help="override the number of fusion layers")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--text-length", type=positive_int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--audio-seconds", type=float, default=5.0)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="autocast dtype (weights stay fp32)")
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time a copy with compiled fusion layers")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--iters", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.image_size < 16 or args.image_size % 16:
        parser.error("--image-size must be a positive multiple of 16")
    if not 1 <= args.audio_seconds <= 15:
        parser.error("--audio-seconds must be between 1 and 15")
    if args.json is not None:
        check_output_file(parser, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = pretraining_config(args.size, args.layers, args.image_size)
    model = OnePeaceForPretraining._from_config(config, attn_implementation=args.attn).train()
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    variants = {"uncompiled": model}
    if args.compile:
        variants["compiled"] = copy.deepcopy(model)
        compile_fusion_layers(variants["compiled"])
    optimizers = {name: create_optimizer(m, learning_rate=1e-5, layer_decay=0.9) for name, m in variants.items()}
    criteria = {"retrieval": RetrievalContrastiveLoss(), "pretrain-vl": ImageTextPretrainingLoss(),
                "pretrain-al": AudioTextPretrainingLoss()}
    batches = {objective: make_batch(objective, config, args) for objective in args.objectives}
    autocast = DTYPES[args.dtype]

    def step(objective, variant):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = criteria[objective](variants[variant], **batches[objective])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(variants[variant].parameters(), 3.0)
        optimizers[variant].step()
        optimizers[variant].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    runs = [(objective, variant) for objective in args.objectives for variant in variants]
    times = {run: [] for run in runs}
    for i in range(args.warmup + args.iters):
        for run in runs:
            elapsed = step(*run)
            if i >= args.warmup:
                times[run].append(elapsed)

    params = sum(p.numel() for p in model.parameters())
    print(f"{args.size} ({params / 1e6:.1f}M params incl. decoder), batch {args.batch_size}, {args.dtype}, "
          f"{args.attn}, checkpointing={args.gradient_checkpointing}, threads={torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'objective':<12} {'layers':<10} {'ms/step':>10} {'samples/s':>10} {'vs uncompiled':>13}")
    results = {}
    for (objective, variant), values in times.items():
        median = statistics.median(values)
        speedup = statistics.median(times[objective, "uncompiled"]) / median
        results.setdefault(objective, {})[variant] = {"ms_per_step": 1000 * median,
                                                      "samples_per_s": args.batch_size / median,
                                                      "speedup_vs_uncompiled": speedup}
        print(f"{objective:<12} {variant:<10} {1000 * median:>10.1f} {args.batch_size / median:>10.2f} "
              f"{speedup:>12.2f}x")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        header = dict(torch=torch.__version__, threads=torch.get_num_threads(), params=params,
                      machine=platform.processor() or platform.machine())
        args.json.write_text(json.dumps({"args": settings, "header": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
