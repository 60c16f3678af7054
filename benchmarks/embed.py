"""Embedding throughput and peak memory of OnePeaceModel, per modality and attention implementation.

For each modality (text, image, audio) and each attention implementation (eager, sdpa, onepeace_flex) this times
`get_text_features` / `get_image_features` / `get_audio_features` on random inputs and reports items/s, ms per
batch and peak memory. The weights are random (this measures speed, not quality). All implementations of a run
share one model (the implementation is switched with `model.set_attn_implementation`), and each is reported as a
speed ratio over eager measured in the same process. onepeace_flex compiles its kernel once per shape during the
warmup calls (give `--warmup` >= 1).

Timing: `--warmup` untimed calls per implementation, then `--iters` timed calls each (`time.perf_counter`, with
`torch.cuda.synchronize` on GPU), the implementations taking turns call by call so that a change in the machine's
load hits them alike; ms/batch is the median call, items/s = batch size / median.
Memory: one extra call after the timed ones, so that measuring does not perturb the timing.
    cuda: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` ("peak", weights included) and its
          growth over the memory allocated before the call ("+call").
    cpu:  process RSS sampled every millisecond with psutil ("peak") and its growth over the RSS before the call
          ("+call"; a lower bound, as memory the allocator reuses without touching new pages is not seen); without
          psutil, `resource.getrusage(RUSAGE_SELF).ru_maxrss` before/after the call, whose growth is a weaker lower
          bound (0 when the process peaked higher earlier, e.g. while building the model).

Only the branches of the requested modalities are built (the per-modality FFNs of the others are never run).

Run from the repository root:
    PYTHONPATH=src .venv/bin/python benchmarks/embed.py --size tiny
    PYTHONPATH=src .venv/bin/python benchmarks/embed.py --size base --batch-size 2 --iters 3 --warmup 1
    PYTHONPATH=src .venv/bin/python benchmarks/embed.py --size 4b --layers 4 --modalities image --json out.json
"""

import argparse
import json
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from checks import HelpFormatter, check_output_file  # benchmarks/checks.py, same folder

try:
    from onepeace_hf import OnePeaceConfig, OnePeaceModel
except ImportError:  # run from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from onepeace_hf import OnePeaceConfig, OnePeaceModel
from onepeace_hf.flex_attention import MIN_CPU_HEAD_DIM

try:
    import psutil
except ImportError:
    psutil = None


