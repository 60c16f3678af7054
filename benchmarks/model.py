"""Whole-model speed: embedding throughput per modality and one pretraining step, with model FLOP utilization.

Three measurements in one process, on randomly initialized weights (this measures speed, not quality):
    peak     the device's matmul FLOP/s in the compute dtype: the best of several timed square matmuls
             (`--peak-size`), the denominator of every MFU below;
    embed    `get_<modality>_features` per modality and attention implementation (eager, sdpa, onepeace_flex), timed
             as `embed.py` does (implementations take turns call by call): items/s, ms per batch, peak memory, and
             the model FLOP/s and MFU of those calls;
    step     one pretraining step (`--objective`, default pretrain-vl: the image-text criteria with the denoising
             decoder, masks from the package's masking collator) = forward + backward + gradient clipping + AdamW,
             with activation checkpointing unless `--no-gradient-checkpointing`: ms per step, samples/s, peak memory,
             model FLOP/s and MFU.

Model FLOPs are counted, not estimated from the parameter count: torch's `FlopCounterMode` over one forward with
eager attention (every matmul and convolution is counted; the fused kernels are not visible to it). A training step
counts 3x its forward (the backward costs two forwards); the forward recomputed by activation checkpointing is not
model work and is not counted, so MFU = 3 x forward FLOPs / step time / peak FLOP/s.

`--fuse-projections` runs both parts with `model.fuse_projections()`. `--compile` compiles the embedding calls
(`torch.compile` of each `get_<modality>_features`) and, in the step, each fusion layer on its own (regional
compilation, what the trainer does under `accelerate launch --dynamo_backend inductor
--dynamo_use_regional_compilation`; whole-step compilation of the criteria's several passes takes far longer).

On CPU FlexAttention has no backward, so the step is not timed with onepeace_flex there (the model would fall back
to sdpa). Memory is measured as in `embed.py` (CUDA: `max_memory_allocated`; CPU: sampled RSS).

Run from the repository root:
    PYTHONPATH=src .venv/bin/python benchmarks/model.py --size tiny
    PYTHONPATH=src .venv/bin/python benchmarks/model.py --size base --batch-size 4 --train-batch-size 2 --iters 3
    # one GPU: the 4B model in bf16 (weights too: fp32 weights plus AdamW state need ~64 GB before activations)
    python benchmarks/model.py --size 4b --device cuda --dtype bfloat16 --param-dtype bfloat16 \\
        --modalities image --batch-size 64 --train-batch-size 16
"""

import argparse
import json
import platform
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # embed.py and train.py, same folder

from checks import HelpFormatter, positive_int  # noqa: E402  (benchmarks/checks.py, same folder)
from embed import (  # noqa: E402
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    MODALITIES,
    SIZES,
    benchmark as embedding_benchmark,
    build_config,
    add_speed_options,
    build_model,
    check_args,
    leave_out_flex_where_it_runs_sdpa,
    make_inputs,
    measure_memory,
    memory_method,
    time_implementations,
    timed_call,
)
from train import make_batch, pretraining_config  # noqa: E402

from onepeace_hf import OnePeaceForPretraining  # noqa: E402
from onepeace_hf.flex_attention import FUSED_ATTENTION  # noqa: E402
from onepeace_hf.losses import AudioTextPretrainingLoss, ImageTextPretrainingLoss  # noqa: E402
from onepeace_hf.training import create_optimizer, enable_activation_checkpointing  # noqa: E402
from onepeace_hf.training.compilation import compile_fusion_layers, training_recompile_limit  # noqa: E402


