"""The two-stage pretraining schedule on a tiny synthetic set (fixed seeds): vision-language, then audio-language with
the shared parts frozen, ends with text, image and audio in one space, audio-image retrieval included (never
trained on audio-image pairs). Chance R@1 is 12.5% (8 classes, one eval pair each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

import onepeace_hf  # noqa: F401
from onepeace_hf import OnePeaceConfig, OnePeaceForPretraining, OnePeaceImageProcessor, OnePeaceProcessor
from onepeace_hf.retrieval_metrics import retrieval_recall
from onepeace_hf.training.data import PairCollator
from onepeace_hf.training.recipes import embed_pairs
from onepeace_hf.training.synthetic import synthetic_pairs


REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_stage(stage, model_dir, output_dir, steps, modality_args=()):
    command = [
        sys.executable, str(REPO / "examples" / "pretrain.py"), "--stage", stage, "--model", str(model_dir),
        "--synthetic", "256", *modality_args, "--output_dir", str(output_dir), "--max_steps", str(steps),
        "--per_device_batch_size", "16", "--learning_rate", "3e-4", "--warmup_steps", "5", "--logging_steps", "10",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    merged = {}  # the last value of every logged quantity
    for line in (Path(output_dir) / "training_log.jsonl").read_text().splitlines():
        merged.update(json.loads(line))
    # The final evaluation is kept apart from the log, and printed (by the main process only).
    results = json.loads((Path(output_dir) / "eval_results.json").read_text())
    assert results == {name: value for name, value in merged.items() if name.startswith("eval/")}
    assert result.stdout.strip().splitlines()[-1] == str(results)
    return merged


def test_two_stage_pretraining_aligns_three_modalities(tmp_path):
    torch.manual_seed(0)
    config = OnePeaceConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        audio_conv_spec=[[16, 10, 5], [16, 8, 4], [16, 4, 4]], audio_max_samples=80000, use_layer_scale=False,
        drop_path_rate=0.0,
        decoder_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
    )
    start = tmp_path / "start"
    OnePeaceForPretraining(config).save_pretrained(start)
    OnePeaceProcessor(image_processor=OnePeaceImageProcessor(size={"height": 32, "width": 32})).save_pretrained(start)

    stage1 = run_stage("vision_language", start, tmp_path / "stage1", steps=60)
    assert stage1["eval/image_to_text_R@1"] >= 75.0 and stage1["eval/text_to_image_R@1"] >= 75.0, stage1
    stage2 = run_stage("audio_language", tmp_path / "stage1" / "final", tmp_path / "stage2", steps=30,
                       modality_args=("--audio_column", "audio"))
    assert stage2["eval/audio_to_text_R@1"] >= 75.0 and stage2["eval/text_to_audio_R@1"] >= 75.0, stage2
    for name in ("dcl_audio_loss", "dcl_al_text_loss", "dcl_al_audio_loss", "atc_loss"):
        assert torch.isfinite(torch.tensor(stage2[name]))

    # Stage 2 changed only the audio branch of the encoder (and the decoder / audio projection / logit scale).
    before = load_file(tmp_path / "stage1" / "final" / "model.safetensors")
    after = load_file(tmp_path / "stage2" / "final" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".audio" in k or "audio." in k or not k.startswith(("adapters", "encoder", "projections"))
                           for k in changed), sorted(changed)
    assert any(k.startswith("adapters.audio.") for k in changed)

    # Emergent audio <-> image retrieval through the shared captions' space.
    model = AutoModel.from_pretrained(tmp_path / "stage2" / "final").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "stage2" / "final")
    images, _ = embed_pairs(model, PairCollator(processor, image_column="image"), synthetic_pairs(8, "image", seed=5))
    audios, _ = embed_pairs(model, PairCollator(processor, audio_column="audio"), synthetic_pairs(8, "audio", seed=5))
    assert images.grad_fn is None and audios.grad_fn is None  # evaluation builds no autograd graph
    assert retrieval_recall(audios, images, ks=(1,))["R@1"] >= 50.0
    assert retrieval_recall(images, audios, ks=(1,))["R@1"] >= 50.0
