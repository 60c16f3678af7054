"""`benchmarks/model.py` runs end to end and reports model FLOPs an independent count can vouch for; the scripts refuse
bad settings before timing anything."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_benchmark(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark") / "model.json"
    args = ["--size", "tiny", "--modalities", "image", "--attn", "eager", "sdpa", "--image-size", "64",
            "--batch-size", "2", "--train-batch-size", "2", "--warmup", "0", "--iters", "1", "--threads", "1",
            "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "model.py"), *args], check=True, env=env,
                   capture_output=True, cwd=REPO, timeout=600)
    return json.loads(out.read_text())


def test_embedding_rows_count_at_least_the_fusion_layer_matmuls(model_benchmark):
    # tiny (benchmarks/embed.py): hidden 64, GeGLU FFN 128, 2 layers; a 64 px image is 4 x 4 patches + CLS.
    hidden, ffn, layers, batch, length = 64, 128, 2, 2, 17
    projections = 2 * batch * length * (4 * hidden * hidden + 3 * hidden * ffn)  # Q, K, V, out; GeGLU in x2, out
    attention = 2 * 2 * batch * length * length * hidden  # scores and weighted sum
    fusion_layers = layers * (projections + attention)

    rows = {row["attn"]: row for row in model_benchmark["embedding"]}
    assert set(rows) == {"eager", "sdpa"}
    # Counted once (with eager attention): the same model work whichever implementation runs it.
    assert rows["eager"]["model_flops"] == rows["sdpa"]["model_flops"]
    # The adapter (hMLP stem) adds to the fusion layers, but far less than they cost.
    assert fusion_layers <= rows["eager"]["model_flops"] < 2 * fusion_layers
    for row in rows.values():
        assert row["items_per_s"] > 0 and 0 < row["mfu"] < 1


def test_pretraining_step_reports_utilization_of_three_forwards(model_benchmark):
    steps = {row["attn"]: row for row in model_benchmark["pretraining_step"]}
    assert set(steps) == {"eager", "sdpa"}  # onepeace_flex has no CPU backward and is not timed here
    for row in steps.values():
        assert row["gradient_checkpointing"] and row["samples_per_s"] > 0
        assert row["model_flops"] % 3 == 0
        expected_mfu = row["model_flops"] / (row["ms_per_step"] / 1e3) / model_benchmark["peak_flops_per_s"]
        assert row["mfu"] == pytest.approx(expected_mfu) and 0 < row["mfu"] < 1


BAD_SETTINGS = [
    ("attention.py", ["--lengths", "0"], "--lengths: must be a positive integer"),
    ("train.py", ["--iters", "0"], "--iters: must be a positive integer"),
    ("triton_configs.py", ["time", "--warmup", "-1"], "--warmup: must be >= 0"),
    ("triton_configs.py", ["resources", "--arch", "75"], "--arch 75: its shared memory limit is not on record"),
    ("embed.py", ["--json", "{missing}/results.json"], "cannot create the folder of"),
    ("conversion_memory.py", ["--layers", "0"], "--layers: must be a positive integer"),
]


@pytest.mark.parametrize(("script", "args", "message"), BAD_SETTINGS, ids=[f"{s} {a[0]}" for s, a, _ in BAD_SETTINGS])
def test_bad_settings_fail_at_once_with_a_usage_error(script, args, message, tmp_path):
    # A file where a folder is needed: the results could never be written, so nothing may be timed first.
    (tmp_path / "file").write_text("")
    args = [arg.format(missing=tmp_path / "file") for arg in args]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | dict(PYTHONPATH=str(REPO / "src"))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], env=env, capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"{script}: error: ") and message in result.stderr


def test_a_results_file_that_cannot_be_written_is_refused_before_the_run(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from checks import check_output_file  # noqa: PLC0415
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    parser = argparse.ArgumentParser(prog="bench")
    fresh = tmp_path / "new" / "r.json"
    assert check_output_file(parser, fresh) == fresh and fresh.parent.is_dir() and not fresh.exists()
    (tmp_path / "kept.json").write_text("{}")
    assert check_output_file(parser, tmp_path / "kept.json").read_text() == "{}"  # checked, not truncated
    for bad in (tmp_path, tmp_path / "kept.json" / "r.json"):
        with pytest.raises(SystemExit) as exit_info:
            check_output_file(parser, bad)
        assert exit_info.value.code == 2


def test_flex_is_left_out_where_it_would_time_sdpa_under_its_name():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from embed import leave_out_flex_where_it_runs_sdpa  # noqa: PLC0415
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    import torch  # noqa: PLC0415

    def timed(head_dim, device="cpu", compile=False):
        args = argparse.Namespace(attn=["eager", "sdpa", "onepeace_flex"], compile=compile)
        leave_out_flex_where_it_runs_sdpa(args, argparse.Namespace(head_dim=head_dim), torch.device(device))
        return args.attn

    assert timed(16) == timed(64, compile=True) == ["eager", "sdpa"]  # the tiny model's heads; or compiled
    assert timed(64) == timed(16, device="cuda") == ["eager", "sdpa", "onepeace_flex"]
