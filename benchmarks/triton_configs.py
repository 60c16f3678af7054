"""Choose the launch configs (tile sizes, warps, pipeline stages) of the `onepeace_triton` kernels.

    resources  compiles each kernel for a GPU architecture, here (no GPU needed), and prints its registers per thread,
               stack bytes (spilled registers: slow local memory) and shared memory, which must fit the
               architecture's per-block limit for the launch to succeed.
    time       on a GPU: times every candidate config of each kernel at the 4B heads against the config in use
               (same process, taking turns call by call), and checks each one's results against eager float32.

The kernels' launches are recorded from one forward+backward at the requested shape, so `resources` compiles them
with the argument specialization Triton's JIT would use (16-byte alignment, integers divisible by 16 or equal to 1).
Under `TRITON_INTERPRET=1`, `time --device cpu` runs every candidate through the interpreter: a check of the
arithmetic with each tile shape, not a timing.

    PYTHONPATH=src .venv/bin/python benchmarks/triton_configs.py resources --arch 90 --dtype bfloat16
    PYTHONPATH=src .venv/bin/python benchmarks/triton_configs.py resources --arch 90 --candidates   # the sweep
    python benchmarks/triton_configs.py time --dtype bfloat16 --lengths 257 751                      # on a GPU
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attention import DTYPES, HEADS, make_inputs, timed  # benchmarks/attention.py, same folder
from checks import HelpFormatter, check_device, check_output_file, non_negative_int, positive_int  # same folder


if os.environ.get("TRITON_INTERPRET") == "1" and "resources" in sys.argv[1:2]:
    sys.exit("resources compiles for a GPU: run it without TRITON_INTERPRET=1 (the interpreter replaces the kernels)")

import triton  # noqa: E402 (after the check: Triton reads TRITON_INTERPRET when the kernels are decorated)

from onepeace_hf import triton_kernels  # noqa: E402
from onepeace_hf.attention import RelativeBias, eager_attention_forward  # noqa: E402
from onepeace_hf.triton_kernels import LaunchConfig  # noqa: E402


KERNELS = {"forward": "_forward_kernel", "key_value": "_backward_key_value_kernel", "query": "_backward_query_kernel"}
CANDIDATES = {  # (block_m, block_n, num_warps, num_stages)
    "half": [(64, 64, 4, 3), (64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 8, 2),
             (32, 128, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)],
    "float32": [(32, 32, 4, 2), (32, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2), (64, 16, 4, 2)],
}
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
                torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}


def candidates(kernel: str, dtype: torch.dtype) -> list[LaunchConfig]:
    in_use = triton_kernels.LAUNCH_CONFIGS[triton_kernels.config_precision(dtype)][kernel]
    others = [LaunchConfig(*c) for c in CANDIDATES[triton_kernels.config_precision(dtype)]]
    return [in_use] + [config for config in others if config != in_use]


@contextlib.contextmanager
def launch_configs(configs: dict[str, LaunchConfig]):
    """Makes the kernels launch with `configs` (kernel name -> config), whatever the device."""
    original = triton_kernels.launch_config
    triton_kernels.launch_config = lambda kernel, dtype, device: configs[kernel]
    try:
        yield
    finally:
        triton_kernels.launch_config = original


# ---- resources: compile the recorded launches for a GPU architecture ----

@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recorded_launches():
    """Replaces the kernels by recorders: `kernel[grid](*args, **kwargs)` appends a Launch instead of running."""
    launches, originals = [], {name: getattr(triton_kernels, name) for name in KERNELS.values()}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

    for name, kernel in originals.items():
        setattr(triton_kernels, name, Recorder(kernel))
    try:
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(triton_kernels, name, kernel)


def record(configs, batch, heads, length, head_dim, dtype, buckets_per_sample, table_grad):
    """The launches of one forward+backward (on CPU tensors: only their dtypes, strides and alignment matter)."""
    (q, k, v, table), buckets, padding = make_inputs(batch, heads, length, head_dim, dtype, "cpu", False, True)
    table.requires_grad_(table_grad)  # False: frozen tables (e.g. LoRA), the kernel variant without their gradient
    if buckets_per_sample:
        buckets = buckets.expand(batch, -1, -1)
    with recorded_launches() as launches, launch_configs(configs):
        out = triton_kernels.BucketBiasAttention.apply(q, k, v, table, buckets, padding, head_dim**-0.5)
        out.float().sum().backward()
    return launches


def specialization(launch: Launch):
    """Signature, constants and divisibility hints as Triton's JIT would derive them from these arguments."""
    kernel = launch.kernel
    values = dict(zip(kernel.arg_names, launch.args))
    values |= {k: v for k, v in launch.kwargs.items() if k in kernel.arg_names}
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr or (isinstance(value, int) and value == 1):
            signature[param.name], constants[param.name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[param.name], divisible = "*" + TRITON_TYPES[value.dtype], value.data_ptr() % 16 == 0
        elif isinstance(value, int):
            signature[param.name], divisible = ("i32" if abs(value) < 2**31 else "i64"), value % 16 == 0
        else:
            signature[param.name], divisible = "fp32", False
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in launch.kwargs.items() if k not in kernel.arg_names}
    return signature, constants, attrs, options


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True,
                                check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2))}


