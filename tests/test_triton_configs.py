"""The Triton kernels' launch configs (`benchmarks/triton_configs.py`), checked without a GPU.

Triton's interpreter is lenient about what a GPU build rejects (tile shapes, shared memory beyond the device's
limit), so the kernels are also compiled here for an H100 (sm_90), with the argument specialization a real launch
gets. And every candidate config the GPU sweep may pick must give eager's results, whatever its tile shape.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (the `test` extra)")]


def _run_script(tmp_path, *args, interpret):
    out = tmp_path / "configs.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= dict(PYTHONPATH=str(REPO / "src"), TRITON_DEFAULT_FP_FUSION="1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "triton_configs.py"), *args, "--json", str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())["results"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_compile_for_h100_within_its_shared_memory(tmp_path, dtype):
    rows = _run_script(tmp_path, "resources", "--arch", "90", "--dtype", dtype, interpret=False)
    variants = {row["kernel"] for row in rows}
    assert variants == {"forward", "key_value", "key_value per-sample", "key_value no-bias-grad", "query"}
    for row in rows:
        assert "error" not in row, row
        assert row["in_use"] and row["fits"] and row["registers"] > 0, row


def test_every_candidate_config_matches_eager(tmp_path):
    """Half-precision candidates (the GPU's), padded batch, through the interpreter, float16 (NumPy has no bf16)."""
    from onepeace_hf.triton_kernels import LAUNCH_CONFIGS

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from triton_configs import CANDIDATES
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = _run_script(tmp_path, "time", "--device", "cpu", "--dtype", "float16", "--size", "tiny", "--lengths", "37",
                       "--batch-size", "2", "--padded", "--iters", "0", "--warmup", "0", interpret=True)
    for kernel, in_use in LAUNCH_CONFIGS["half"].items():
        tried = {(r["block_m"], r["block_n"], r["num_warps"], r["num_stages"]) for r in rows if r["kernel"] == kernel}
        assert tried == set(CANDIDATES["half"]) | {(in_use.block_m, in_use.block_n, in_use.num_warps,
                                                    in_use.num_stages)}
    for row in rows:  # float16 rounding of the output and gradients: ~5e-4 of their largest value
        assert row["max_relative_error"] < 2e-3, row


def test_time_fails_when_a_config_is_wrong(tmp_path):
    """A batch of one once broke every backward config (a strided row-sum read as contiguous): the run must say so."""
    rows = _run_script(tmp_path, "time", "--device", "cpu", "--dtype", "float32", "--size", "tiny", "--lengths", "17",
                       "--batch-size", "1", "--iters", "0", "--warmup", "0", interpret=True)
    assert max(row["max_relative_error"] for row in rows) < 1e-4  # the script exits 1 (failing _run_script) above


def test_time_exit_code_follows_the_errors(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import triton_configs
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = [dict(length=17, kernel="query", block_m=16, block_n=16, max_relative_error=error) for error in (1e-6, 0.5)]
    for given, code in ((rows[:1], 0), (rows, 1)):
        monkeypatch.setattr(triton_configs, "time_configs", lambda *args, given=given: given)
        monkeypatch.setattr(sys, "argv", ["triton_configs.py", "time", "--device", "cpu", "--dtype", "float32",
                                          "--json", str(tmp_path / "t.json")])
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(SystemExit) as exit_info:
            triton_configs.main()
        assert exit_info.value.code == code