MODALITIES = ("text", "image", "audio")
# onepeace_flex: FlexAttention with the bias read in-kernel (flex_attention.py); onepeace_triton: our Triton kernel
# (triton_attention.py), CUDA only: on CPU it would be sdpa.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "onepeace_flex", "onepeace_triton")
CUDA_ONLY_ATTN = ("onepeace_triton",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20

# Architecture overrides of OnePeaceConfig per --size; "4b" is the config defaults (the released model).
SIZES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        audio_conv_spec=[[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
        audio_conv_pos_groups=16,
    ),
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "4b": dict(),
}


# ----------------------------------------------------------------------------------------------------------------------
# Model and inputs
# ----------------------------------------------------------------------------------------------------------------------


def build_config(size: str, modalities: list[str], layers: int | None, image_size: int) -> OnePeaceConfig:
    overrides = dict(SIZES[size], modalities=list(modalities), image_size=image_size)
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    return OnePeaceConfig(**overrides)


def build_model(
    config: OnePeaceConfig, dtype: torch.dtype, device: torch.device, fuse_projections: bool = False
) -> OnePeaceModel:
    """Randomly initialized model, created directly on `device` in `dtype`, in eval mode."""
    with torch.device(device):
        model = OnePeaceModel._from_config(config, dtype=dtype)
    return model.eval().fuse_projections() if fuse_projections else model.eval()


def make_inputs(modality: str, config: OnePeaceConfig, args, dtype: torch.dtype, device: torch.device) -> dict:
    """Random keyword arguments of `get_<modality>_features`, shaped as the processor would produce them."""
    generator = torch.Generator().manual_seed(0)
    batch = args.batch_size
    if modality == "text":
        input_ids = torch.randint(4, config.vocab_size, (batch, args.text_length), generator=generator)
        input_ids[:, -1] = config.eos_token_id
        return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    if modality == "image":
        pixels = torch.randn(batch, 3, args.image_size, args.image_size, generator=generator)
        return {"pixel_values": pixels.to(device, dtype)}
    samples = round(args.audio_seconds * config.audio_sampling_rate)
    waveform = torch.randn(batch, samples, generator=generator)
    mask = torch.ones(batch, samples, dtype=torch.long)
    return {"input_values": waveform.to(device, dtype), "padding_mask": mask.to(device)}


def sequence_length(modality: str, config: OnePeaceConfig, args) -> int:
    """Length of the encoder sequence (CLS slot included) for the benchmark inputs."""
    if modality == "text":
        return args.text_length + 1
    if modality == "image":
        return (args.image_size // 16) ** 2 + 1
    return config.audio_frame_count(round(args.audio_seconds * config.audio_sampling_rate)) + 1


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, device: torch.device) -> float:
    """Seconds one call of `fn` takes (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_implementations(model: OnePeaceModel, fn, attns: list[str], device, warmup: int, iters: int) -> dict:
    """Seconds of each timed call of `fn` per attention implementation, after `warmup` untimed calls of each.

    The implementations take turns call by call, so that a change in the machine's load hits them alike.
    """
    for attn in attns:
        model.set_attn_implementation(attn)
        for _ in range(warmup):
            fn()
    times = {attn: [] for attn in attns}
    for _ in range(iters):
        for attn in attns:
            model.set_attn_implementation(attn)
            times[attn].append(timed_call(fn, device))
    return times


class RssSampler:
    """Samples this process's RSS in a background thread; `peak` is the largest value seen."""

    def __init__(self, interval: float = 0.001):
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated of one call (peak includes weights; +call = growth during the call)"
    if psutil is not None:
        return "process RSS sampled every 1 ms with psutil during one call (+call = growth, a lower bound)"
    return "ru_maxrss before/after one call (psutil not installed; +call = growth, a weak lower bound)"


def ru_maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_memory(fn, device: torch.device) -> tuple[float, float]:
    """(peak, growth over the start) in MiB during one call of `fn`."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    elif psutil is not None:
        with RssSampler() as sampler:
            before = sampler.peak
            fn()
        peak = sampler.peak
    else:
        before = ru_maxrss_bytes()
        fn()
        peak = ru_maxrss_bytes()
    return peak / MIB, max(0, peak - before) / MIB


def benchmark(model: OnePeaceModel, config: OnePeaceConfig, args, dtype, device) -> list[dict]:
    results = []
    for modality in args.modalities:
        inputs = make_inputs(modality, config, args, dtype, device)
        features = getattr(model, f"get_{modality}_features")
        if args.compile:  # compiled during the warmup calls, once per implementation
            features = torch.compile(features)

        def call():
            return features(**inputs)

        with torch.inference_mode():
            times = time_implementations(model, call, args.attn, device, args.warmup, args.iters)
            for attn in args.attn:
                model.set_attn_implementation(attn)
                peak_mib, growth_mib = measure_memory(call, device)
                median = statistics.median(times[attn])
                results.append(
                    dict(
                        modality=modality,
                        attn=attn,
                        batch_size=args.batch_size,
                        seq_len=sequence_length(modality, config, args),
                        items_per_s=args.batch_size / median,
                        ms_per_batch=median * 1e3,
                        ms_per_batch_min=min(times[attn]) * 1e3,
                        peak_mem_mib=peak_mib,
                        call_mem_mib=growth_mib,
                    )
                )
        print(f"  done: {modality}", file=sys.stderr, flush=True)
    return results


def speedups(results: list[dict], baseline: str = "eager") -> dict[str, dict[str, float]]:
    """items/s of every implementation over the baseline's, per modality (same process)."""
    ratios = {}
    for modality in dict.fromkeys(r["modality"] for r in results):
        rows = {r["attn"]: r for r in results if r["modality"] == modality}
        if baseline in rows:
            ratios[modality] = {
                attn: row["items_per_s"] / rows[baseline]["items_per_s"]
                for attn, row in rows.items()
                if attn != baseline
            }
    return ratios


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def print_report(results: list[dict], ratios: dict, header: dict):
    for key, value in header.items():
        print(f"{key:>10}: {value}")
    columns = ["modality", "attn", "batch", "seq", "items/s", "ms/batch", "min ms", "peak MiB", "+call MiB"]
    widths = [8, 13, 5, 5, 10, 10, 10, 10, 10]
    print()
    print("  ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in results:
        cells = [
            r["modality"], r["attn"], r["batch_size"], r["seq_len"], f"{r['items_per_s']:.2f}",
            f"{r['ms_per_batch']:.1f}", f"{r['ms_per_batch_min']:.1f}", f"{r['peak_mem_mib']:.0f}",
            f"{r['call_mem_mib']:.0f}",
        ]
        print("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    if any(ratios.values()):
        print("\nspeed over eager (items/s ratio, same process):")
        for modality, by_attn in ratios.items():
            print("  " + modality + ": " + ", ".join(f"{attn} {ratio:.2f}x" for attn, ratio in by_attn.items()))


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size (4b = the released architecture)")
    parser.add_argument("--layers", type=int, help="override the number of fusion layers (e.g. a slice of 4b)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-length", type=int, default=32, help="tokens per text, </s> included")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels, a multiple of 16")
    parser.add_argument("--audio-seconds", type=float, default=5.0, help="clip length (1 to 15 s at 16 kHz)")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES))
    parser.add_argument("--attn", nargs="+", choices=ATTN_IMPLEMENTATIONS, help="default: all the device runs")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--iters", type=int, default=10, help="timed calls")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine"
    )
    add_speed_options(parser)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return check_args(parser, parser.parse_args(argv))