def compile_for(launch: Launch, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget

    signature, constants, attrs, options = specialization(launch)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    source = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=target, options=backend.parse_options(options).__dict__)
    shared = compiled.metadata.shared
    limit = SHARED_MEMORY_PER_BLOCK[arch]
    return resource_usage(compiled.asm["cubin"]) | {"shared_bytes": shared, "fits": shared <= limit}


def kernel_of(launch: Launch) -> str:
    return next(name for name, function in KERNELS.items() if function == launch.kernel.__name__)


def variant_name(launch: Launch) -> str:
    name = kernel_of(launch)
    if name == "key_value" and not launch.kwargs["BIAS_GRAD"]:
        return name + " no-bias-grad"
    if name == "key_value" and not launch.kwargs["SHARED_BIAS_GRAD"]:
        return name + " per-sample"
    return name


def resources(args, dtype) -> list[dict]:
    in_use = triton_kernels.LAUNCH_CONFIGS[triton_kernels.config_precision(dtype)]
    sweeps = [dict(in_use)]
    if args.candidates:  # one kernel at a time; the others keep theirs
        sweeps += [dict(in_use) | {kernel: config} for kernel in KERNELS for config in candidates(kernel, dtype)[1:]]
    rows, seen = [], set()
    heads, head_dim = HEADS[args.size]
    for configs in sweeps:
        launches = []
        for per_sample, table_grad in [(False, True), (True, True), (False, False)]:
            launches += record(configs, 2, heads, args.length, head_dim, dtype, per_sample, table_grad)
        for launch in launches:
            name, kernel = variant_name(launch), kernel_of(launch)
            config = configs[kernel]
            if (name, config) in seen:
                continue
            seen.add((name, config))
            try:
                usage = compile_for(launch, args.arch)
            except Exception as error:  # reported, and the exit status says so
                usage = {"error": str(error).strip().splitlines()[-1][:200]}
            rows.append(dict(kernel=name, in_use=config == in_use[kernel], **dataclasses.asdict(config),
                             **usage))
            print(_resource_line(rows[-1]), flush=True)
    return rows


def _resource_line(row) -> str:
    config = f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}"
    mark = "*" if row["in_use"] else " "
    if "error" in row:
        return f"{row['kernel']:>24} {config:>14}{mark} FAILED: {row['error']}"
    return (f"{row['kernel']:>24} {config:>14}{mark} {row['registers']:>5} {row['stack_bytes']:>6} "
            f"{row['shared_bytes'] / 1024:>8.1f}{'' if row['fits'] else '  over the limit'}")


# ---- time: every candidate on the device ----

