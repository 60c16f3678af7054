"""Regional compilation in training: the pretraining example under Accelerate's regional compilation setting, on two
processes (DDP), compiles every fusion layer, keeps all their forms compiled (more than Dynamo's default limit of 8),
and trains as eager does.

The backend is aot_eager: Dynamo's graphs and AOTAutograd's forward/backward split, without Inductor's code generation
(minutes on 2 cores). `benchmarks/train.py --compile` runs the same layers through Inductor.
"""

import json
from pathlib import Path

import pytest
import torch

from onepeace_hf import OnePeaceConfig, OnePeaceForPretraining, OnePeaceImageProcessor, OnePeaceProcessor
from onepeace_hf.training.compilation import compile_fusion_layers
from tests.launching import accelerate_launch


REPO = Path(__file__).resolve().parents[1]


def pretrain(model_dir: Path, output_dir: Path, **launch) -> tuple[list[dict], str]:
    """Three steps of the pretraining example on two CPU processes (DDP over gloo)."""
    result = accelerate_launch(
        REPO / "examples" / "pretrain.py", "--stage", "vision_language", "--model", model_dir, "--synthetic", 32,
        "--output_dir", output_dir, "--max_steps", 3, "--per_device_batch_size", 4, "--learning_rate", 3e-4,
        "--warmup_steps", 1, "--logging_steps", 1, **launch,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    logged = [json.loads(line) for line in (output_dir / "training_log.jsonl").read_text().splitlines()]
    return logged, result.stderr


@pytest.mark.slow
def test_regionally_compiled_pretraining_matches_eager(tmp_path):
    torch.manual_seed(0)
    config = OnePeaceConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        use_layer_scale=False, drop_path_rate=0.0,
        decoder_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
    )
    start = tmp_path / "start"
    OnePeaceForPretraining(config).save_pretrained(start)
    OnePeaceProcessor(image_processor=OnePeaceImageProcessor(size={"height": 32, "width": 32})).save_pretrained(start)

    eager, _ = pretrain(start, tmp_path / "eager")
    compiled, log = pretrain(start, tmp_path / "compiled", dynamo_backend="aot_eager", regional_compilation=True,
                             extra_env={"TORCH_LOGS": "recompiles"})

    # Every form of the layers got its own graph: none fell back to eager at the recompile limit.
    assert log.count("Recompiling function") > 0, log[-3000:]
    assert "hit config.recompile_limit" not in log, log[-3000:]
    assert len(compiled) == len(eager) == 4  # three steps and the final evaluation
    for expected, actual in zip(eager, compiled):
        assert expected.keys() == actual.keys()
        for name, value in expected.items():
            assert actual[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (expected["step"], name)


def test_compiling_a_model_without_fusion_layers_is_an_error():
    with pytest.raises(ValueError, match="no ONE-PEACE fusion layer"):
        compile_fusion_layers(torch.nn.Linear(2, 2))