def add_speed_options(parser: argparse.ArgumentParser):
    parser.add_argument("--fuse-projections", action="store_true", help="model.fuse_projections() (Q/K/V, GeGLU in)")
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile each get_<modality>_features (on CPU onepeace_flex would run sdpa: it is left out)",
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Reject impossible values of the options shared with `model.py`; deduplicate the lists."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch-size and --iters must be >= 1, --warmup >= 0")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.image_size < 16 or args.image_size % 16:
        parser.error("--image-size must be a positive multiple of 16")
    if not 1 <= args.audio_seconds <= 15:
        parser.error("--audio-seconds must be between 1 and 15")
    if not 1 <= args.text_length <= 512:
        parser.error("--text-length must be between 1 and 512")
    args.modalities = list(dict.fromkeys(args.modalities))
    if args.attn is None:
        args.attn = [a for a in ATTN_IMPLEMENTATIONS if args.device == "cuda" or a not in CUDA_ONLY_ATTN]
    if args.device != "cuda" and set(args.attn) & set(CUDA_ONLY_ATTN):
        parser.error(f"--attn {' '.join(CUDA_ONLY_ATTN)} needs --device cuda (on CPU it would run sdpa)")
    args.attn = list(dict.fromkeys(args.attn))
    if args.warmup < 1 and (args.compile or set(args.attn) & {"onepeace_flex", "onepeace_triton"}):
        parser.error("--warmup must be >= 1 with --compile, onepeace_flex or onepeace_triton: the first call compiles")
    if args.json is not None:
        check_output_file(parser, args.json)
    return args


def leave_out_flex_where_it_runs_sdpa(args, config, device: torch.device) -> None:
    """Drop onepeace_flex from `args.attn` where its rows would time the dense sdpa path under another name: on CPU
    with heads narrower than MIN_CPU_HEAD_DIM, or under torch.compile (flex_attention.py says why)."""
    if device.type == "cpu" and "onepeace_flex" in args.attn and (config.head_dim < MIN_CPU_HEAD_DIM or args.compile):
        args.attn.remove("onepeace_flex")
        reason = f"on CPU it runs sdpa here (heads narrower than {MIN_CPU_HEAD_DIM}, or under torch.compile)"
        if not args.attn:
            sys.exit(f"error: --attn onepeace_flex alone cannot be timed: {reason}")
        print(f"note: onepeace_flex left out: {reason}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = build_config(args.size, args.modalities, args.layers, args.image_size)
    if args.size == "4b" and args.layers is None:
        print(
            "warning: the full 4B model needs about 16 GB in float32 (8 GB in bf16/fp16) and is slow on CPU; "
            "use --layers N to time a 4B-shaped slice.",
            file=sys.stderr,
        )
    if device.type == "cpu" and dtype == torch.float16:
        print("warning: float16 on CPU is often slow or unsupported; bfloat16 is the usual CPU type.", file=sys.stderr)

    leave_out_flex_where_it_runs_sdpa(args, config, device)
    print(f"building {args.size} model ({config.num_hidden_layers} layers, {args.dtype}, {device})...", file=sys.stderr)
    model = build_model(config, dtype, device, args.fuse_projections)
    num_params = sum(p.numel() for p in model.parameters())

    torch.manual_seed(0)
    results = benchmark(model, config, args, dtype, device)
    ratios = speedups(results)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = {
        "model": (
            f"{args.size}: hidden {config.hidden_size}, ffn {config.intermediate_size}, "
            f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
            f"{num_params / 1e6:.1f}M params (modalities {', '.join(args.modalities)})"
        ),
        "device": f"{device_name}, {args.dtype}"
        + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""),
        "inputs": (
            f"text {args.text_length} tokens, image {args.image_size}px, audio {args.audio_seconds:g} s; "
            f"warmup {args.warmup}, iters {args.iters} (ms/batch = median)"
        ),
        "options": f"fused projections {'on' if args.fuse_projections else 'off'}, "
        f"compiled {'on' if args.compile else 'off'}",
        "memory": memory_method(device),
        "versions": f"torch {torch.__version__}, python {platform.python_version()}",
    }
    print_report(results, ratios, header)

    if args.json is not None:
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "header": header, "num_params": num_params, "results": results, "speedup_over_eager": ratios}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