# Largest relative error a config may show against eager float32 before `time` fails: bf16/fp16 rounding of the
# inputs and outputs, or float32 kept exact (the kernels' float32 dots are IEEE unless TF32 is allowed).
MAX_RELATIVE_ERROR = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def relative_errors(outputs, reference) -> float:
    """The largest error of any output, relative to that output's largest reference value."""
    return max(((o.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
               for o, r in zip(outputs, reference))


def time_configs(args, dtype, device) -> list[dict]:
    heads, head_dim = HEADS[args.size]
    in_use = triton_kernels.LAUNCH_CONFIGS[triton_kernels.config_precision(dtype)]
    rows = []
    for length in args.lengths:
        leaves, buckets, padding = make_inputs(args.batch_size, heads, length, head_dim, dtype, device, args.padded,
                                               True)
        q, k, v, table = leaves
        scale = head_dim**-0.5

        def reference():  # eager float32 from the same (rounded) inputs
            fq, fk, fv, ft = (t.detach().float().requires_grad_() for t in leaves)
            bias = RelativeBias(ft, buckets, padding).materialize(torch.float32)
            out, _ = eager_attention_forward(torch.nn.Module(), fq, fk, fv, bias, scale)
            out.sum().backward()
            return [out.detach()] + [t.grad for t in (fq, fk, fv, ft)]

        expected = reference()
        for kernel in KERNELS:
            configs = {config: dict(in_use) | {kernel: config} for config in candidates(kernel, dtype)}
            backward = kernel != "forward"

            def call(config):
                for leaf in leaves:
                    leaf.grad = None
                with launch_configs(configs[config]), torch.set_grad_enabled(backward):
                    out = triton_kernels.BucketBiasAttention.apply(q, k, v, table, buckets, padding, scale)
                    if backward:
                        out.float().sum().backward()
                return [out] + ([leaf.grad for leaf in leaves] if backward else [])

            errors = {config: relative_errors(call(config), expected) for config in configs}  # also compiles
            for _ in range(args.warmup):
                for config in configs:
                    call(config)
            times = {config: [] for config in configs}
            for _ in range(args.iters):
                for config in configs:
                    times[config].append(timed(lambda: call(config), device))
            median = {config: statistics.median(t) if t else None for config, t in times.items()}  # None: --iters 0
            for config in configs:
                ms, base = median[config], median[in_use[kernel]]
                rows.append(dict(length=length, kernel=kernel, mode="forward+backward" if backward else "forward",
                                 in_use=config == in_use[kernel], **dataclasses.asdict(config),
                                 median_ms=ms and ms * 1e3, speed_over_in_use=ms and base / ms,
                                 max_relative_error=errors[config]))
                print(_time_line(rows[-1]), flush=True)
    return rows


def _time_line(row) -> str:
    config = f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}"
    timing = f"{'-':>10} {'-':>8}"  # --iters 0
    if row["median_ms"]:
        timing = f"{row['median_ms']:>10.3f} {row['speed_over_in_use']:>7.2f}x"
    return (f"{row['length']:>5} {row['kernel']:>10} {config:>14}{'*' if row['in_use'] else ' '} {timing} "
            f"{row['max_relative_error']:>10.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("command", choices=["resources", "time"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--size", default="4b", choices=sorted(HEADS), help="heads and head size of this config")
    parser.add_argument("--json", default=None, help="where to write the results (default: next to this script)")
    parser.add_argument("--arch", type=int, default=90, help="resources: compute capability x10 (80 A100, 90 H100)")
    parser.add_argument("--length", type=positive_int, default=257, help="resources: the sequence length recorded")
    parser.add_argument("--candidates", action="store_true", help="resources: every candidate, not only those in use")
    parser.add_argument("--device", default="cuda", help="time: cuda (or cpu under TRITON_INTERPRET=1)")
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[257, 751], help="time: sequence lengths")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--padded", action="store_true", help="time: pad half of the batch")
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--iters", type=non_negative_int, default=20,
                        help="time: timed calls per config (0: only check results)")
    args = parser.parse_args()
    out = Path(args.json) if args.json else Path(__file__).with_name(f"triton_configs_{args.command}.json")
    check_output_file(parser, out)
    if args.command == "resources" and args.arch not in SHARED_MEMORY_PER_BLOCK:
        parser.error(f"--arch {args.arch}: its shared memory limit is not on record "
                     f"(known: {', '.join(map(str, SHARED_MEMORY_PER_BLOCK))})")
    dtype = DTYPES.get(args.dtype) or getattr(torch, args.dtype)
    header = dict(command=args.command, dtype=args.dtype, size=args.size, triton=triton.__version__,
                  torch=torch.__version__)
    if args.command == "resources":
        header |= dict(arch=args.arch, length=args.length)
        print(" ".join(f"{k}={v}" for k, v in header.items()) + "   (* = in use)")
        print(f"{'kernel':>24} {'config':>15} {'regs':>5} {'stack':>6} {'smem KiB':>8}")
        rows = resources(args, dtype)
        failed = any("error" in row or not row["fits"] for row in rows)
    else:
        device = check_device(parser, args.device)
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("time runs the kernels: it needs a CUDA device, or TRITON_INTERPRET=1 for a CPU check")
        header |= dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
                       batch_size=args.batch_size, padded=args.padded, iters=args.iters)
        print(" ".join(f"{k}={v}" for k, v in header.items()) + "   (* = in use)")
        print(f"{'L':>5} {'kernel':>10} {'config':>15} {'median ms':>10} {'vs used':>8} {'max error':>10}")
        rows = time_configs(args, dtype, device)
        wrong = [row for row in rows if row["max_relative_error"] > MAX_RELATIVE_ERROR[dtype]]
        for row in wrong:
            print(f"FAILED: L={row['length']} {row['kernel']} {row['block_m']}x{row['block_n']}: max relative error "
                  f"{row['max_relative_error']:.2e} > {MAX_RELATIVE_ERROR[dtype]:g}", file=sys.stderr)
        failed = bool(wrong)
    out.write_text(json.dumps({"header": header, "results": rows}, indent=2))
    print(f"wrote {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
