"""Peak memory of converting a large original checkpoint: streaming needs about one shard, not the whole model.

Builds a synthetic pretraining checkpoint in the original (fairseq) layout, shaped like a ~1B ONE-PEACE (hidden
1536, 24 heads, FFN 6144, three modality FFNs per layer; zeros, since only sizes matter), converts it in a child
process with `onepeace-hf convert`, and reports the child's peak RSS next to the checkpoint and shard sizes.

    python benchmarks/conversion_memory.py --layers 10 --max-shard-size 500MB --dtype bf16 --workdir /tmp/convmem
"""

import argparse
import copy
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from checks import HelpFormatter, check_output_file, positive_int  # benchmarks/checks.py, same folder
from onepeace_hf.cli.convert import shard_size
from onepeace_hf.conversion import DTYPES, config_from_checkpoint, map_original_keys
from onepeace_hf.modeling_onepeace import OnePeaceModel
from onepeace_hf.original_checkpoint import load_original_checkpoint


REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "one_peace_tiny_pretrain.pt"


def synthetic_checkpoint(layers: int, path: Path) -> int:
    """Scale the reference checkpoint's cfg up and write a zero-filled state dict of that shape under the
    original key names (encoder and projections; the decoder is dropped by encoder conversion anyway)."""
    reference = load_original_checkpoint(REFERENCE)
    cfg = copy.deepcopy(reference["cfg"])
    encoder = cfg["model"]["encoder"]
    encoder.update(embed_dim=1536, ffn_embed_dim=6144, layers=layers, attention_heads=24)
    spec = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
    encoder["audio_adapter"]["feature_encoder_spec"] = cfg["task"]["feature_encoder_spec"] = spec
    original_keys = [k for k in reference["model"] if not re.match(r"^(decoder|text_mask|image_mask|audio_mask)", k)]
    # One original name per layer: the reference has layers 0 and 1, layer 1's names stand for all the others.
    keys = [k for k in original_keys if ".layers." not in k]
    for i in range(layers):
        keys += [re.sub(r"\.layers\.1\.", f".layers.{i}.", k) for k in original_keys if ".layers.1." in k]
    vocabulary = "encoder_wrapper.text_adapter.embed_tokens.weight"  # the config reads the vocabulary size off it
    config = config_from_checkpoint({"cfg": cfg, "model": {vocabulary: reference["model"][vocabulary]}})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in OnePeaceModel(config).state_dict().items()}
    ours, _ = map_original_keys(keys, config)
    state = {original: torch.zeros(shapes[new]) for new, original in ours.items()}
    for key in keys:  # index buffers are kept as the original stores them
        if key.endswith(("rp_bucket", "position_idx")):
            state[key] = reference["model"][key]
    torch.save({"cfg": cfg, "model": state}, path)
    return sum(t.numel() for k, t in state.items() if t.is_floating_point())


CHILD = """
import re, sys
from onepeace_hf.cli import main
code = main(sys.argv[1:])
print("VmHWM", re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
sys.exit(code)
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--layers", type=positive_int, default=10, help="fusion layers of the synthetic checkpoint")
    parser.add_argument("--max-shard-size", type=shard_size, default="500MB", help="as onepeace-hf convert takes it")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the converted weights")
    parser.add_argument("--workdir", default="/tmp/conversion_memory", help="checkpoint, output and JSON go here")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    check_output_file(parser, workdir / "conversion_memory.json")
    checkpoint = workdir / "synthetic.pt"
    try:  # the synthetic checkpoint is several GB: never left behind
        parameters = synthetic_checkpoint(args.layers, checkpoint)
        started = time.perf_counter()
        command = ["convert", "--checkpoint", str(checkpoint), "--output-dir", str(workdir / "converted"),
                   "--overwrite", "--dtype", args.dtype, "--max-shard-size", str(args.max_shard_size)]
        # The child reports its own peak (VmHWM): getrusage(RUSAGE_CHILDREN) would also count the pages a forked
        # child shares with this process (which held the synthetic checkpoint) before it execs.
        report = subprocess.run([sys.executable, "-c", CHILD, *command], capture_output=True, text=True)
        if report.returncode != 0:
            sys.exit(f"the conversion failed (exit {report.returncode}):\n{report.stderr[-3000:]}")
        seconds = time.perf_counter() - started
        checkpoint_bytes = checkpoint.stat().st_size
    finally:
        checkpoint.unlink(missing_ok=True)
    print(report.stdout, end="")
    peak = int(re.search(r"^VmHWM (\d+)$", report.stdout, re.M).group(1)) * 1024
    shards = sorted((workdir / "converted").glob("model*.safetensors"))
    result = {
        "parameters": parameters, "layers": args.layers, "checkpoint_bytes": checkpoint_bytes, "dtype": args.dtype,
        "max_shard_size": args.max_shard_size, "shards": len(shards),
        "largest_shard_bytes": max(p.stat().st_size for p in shards), "peak_rss_bytes": peak, "seconds": seconds,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    gib = 2**30
    print(f"{parameters / 1e9:.2f}B parameters, checkpoint {checkpoint_bytes / gib:.2f} GiB -> "
          f"{len(shards)} {args.dtype} shards (largest {result['largest_shard_bytes'] / gib:.2f} GiB); "
          f"peak RSS of the conversion {peak / gib:.2f} GiB; {seconds:.0f} s")
    (workdir / "conversion_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
