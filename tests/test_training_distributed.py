"""Real 2-process CPU training through `accelerate launch`: the loss falls, gathered negatives make 2 processes x
batch b train like 1 process x batch 2b, and a resumed run reproduces the uninterrupted one bit for bit."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

import onepeace_hf  # noqa: F401
from onepeace_hf.losses import RetrievalContrastiveLoss
from onepeace_hf.training.data import PairCollator
from onepeace_hf.training.synthetic import synthetic_pairs
from tests.launching import accelerate_launch


REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def launch(script, *args, **options):
    result = accelerate_launch(script, *args, **options)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def read_log(folder):
    return [json.loads(line) for line in (Path(folder) / "training_log.jsonl").read_text().splitlines()]


def finetune(model_dir, output_dir, *extra, **launch_options):
    return launch(
        REPO / "examples" / "finetune_retrieval.py", "--model", model_dir, "--synthetic", 64, "--synthetic_eval", 0,
        "--output_dir", output_dir, "--max_steps", 16, "--per_device_batch_size", 4, "--learning_rate", 3e-4,
        "--warmup_steps", 2, "--logging_steps", 1, "--save_steps", 4, *extra, **launch_options,
    )


def test_two_process_training_learns_and_resumes_bit_exactly(tiny_random_model_dir, tmp_path):
    result = finetune(tiny_random_model_dir, tmp_path / "full")
    assert "all_gather_tensor_autograd" not in result.stderr  # the negatives' gather uses the current op name
    log = read_log(tmp_path / "full")
    assert [entry["step"] for entry in log] == list(range(1, 17))
    losses = [entry["loss"] for entry in log]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses

    # Interrupted after step 7 (last checkpoint: step 4 and the final save at 7), then resumed to the end.
    finetune(tiny_random_model_dir, tmp_path / "resumed", "--stop_after_steps", 7)
    assert not (tmp_path / "resumed" / "final").exists()
    finetune(tiny_random_model_dir, tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    resumed_log = read_log(tmp_path / "resumed")
    assert [entry["step"] for entry in resumed_log] == list(range(1, 8)) + list(range(8, 17))
    assert resumed_log[7:] == log[7:]

    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    initial = load_file(tiny_random_model_dir / "model.safetensors")
    assert any(not torch.equal(full[k], initial[k]) for k in full)

    # The result is a regular transformers folder.
    model = AutoModel.from_pretrained(tmp_path / "full" / "final")
    assert torch.equal(model.projections["image"].weight, full["projections.image.weight"])
    AutoProcessor.from_pretrained(tmp_path / "full" / "final")


def single_process_gradients(model_dir, batch_size, detach_negatives):
    model = AutoModel.from_pretrained(model_dir, drop_path_rate=0.0).train()
    collate = PairCollator(AutoProcessor.from_pretrained(model_dir), image_column="image")
    rows = synthetic_pairs(batch_size, seed=1)
    loss = RetrievalContrastiveLoss(detach_negatives=detach_negatives)(model, **collate(list(rows)))["loss"]
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("negatives", ["with_grad", "detach"])
def test_gathered_negatives_match_one_process_with_double_batch(tiny_random_model_dir, tmp_path, negatives):
    out_file = tmp_path / "grads.safetensors"
    launch(REPO / "tests" / "distributed" / "contrastive_gradients.py", tiny_random_model_dir, out_file, 4, negatives)
    two_processes = load_file(out_file)
    one_process = single_process_gradients(tiny_random_model_dir, 8, detach_negatives=negatives == "detach")
    assert two_processes.keys() == one_process.keys()
    for name, grad in one_process.items():
        torch.testing.assert_close(two_processes[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if negatives == "with_grad":
        # The gradient through the negatives is not negligible: detaching them changes the result.
        detached = single_process_gradients(tiny_random_model_dir, 8, detach_negatives=True)
        assert any(not torch.allclose(detached[n], g, rtol=1e-3, atol=1e-5) for n, g in one_process.items())


def test_bf16_gradient_accumulation_and_checkpointing(tiny_random_model_dir, tmp_path):
    finetune(
        tiny_random_model_dir, tmp_path / "run", "--max_steps", 3, "--gradient_accumulation_steps", 2,
        "--gradient_checkpointing", processes=1, mixed_precision="bf16",
    )
    log = read_log(tmp_path / "run")
    assert [entry["step"] for entry in log] == [1, 2, 3]
    for entry in log:
        # Under bf16 autocast each micro-batch loss is a bf16 number (8 significant bits), so their logged mean
        # needs few significant bits; a float32 loss would need ~24.
        mantissa = math.frexp(entry["loss"])[0]
        assert any((mantissa * 2**bits).is_integer() for bits in range(13)), entry["loss"]
    progress = torch.load(tmp_path / "run" / "checkpoints" / "step_00000003" / "custom_checkpoint_1.pkl",
                          weights_only=False)
    assert progress == {"step": 3, "epoch": 0, "batches_in_epoch": 6}  # 2 micro-batches per optimizer step
    AutoModel.from_pretrained(tmp_path / "run" / "final")