OBJECTIVES = {"pretrain-vl": ImageTextPretrainingLoss, "pretrain-al": AudioTextPretrainingLoss}
TRAINING_STEP_FACTOR = 3  # forward + backward (two forwards' worth of matmuls); recompute is not model work


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of `size` x `size` matmuls in `dtype` on `device` (the denominator of MFU), through `torch.mm` and
    through `F.linear` (the model's layers): on CPU the two can take different kernels (bf16 without AMX: linear's
    oneDNN path is several times faster than mm's), and the faster one is what the hardware can do."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    out = torch.empty_like(a)
    per_call = 8 if device.type == "cuda" else 1  # amortize the synchronization on fast devices

    def matmuls():
        for _ in range(per_call):
            torch.mm(a, b, out=out)

    def linears():
        for _ in range(per_call):
            torch.nn.functional.linear(a, b)

    best = float("inf")
    for kernel in (matmuls, linears):
        kernel()  # warmup (kernel selection, thread pool)
        best = min(best, *(timed_call(kernel, device) for _ in range(repeats)))
    return 2 * size**3 * per_call / best


def forward_flops(model: torch.nn.Module, fn) -> int:
    """FLOPs of one call of `fn`, counted with eager attention (whose matmuls FlopCounterMode sees).

    Runs in the caller's grad mode: FlopCounterMode's module tracker fails on a parameter slice taken under no_grad
    (the decoder's position embeddings), so the training step is counted with grad enabled (and no backward).
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        model.set_attn_implementation(previous)
    return counter.get_total_flops()


def add_utilization(row: dict, flops: int, seconds: float, peak: float) -> dict:
    row.update(model_flops=flops, tflops_per_s=flops / seconds / 1e12, mfu=flops / seconds / peak)
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Embedding throughput
# ----------------------------------------------------------------------------------------------------------------------


def embedding_rows(args, device: torch.device, dtype: torch.dtype, peak: float) -> tuple[list[dict], int]:
    config = build_config(args.size, args.modalities, args.layers, args.image_size)
    args = argparse.Namespace(**{**vars(args), "attn": list(args.attn)})  # the step keeps its own list
    leave_out_flex_where_it_runs_sdpa(args, config, device)
    model = build_model(config, dtype, device, args.fuse_projections)
    flops = {}
    for modality in args.modalities:
        inputs = make_inputs(modality, config, args, dtype, device)
        features = getattr(model, f"get_{modality}_features")
        with torch.no_grad():
            flops[modality] = forward_flops(model, lambda: features(**inputs))
    rows = embedding_benchmark(model, config, args, dtype, device)
    for row in rows:
        add_utilization(row, flops[row["modality"]], row["ms_per_batch"] / 1e3, peak)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    return rows, num_params


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining step
# ----------------------------------------------------------------------------------------------------------------------


@training_recompile_limit()  # with --compile: a graph per layer form and attention implementation
def pretraining_step_rows(args, device: torch.device, dtype: torch.dtype, peak: float) -> tuple[list[dict], int]:
    param_dtype = DTYPES[args.param_dtype]
    config = pretraining_config(args.size, args.layers, args.image_size)
    with torch.device(device):
        model = OnePeaceForPretraining._from_config(config, dtype=param_dtype).train()
    if args.fuse_projections:
        model.fuse_projections()
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = create_optimizer(model, learning_rate=1e-5, layer_decay=0.9)
    criterion = OBJECTIVES[args.objective]()
    shapes = SimpleNamespace(batch_size=args.train_batch_size, text_length=args.text_length,
                             image_size=args.image_size, audio_seconds=args.audio_seconds)
    batch = {
        name: value.to(device, param_dtype) if value.is_floating_point() else value.to(device)
        for name, value in make_batch(args.objective, config, shapes).items()
    }
    # Mixed precision when the compute dtype is narrower than the weights; otherwise the weights' own dtype.
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != param_dtype else nullcontext

    def loss():
        with autocast():
            return criterion(model, **batch)["loss"]

    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = TRAINING_STEP_FACTOR * forward_flops(model, loss)  # counted eagerly: the counter sees every matmul
    if args.compile:
        compile_fusion_layers(model)
    attns = [a for a in args.attn if not (device.type == "cpu" and a == FUSED_ATTENTION)]
    if len(attns) < len(args.attn):
        print(f"not timing the step with {FUSED_ATTENTION} on CPU (no FlexAttention backward: it would be sdpa)",
              file=sys.stderr)
    times = time_implementations(model, step, attns, device, args.warmup, args.iters)
    rows = []
    for attn in attns:
        model.set_attn_implementation(attn)
        peak_mib, growth_mib = measure_memory(step, device)
        median = statistics.median(times[attn])
        row = dict(objective=args.objective, attn=attn, batch_size=args.train_batch_size,
                   gradient_checkpointing=args.gradient_checkpointing, ms_per_step=median * 1e3,
                   ms_per_step_min=min(times[attn]) * 1e3, samples_per_s=args.train_batch_size / median,
                   peak_mem_mib=peak_mib, call_mem_mib=growth_mib)
        rows.append(add_utilization(row, flops, median, peak))
    num_params = sum(p.numel() for p in model.parameters())
    del model, optimizer
    return rows, num_params


# ----------------------------------------------------------------------------------------------------------------------
# Report and CLI
# ----------------------------------------------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]):
    cells = [[format(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(header), *(len(line[i]) for line in cells)) for i, (header, _, _) in enumerate(columns)]
    print(f"\n{title}")
    for line in [[header for header, _, _ in columns], *cells]:
        print("  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)))


def report(header: dict, embedding: list[dict], steps: list[dict]):
    for key, value in header.items():
        print(f"{key:>13}: {value}")
    memory = [("peak MiB", "peak_mem_mib", ".0f"), ("TFLOP/s", "tflops_per_s", ".3f"), ("MFU", "mfu", ".1%")]
    if embedding:
        print_table("embedding (get_<modality>_features, no grad)", embedding, [
            ("modality", "modality", ""), ("attn", "attn", ""), ("batch", "batch_size", "d"), ("seq", "seq_len", "d"),
            ("items/s", "items_per_s", ".2f"), ("ms/batch", "ms_per_batch", ".1f"), *memory,
        ])
    if steps:
        print_table("pretraining step (forward + backward + AdamW)", steps, [
            ("objective", "objective", ""), ("attn", "attn", ""), ("batch", "batch_size", "d"),
            ("ms/step", "ms_per_step", ".1f"), ("samples/s", "samples_per_s", ".2f"), *memory,
        ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size (4b = the released architecture)")
    parser.add_argument("--layers", type=int, help="override the number of fusion layers (e.g. a slice of 4b)")
    parser.add_argument("--parts", nargs="+", choices=("embed", "step"), default=["embed", "step"])
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES))
    parser.add_argument("--attn", nargs="+", choices=ATTN_IMPLEMENTATIONS, help="default: all the device runs")
    parser.add_argument("--objective", choices=OBJECTIVES, default="pretrain-vl")
    parser.add_argument("--batch-size", type=int, default=8, help="embedding batch size")
    parser.add_argument("--train-batch-size", type=int, default=4, help="pretraining step batch size")
    parser.add_argument("--text-length", type=int, default=32, help="tokens per text, </s> included")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels, a multiple of 16")
    parser.add_argument("--audio-seconds", type=float, default=5.0, help="clip length (1 to 15 s at 16 kHz)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (and the peak matmul's)")
    parser.add_argument("--param-dtype", choices=DTYPES, default="float32",
                        help="training weights; narrower --dtype runs under autocast")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-size", type=positive_int,
                        help="side of the peak matmul (default: 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls/steps per implementation")
    parser.add_argument("--iters", type=int, default=5, help="timed calls/steps per implementation")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_speed_options(parser)  # --compile: the embedding calls and the step's fusion layers; --fuse-projections: both
    parser.add_argument("--json", type=Path, help="results file (default: model_<device>_<dtype>.json next to this)")
    args = check_args(parser, parser.parse_args(argv))
    if args.train_batch_size < 1:
        parser.error("--train-batch-size must be >= 1")
    if args.param_dtype not in ("float32", args.dtype):
        parser.error("--param-dtype must be float32 (mixed precision) or the compute --dtype")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)

    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    print(f"measuring the peak {args.dtype} matmul ({peak_size}^2)...", file=sys.stderr)
    peak = matmul_peak_flops(device, dtype, peak_size)
    embedding, embedding_params = embedding_rows(args, device, dtype, peak) if "embed" in args.parts else ([], None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    steps, step_params = [], None
    if "step" in args.parts:
        print(f"timing the {args.objective} step...", file=sys.stderr)
        steps, step_params = pretraining_step_rows(args, device, dtype, peak)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    layers = args.layers or pretraining_config(args.size).num_hidden_layers
    header = {
        "model": f"{args.size}, {layers} fusion layers"
        + (f", {embedding_params / 1e6:.1f}M params (embedding)" if embedding_params else "")
        + (f", {step_params / 1e6:.1f}M params with the decoder (step)" if step_params else ""),
        "device": f"{device_name}, compute {args.dtype}, weights for the step {args.param_dtype}{threads}",
        "peak": f"{peak / 1e12:.3f} TFLOP/s ({peak_size}^2 {args.dtype} matmul, best of 5)",
        "inputs": f"text {args.text_length} tokens, image {args.image_size}px, audio {args.audio_seconds:g} s; "
        f"warmup {args.warmup}, iters {args.iters} (medians)",
        "step": f"{args.objective}, activation checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"model FLOPs = {TRAINING_STEP_FACTOR} x counted forward",
        "options": f"fused projections {'on' if args.fuse_projections else 'off'}, "
        f"compiled embedding calls and step layers {'on' if args.compile else 'off'}",
        "memory": memory_method(device),
        "versions": f"torch {torch.__version__}, python {platform.python_version()}",
    }
    report(header, embedding, steps)
    if any(row["mfu"] > 1 for row in embedding + steps):
        print("\nnote: MFU above 100% means the model's matmuls ran faster than the measured peak, so that peak is not"
              f" the device's {args.dtype} peak (a CPU without native {args.dtype} matmuls, or a too small"
              " --peak-size): read the TFLOP/s column instead.", file=sys.stderr)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "header": header,
               "peak_flops_per_s": peak, "embedding": embedding, "pretraining_step": steps}
    out = args.json or Path(__file__).with_name(f"model_{device.type}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
