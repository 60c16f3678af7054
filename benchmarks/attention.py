"""Time and memory of one attention call with the ONE-PEACE relative-position bias.

Implementations, all starting from the compact bias (bucket table + indices) the model carries:
    eager  dense (batch or 1 when unpadded, heads, L, L) bias, then the original's matmul-softmax-matmul;
    sdpa   dense bias, then `scaled_dot_product_attention`;
    fused  `onepeace_flex`: the bias is read from the table inside FlexAttention, padding via a block mask;
    triton `onepeace_triton`: our Triton kernel, reading the table in-kernel too (CUDA only).
Building the dense bias is part of eager's and sdpa's time, as it is in the model (once per layer with per-layer
tables). On CPU FlexAttention has no backward, and heads narrower than 32 take the dense path (flex_attention.py says
why), so "fused" is not measured there (the model falls back to sdpa). Ratios are against sdpa, measured in the same
process, the implementations taking turns call by call.
Memory is what one extra call adds: CUDA's peak allocation over the memory allocated before it, or on CPU the growth
of the process RSS sampled every millisecond (a lower bound; see embed.py).

    PYTHONPATH=src .venv/bin/python benchmarks/attention.py                       # CPU, fp32, B=8, 4B heads
    PYTHONPATH=src .venv/bin/python benchmarks/attention.py --device cuda --dtype bfloat16 --backward
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from checks import HelpFormatter, check_device, check_output_file, non_negative_int, positive_int  # same folder
from embed import measure_memory, memory_method  # benchmarks/embed.py, same folder

from onepeace_hf.attention import RelativeBias, eager_attention_forward
from onepeace_hf.flex_attention import MIN_CPU_HEAD_DIM, onepeace_flex_attention_forward, padding_block_mask
from onepeace_hf.triton_attention import onepeace_triton_attention_forward


HEADS = {"tiny": (4, 16), "base": (12, 64), "4b": (24, 64)}  # (heads, head_dim)
LENGTHS = {257: "image 256 px", 327: "text 70 + image", 751: "audio 15 s"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _Module(torch.nn.Module):
    is_causal = False


def make_inputs(batch, heads, length, head_dim, dtype, device, padded, requires_grad):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    num_buckets = 964  # the image table of the released model: (2*16-1)^2 + 3
    table = torch.randn(num_buckets + 1, heads, generator=generator).to(device)
    buckets = torch.randint(0, num_buckets, (length, length), generator=generator).to(device)
    padding = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if padded:  # half of the batch padded to 60% of the length, as a mixed-length audio batch
        padding[batch // 2 :, int(0.6 * length) :] = True
    leaves = [t.requires_grad_(requires_grad) for t in (q, k, v, table)]
    return leaves, buckets, padding


def attention_call(name, leaves, buckets, padding, backward):
    q, k, v, table = leaves
    module = _Module()
    bias = RelativeBias(table, buckets, padding)

    def run():
        if name == "fused":
            out, _ = onepeace_flex_attention_forward(
                module, q, k, v, bias._replace(block_mask=padding_block_mask(padding)), q.shape[-1] ** -0.5
            )
        elif name == "triton":
            out, _ = onepeace_triton_attention_forward(module, q, k, v, bias, q.shape[-1] ** -0.5)
        elif name == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.materialize(q.dtype))
        else:
            out, _ = eager_attention_forward(module, q, k, v, bias.materialize(q.dtype), q.shape[-1] ** -0.5)
        if backward:
            out.float().sum().backward()
        return out

    return run


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["4b"], choices=sorted(HEADS))
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=list(LENGTHS))
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--padded", action="store_true", help="pad half of the batch (block-mask path)")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--json", default=None, help="where to write the results (default: next to this script)")
    args = parser.parse_args()
    device, dtype = check_device(parser, args.device), DTYPES[args.dtype]
    out = Path(args.json) if args.json else Path(__file__).with_name(f"attention_{device.type}_{args.dtype}.json")
    check_output_file(parser, out)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["forward"] + (["forward+backward"] * args.backward)

    rows = []
    for size in args.sizes:
        heads, head_dim = HEADS[size]
        for length in args.lengths:
            for mode in modes:
                backward = mode != "forward"
                dense_fallback = device.type == "cpu" and (backward or head_dim < MIN_CPU_HEAD_DIM)
                names = ["eager", "sdpa"] + (["fused"] if not dense_fallback else [])
                names += ["triton"] if device.type == "cuda" else []
                leaves, buckets, padding = make_inputs(
                    args.batch_size, heads, length, head_dim, dtype, device, args.padded, backward
                )
                calls = {name: attention_call(name, leaves, buckets, padding, backward) for name in names}
                context = torch.enable_grad() if backward else torch.no_grad()
                with context:
                    for name in names:
                        for _ in range(args.warmup):
                            calls[name]()
                    times = {name: [] for name in names}
                    for _ in range(args.iters):
                        for name in names:
                            times[name].append(timed(calls[name], device))
                    call_mib = {name: measure_memory(calls[name], device)[1] for name in names}
                sdpa_ms = statistics.median(times["sdpa"]) * 1e3
                for name in names:
                    ms = statistics.median(times[name]) * 1e3
                    rows.append(dict(size=size, heads=heads, head_dim=head_dim, length=length, mode=mode, impl=name,
                                     median_ms=ms, min_ms=min(times[name]) * 1e3, speed_over_sdpa=sdpa_ms / ms,
                                     call_mem_mib=call_mib[name]))

    header = dict(device=str(device), dtype=args.dtype, batch_size=args.batch_size, padded=args.padded,
                  torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor()
                  or platform.machine(), warmup=args.warmup, iters=args.iters)
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    header["memory"] = memory_method(device)
    columns = ("size", 5), ("L", 4), ("mode", 16), ("impl", 6), ("median ms", 10), ("min ms", 8), ("vs sdpa", 8)
    print(" ".join(f"{name:>{width}}" for name, width in columns) + f" {'+call MiB':>9}")
    for r in rows:
        print(f"{r['size']:>5} {r['length']:>4} {r['mode']:>16} {r['impl']:>6} {r['median_ms']:>10.2f} "
              f"{r['min_ms']:>8.2f} {r['speed_over_sdpa']:>7.2f}x {r['call_mem_mib']:>9.0f}")
    out.write_text(json.dumps({"header": header, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
