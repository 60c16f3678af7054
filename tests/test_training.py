"""Training building blocks: parameter groups, schedule, stage-2 freezing, retrieval loss, data collation."""

import copy
import json
import logging
import math
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from PIL import Image
from safetensors.torch import load_file
from transformers import HfArgumentParser

from onepeace_hf import OnePeaceConfig, OnePeaceForPretraining, OnePeaceImageProcessor, OnePeaceProcessor
from onepeace_hf.losses import RetrievalContrastiveLoss, contrastive_loss, gather_with_grad
from onepeace_hf.training import (
    TrainingArguments,
    cosine_schedule_with_warmup,
    create_accelerator,
    create_optimizer,
    freeze_for_audio_language_stage,
    layer_id,
    parameter_groups,
)
from onepeace_hf.training.data import PairCollator, as_audio
from onepeace_hf.training.recipes import DataArguments, parse_script_arguments
from onepeace_hf.training.trainer import CHECKPOINT_PREFIX
from onepeace_hf.training.synthetic import synthetic_pairs
from onepeace_hf.training import trainer as trainer_module
from onepeace_hf.training.trainer import (
    _log,
    _Metrics,
    clear_previous_run,
    fill_deepspeed_config,
    find_checkpoint,
    train,
    warn_if_trained_in_half_precision,
)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretraining_model():
    config = OnePeaceConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        audio_conv_spec=[[8, 10, 5], [8, 8, 4]], audio_max_samples=20000, text_vocab_size=64,
        decoder_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
    )
    return OnePeaceForPretraining(config)


@pytest.mark.parametrize("name, expected", [
    ("adapters.text.embed_tokens.weight", 0),
    ("adapters.audio.feature_encoder.conv_layers.0.0.weight", 0),
    ("adapters.image.rel_pos.tables.0.weight", 1),  # one shared table: the original files it under layer 1
    ("adapters.image.rel_pos.tables.1.weight", 2),
    ("encoder.layers.0.self_attn.q_proj.weight", 1),
    ("encoder.layers.1.ffn.audio.down_proj.bias", 2),
    ("module.encoder.layers.1.gamma_1", 2),
    ("base_model.model.encoder.layers.0.self_attn.k_proj.lora_A.default.weight", 1),
    ("encoder.final_layer_norms.text.weight", 3),
    ("decoder.layers.0.self_attn.q_proj.weight", 3),
    ("projections.image.weight", 3),
    ("logit_scale", 3),
    ("classification_head.classifier.0.weight", 3),
])
def test_layer_id_follows_the_original(name, expected):
    assert layer_id(name, num_layers=2) == expected


def test_parameter_groups_decay_and_scales(pretraining_model):
    groups = parameter_groups(pretraining_model, weight_decay=0.05, layer_decay=0.5)
    by_name = {name: group for group in groups for name in group["names"]}
    assert len(by_name) == sum(1 for _ in pretraining_model.parameters())
    # lr_scale = 0.5 ** (num_layers + 1 - depth), num_layers = 2.
    assert by_name["adapters.text.embed_tokens.weight"]["lr_scale"] == 0.125
    assert by_name["encoder.layers.0.self_attn.q_proj.weight"]["lr_scale"] == 0.25
    assert by_name["encoder.layers.1.self_attn.q_proj.weight"]["lr_scale"] == 0.5
    assert by_name["mask_heads.text.weight"]["lr_scale"] == 1.0
    decayed = {"adapters.text.embed_tokens.weight", "encoder.layers.0.self_attn.q_proj.weight",
               "adapters.image.rel_pos.tables.0.weight", "mask_tokens.text", "projections.text.weight"}
    not_decayed = {"encoder.layers.0.self_attn.q_proj.bias", "encoder.layers.0.self_attn_layer_norm.weight",
                   "logit_scale", "adapters.text.cls_embedding", "adapters.text.embed_positions.weight",
                   "adapters.image.pos_embed", "decoder_positions.image.pos_embed",
                   "decoder_positions.audio.embed_positions.weight", "encoder.layers.1.gamma_2"}
    assert {n for n in decayed if by_name[n]["weight_decay"] == 0.05} == decayed
    assert {n for n in not_decayed if by_name[n]["weight_decay"] == 0.0} == not_decayed


def test_optimizer_lr_per_group_and_frozen_excluded(pretraining_model):
    model = pretraining_model
    model.adapters["text"].requires_grad_(False)
    try:
        optimizer = create_optimizer(model, learning_rate=1e-3, layer_decay=0.5)
        names = {n for group in optimizer.param_groups for n in group["names"]}
        assert not any(n.startswith("adapters.text.") for n in names)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    finally:
        model.adapters["text"].requires_grad_(True)
    with pytest.raises(ValueError, match="layer_decay"):
        parameter_groups(model, 0.05, layer_decay=1.5)


def test_cosine_schedule_matches_the_formula():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 1e-3 * 0.5, "lr_scale": 0.5}], lr=1e-3)
    scheduler = cosine_schedule_with_warmup(optimizer, warmup_steps=4, total_steps=14, min_lr=1e-5)
    lrs = []
    for _ in range(15):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Warmup from min_lr: step 2 of 4 is halfway; cosine over the 10 remaining steps; x0.5 for the group scale.
    assert lrs[0] == pytest.approx(0.5 * 1e-5)
    assert lrs[2] == pytest.approx(0.5 * (1e-5 + (1e-3 - 1e-5) / 2))
    assert lrs[4] == pytest.approx(0.5 * 1e-3)
    assert lrs[9] == pytest.approx(0.5 * (1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5))))
    assert lrs[14] == pytest.approx(0.5 * 1e-5)
    with pytest.raises(ValueError):
        cosine_schedule_with_warmup(optimizer, warmup_steps=5, total_steps=4)


def test_audio_language_stage_trains_only_the_audio_branch_and_heads(pretraining_model):
    trainable = set(freeze_for_audio_language_stage(pretraining_model))
    try:
        assert trainable == {n for n, p in pretraining_model.named_parameters() if p.requires_grad}
        for name in trainable:
            if name.startswith(("adapters.", "encoder.")):
                assert name.startswith("adapters.audio.") or ".ffn.audio." in name or "final_layer_norms.audio" in name
            assert ".image." not in name and not name.endswith(".image")
        for expected in ("adapters.audio.cls_embedding", "encoder.layers.1.ffn.audio.gate_proj.weight",
                         "encoder.final_layer_norms.audio.weight", "projections.audio.weight", "logit_scale",
                         "decoder.layers.0.self_attn.q_proj.weight", "mask_tokens.text", "mask_heads.audio.weight"):
            assert expected in trainable
        for frozen in ("encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.ffn.text.up_proj.weight",
                       "adapters.text.embed_tokens.weight", "projections.text.weight", "encoder.layers.0.gamma_1"):
            assert frozen not in trainable
    finally:
        pretraining_model.requires_grad_(True)


def test_contrastive_loss_single_process_is_plain_cross_entropy():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    assert gather_with_grad(a) is a
    scale = torch.tensor(10.0)
    loss, correct_ab, correct_ba = contrastive_loss(a, b, scale)
    logits = 10.0 * a @ b.t()
    targets = torch.arange(5)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    torch.testing.assert_close(loss, expected)
    assert correct_ab == (logits.argmax(1) == targets).sum()
    assert correct_ba == (logits.argmax(0) == targets).sum()
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(a, b[:4], scale)


def test_retrieval_loss_on_a_model(pretraining_model):
    processor = OnePeaceProcessor(image_processor=OnePeaceImageProcessor(size={"height": 32, "width": 32}))
    rows = list(synthetic_pairs(4, "image", seed=3))
    batch = PairCollator(processor, image_column="image")(rows)
    batch["input_ids"] = batch["input_ids"] % 64  # the fixture's small vocabulary
    model = pretraining_model.eval()
    out = RetrievalContrastiveLoss()(model, **batch)
    image = F.normalize(model.get_image_features(batch["pixel_values"]), dim=-1)
    text = F.normalize(model.get_text_features(batch["input_ids"], batch["attention_mask"]), dim=-1)
    logits = model.clamped_logit_scale() * image @ text.t()
    targets = torch.arange(4)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        RetrievalContrastiveLoss()(model, input_ids=batch["input_ids"])


def test_pair_collator_audio_and_errors():
    processor = OnePeaceProcessor()
    rows = list(synthetic_pairs(2, "audio", seed=0))
    batch = PairCollator(processor, audio_column="audio")(rows)
    assert set(batch) == {"input_ids", "attention_mask", "input_values", "padding_mask"}
    # 0.5 s clips are repeated to the 1 s minimum of the feature extractor.
    assert batch["input_values"].shape == (2, 16000)
    rows[1] = {**rows[1], "audio": {"array": rows[1]["audio"]["array"], "sampling_rate": 8000}}
    assert PairCollator(processor, audio_column="audio")(rows)["input_values"].shape == (2, 16000)  # 1 s at 16 kHz
    with pytest.raises(ValueError, match="exactly one"):
        PairCollator(processor)
    with pytest.raises(ValueError, match="Cannot read audio"):
        as_audio(np.zeros(3))


def test_audio_files_in_a_batch_are_decoded_block_by_block_by_the_feature_extractor(tmp_path, monkeypatch):
    """Paths (and `datasets.Audio(decode=False)` values) go to the feature extractor, which streams the file: the
    whole recording is never decoded at its own rate; the batch is what the decoded arrays give."""
    import soundfile

    from onepeace_hf.training import data as data_module

    t = np.arange(3 * 44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 220 * t)], axis=1).astype(np.float32)
    soundfile.write(tmp_path / "long.flac", stereo, 44100)
    mono = np.sin(2 * np.pi * 300 * np.arange(20000) / 16000).astype(np.float32)
    soundfile.write(tmp_path / "short.wav", mono, 16000, subtype="FLOAT")
    processor = OnePeaceProcessor()
    decoded = [soundfile.read(tmp_path / name, dtype="float32") for name in ("long.flac", "short.wav")]
    expected = data_module.audio_inputs(processor, [{"array": w, "sampling_rate": r} for w, r in decoded])

    def whole_file(*args, **kwargs):
        raise AssertionError("decoded whole")

    monkeypatch.setattr(data_module, "load_audio", whole_file)
    values = [str(tmp_path / "long.flac"), {"path": str(tmp_path / "short.wav"), "bytes": None}]
    batch = data_module.audio_inputs(processor, values)
    assert batch["input_values"].shape == (2, 48000) and batch["padding_mask"].sum(1).tolist() == [48000, 20000]
    torch.testing.assert_close(batch["input_values"], expected["input_values"], rtol=0, atol=0)
    assert torch.equal(batch["padding_mask"], expected["padding_mask"])
    with pytest.raises(ValueError, match="missing.wav does not exist"):
        data_module.audio_inputs(processor, [str(tmp_path / "missing.wav")])


def test_training_arguments_validation():
    with pytest.raises(ValueError, match="exactly one of max_steps and num_epochs"):
        TrainingArguments(output_dir="x")
    with pytest.raises(ValueError, match="exactly one of max_steps and num_epochs"):
        TrainingArguments(output_dir="x", max_steps=3, num_epochs=1)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingArguments(output_dir="x", max_steps=3, warmup_ratio=2.0)
    with pytest.raises(ValueError, match="max_steps must be >= 1, got 0"):
        TrainingArguments(output_dir="x", max_steps=0)
    with pytest.raises(ValueError, match="logging_steps must be >= 1"):
        TrainingArguments(output_dir="x", max_steps=3, logging_steps=0)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainingArguments(output_dir="x", max_steps=3, mixed_precision="bf32")


def test_scripts_report_bad_settings_and_a_previous_run_as_usage_errors(tmp_path, monkeypatch, capsys):
    parser = HfArgumentParser((DataArguments, TrainingArguments))

    def usage_error(*argv) -> str:
        monkeypatch.setattr(sys, "argv", ["script.py", "--synthetic", "4", *argv])
        with pytest.raises(SystemExit) as exit_info:
            parse_script_arguments(parser)
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert usage_error("--output_dir", "x", "--max_steps", "0").endswith(": error: max_steps must be >= 1, got 0.")
    assert "min_lr (1e-06) must be in [0, learning_rate 1e-07)" in usage_error(
        "--output_dir", "x", "--max_steps", "2", "--learning_rate", "1e-7")
    assert usage_error("--output_dir", "x", "--max_steps", "4", "--warmup_steps", "10").endswith(
        "warmup_steps must be in [0, max_steps 4], got 10.")
    (tmp_path / "training_log.jsonl").write_text("{}\n")
    assert "holds a previous run" in usage_error("--output_dir", str(tmp_path), "--max_steps", "2")
    resume = ["--output_dir", str(tmp_path), "--max_steps", "2", "--resume_from_checkpoint", "latest"]
    no_checkpoint = f"resume_from_checkpoint='latest' but {tmp_path}/checkpoints has no checkpoint."
    assert usage_error(*resume).endswith(no_checkpoint)
    (tmp_path / "checkpoints" / f"{CHECKPOINT_PREFIX}2").mkdir(parents=True)
    assert usage_error(*resume).endswith("are incomplete (no custom_checkpoint_*.pkl).")
    (tmp_path / "checkpoints" / f"{CHECKPOINT_PREFIX}2" / "custom_checkpoint_0.pkl").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["script.py", "--synthetic", "4", "--output_dir", str(tmp_path), "--max_steps",
                                      "2", "--resume_from_checkpoint", "latest", "--report_to", "none"])
    _, args = parse_script_arguments(parser)
    assert args.report_to == []

    # Paths that do not exist: named as such, not as transformers' "Repo id must be in the form ..." traceback.
    parser.add_argument("--model")
    fresh = ["--output_dir", str(tmp_path / "new"), "--max_steps", "2"]
    assert usage_error(*fresh, "--model", str(tmp_path / "nowhere")).endswith(
        f"--model {tmp_path / 'nowhere'}: no such file or folder (nor a Hub model id).")
    monkeypatch.setattr(sys, "argv", ["script.py", "--digits_root", str(tmp_path / "nodigits"), *fresh])
    with pytest.raises(SystemExit):
        parse_script_arguments(parser)
    assert capsys.readouterr().err.strip().endswith(f"--digits_root {tmp_path / 'nodigits'} is not a folder "
                                                    "(the digits set is data/digits).")
    digits = Path(__file__).resolve().parents[1] / "data" / "digits"
    monkeypatch.setattr(sys, "argv", ["script.py", "--digits_root", str(digits), "--eval_split", "validation", *fresh])
    with pytest.raises(SystemExit):
        parse_script_arguments(parser)
    assert capsys.readouterr().err.strip().endswith(
        f"The digits set at {digits} has no split 'validation'; its splits are ['test', 'train'].")
    monkeypatch.setattr(sys, "argv", ["script.py", "--synthetic", "4", "--model", "OFA-Sys/one-peace", *fresh])
    assert parse_script_arguments(parser)[2].model == "OFA-Sys/one-peace"  # a Hub id is left to from_pretrained


def test_negative_flags_say_what_they_do_and_keep_the_default(monkeypatch, capsys):
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    common = ["script.py", "--synthetic", "4", "--output_dir", "x", "--max_steps", "1"]
    monkeypatch.setattr(sys, "argv", [*common, "--help"])
    with pytest.raises(SystemExit):
        parse_script_arguments(parser)
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no-find-unused-parameters turn --find_unused_parameters off --report_to" in help_text
    for extra, expected in (([], True), (["--no_find_unused_parameters"], False)):
        monkeypatch.setattr(sys, "argv", [*common, *extra])
        assert parse_script_arguments(HfArgumentParser((DataArguments, TrainingArguments)))[1].find_unused_parameters \
            is expected


class _Process:
    """An Accelerator stand-in for one of two processes; `reduce` adds the rows the other process sent (`partner`)."""

    device, num_processes = "cpu", 2

    def __init__(self, partner=None):
        self.partner, self.sent = partner, None

    def reduce(self, local, reduction):
        self.sent = local
        return local if self.partner is None else local + self.partner.sent


def test_logged_metrics_reduce_the_same_names_on_every_process(monkeypatch):
    """Counts are summed over processes, losses averaged, and a term skipped on one process only (a one-word
    caption) neither breaks the reduce nor loses the other process's value."""
    first, second = _Metrics(), _Metrics()
    first.add({"loss": torch.tensor(1.0), "i2t_ncorrect": torch.tensor(1.0), "skipped": ["dcl_vl_text_loss"]})
    second.add({"loss": torch.tensor(3.0), "i2t_ncorrect": torch.tensor(2.0), "dcl_vl_text_loss": torch.tensor(5.0)})
    both = ["i2t_ncorrect", "loss", "skipped/dcl_vl_text_loss", "dcl_vl_text_loss", "i2t_ncorrect", "loss"]
    monkeypatch.setattr(trainer_module, "gather_object", lambda names: both)
    second_process = _Process()
    second.averages(second_process)
    assert first.averages(_Process(partner=second_process)) == {
        "dcl_vl_text_loss": 5.0, "i2t_ncorrect": 3.0, "loss": 2.0, "skipped/dcl_vl_text_loss": 1,
    }


def test_epochs_count_the_last_incomplete_accumulation_as_a_step(pretraining_model, tmp_path):
    """16 rows in batches of 4 with 3 micro-batches per step: Accelerate steps after batches 3 and 4 of each epoch."""
    model = copy.deepcopy(pretraining_model)

    def criterion(model, x):
        return {"loss": (model.logit_scale * x).sum()}

    rows = [{"x": torch.tensor(1.0)} for _ in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), num_epochs=2, per_device_batch_size=4, gradient_accumulation_steps=3,
        logging_steps=1, find_unused_parameters=False,
    )
    train(model, criterion, rows, torch.utils.data.default_collate, args)
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert [(entry["step"], entry["epoch"]) for entry in log] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert (tmp_path / "final" / "model.safetensors").exists()
    # Checkpoints and final/ are written under hidden names and renamed when complete: nothing else is left.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoints", "final", "training_log.jsonl"]
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]
    # Extending the run: the new final/ replaces the old one whole (an adapter file of the old one would stay).
    (tmp_path / "final" / "adapter_config.json").write_text("{}")
    args = TrainingArguments(
        output_dir=str(tmp_path), num_epochs=3, per_device_batch_size=4, gradient_accumulation_steps=3,
        logging_steps=1, find_unused_parameters=False, resume_from_checkpoint="latest",
    )
    train(model, criterion, rows, torch.utils.data.default_collate, args)
    assert sorted(path.name for path in (tmp_path / "final").iterdir()) == ["config.json", "model.safetensors"]


def test_a_training_set_smaller_than_one_step_is_refused_with_its_numbers(pretraining_model, tmp_path):
    def criterion(model, x):
        return {"loss": (model.logit_scale * x).sum()}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_batch_size=4,
                             find_unused_parameters=False)
    with pytest.raises(ValueError, match=r"training set \(3 rows\) is smaller than one optimizer step: 4 rows per "
                                         r"batch x 1 processes x 1 accumulation steps"):
        train(copy.deepcopy(pretraining_model), criterion, [{"x": torch.tensor(1.0)}] * 3,
              torch.utils.data.default_collate, args)


def test_eval_steps_without_anything_to_evaluate_is_said(pretraining_model, tmp_path, caplog):
    def criterion(model, x):
        return {"loss": (model.logit_scale * x).sum()}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_batch_size=2, eval_steps=1,
                             find_unused_parameters=False)
    with caplog.at_level(logging.WARNING, logger="onepeace_hf.training.trainer"):
        train(copy.deepcopy(pretraining_model), criterion, [{"x": torch.tensor(1.0)}] * 2,
              torch.utils.data.default_collate, args)
    assert "--eval_steps 1 is set, but there is nothing to evaluate on (no --eval_split)" in caplog.text


def test_settings_that_would_be_silently_ignored_or_lose_checkpoints_are_refused():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA GPU: on CPU Accelerate ignores it"):
            TrainingArguments(output_dir="x", max_steps=1, mixed_precision="fp16")
    with pytest.raises(ValueError, match="save_total_limit must be >= 0"):
        TrainingArguments(output_dir="x", max_steps=1, save_total_limit=-1)


def test_pretrain_script_creates_the_same_weights_for_the_same_seed(tmp_path, monkeypatch):
    """--config starts from random weights (and --model from a random decoder): the seed must fix them."""
    config = tmp_path / "config.json"
    OnePeaceConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        audio_conv_spec=[[8, 10, 5], [8, 8, 4]], audio_max_samples=20000,
        decoder_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
    ).to_json_file(config)
    finals = []
    for run in ("a", "b"):
        monkeypatch.setattr(sys, "argv", [
            "pretrain.py", "--stage", "vision_language", "--config", str(config), "--synthetic", "4",
            "--synthetic_eval", "0", "--per_device_batch_size", "4", "--max_steps", "1",
            "--output_dir", str(tmp_path / run),
        ])
        runpy.run_path(str(REPO / "examples" / "pretrain.py"), run_name="__main__")
        finals.append(load_file(tmp_path / run / "final" / "model.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_shipped_accelerate_configs_are_valid(pretraining_model):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.dataclasses import get_module_class_from_name

    from onepeace_hf.modeling_onepeace import OnePeaceFusionLayer

    folder = Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs"
    configs = {path.name: load_config_from_file(str(path)) for path in sorted(folder.glob("*.yaml"))}
    assert configs["fsdp_8gpu_4b.yaml"].distributed_type == DistributedType.FSDP
    assert configs["fsdp_8gpu_4b.yaml"].num_processes == 8
    assert configs["deepspeed_zero3_8gpu.yaml"].distributed_type == DistributedType.DEEPSPEED
    # Left to the arguments: `accelerate launch` would export a value here that overrides them.
    deepspeed = configs["deepspeed_zero3_8gpu.yaml"].deepspeed_config
    assert "gradient_accumulation_steps" not in deepspeed and "gradient_clipping" not in deepspeed
    assert configs["cpu_2proc.yaml"].num_processes == 2
    # FSDP's auto-wrap finds the fusion layer class by name in the model.
    layer_name = configs["fsdp_8gpu_4b.yaml"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert get_module_class_from_name(pretraining_model, layer_name) is OnePeaceFusionLayer


def test_training_half_precision_weights_warns(pretraining_model, caplog):
    """A checkpoint loaded in its stored bf16 would silently lose AdamW's small updates (the shipped model's
    logit scale never moved); frozen half-precision weights (a LoRA base) are fine."""
    half = copy.deepcopy(pretraining_model).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="onepeace_hf.training.trainer"):
        warn_if_trained_in_half_precision(pretraining_model)
        assert caplog.text == ""
        half.requires_grad_(False)
        warn_if_trained_in_half_precision(half)
        assert caplog.text == ""
        half.logit_scale.requires_grad_(True)
        warn_if_trained_in_half_precision(half)
    assert "Training OnePeaceForPretraining weights in torch.bfloat16" in caplog.text


def test_a_diverged_loss_is_shown_and_warned(tmp_path, caplog):
    """NaN metrics (nothing to count this step) stay out of the progress bar, a NaN loss does not: it is divergence."""
    accelerator = Accelerator(cpu=True)
    with caplog.at_level(logging.INFO, logger="onepeace_hf.training.trainer"):
        _log(accelerator, {"loss": 1.5, "i2t_ncorrect": float("nan")}, 1, tmp_path / "log.jsonl", None)
        assert "diverged" not in caplog.text and "i2t_ncorrect" not in caplog.text
        _log(accelerator, {"loss": torch.tensor(float("nan"))}, 2, tmp_path / "log.jsonl", None)
    assert "The loss is nan at step 2: training has diverged" in caplog.text
    assert "'loss': 'nan'" in caplog.text


def test_find_checkpoint_refuses_folders_that_are_not_training_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (2, 10):
        (checkpoints / f"step_{step:08d}").mkdir(parents=True)
        (checkpoints / f"step_{step:08d}" / "custom_checkpoint_0.pkl").write_bytes(b"")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"")
    assert find_checkpoint(tmp_path, "latest") == checkpoints / "step_00000010"
    assert find_checkpoint(tmp_path, str(checkpoints / "step_00000002")) == checkpoints / "step_00000002"
    (checkpoints / "step_00000012").mkdir()  # damaged: the weights, not the progress
    (checkpoints / "step_00000012" / "model.safetensors").write_bytes(b"")
    assert find_checkpoint(tmp_path, "latest") == checkpoints / "step_00000010"
    for wrong in (tmp_path / "final", tmp_path, checkpoints):
        with pytest.raises(FileNotFoundError, match="not a training checkpoint.*or 'latest'"):
            find_checkpoint(tmp_path, str(wrong))
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path / "missing"))


def test_deepspeed_config_takes_clipping_and_accumulation_from_the_arguments():
    args = TrainingArguments(output_dir="x", max_steps=3, max_grad_norm=2.5, gradient_accumulation_steps=4)
    config = {"gradient_clipping": "auto"}
    fill_deepspeed_config(config, args)
    assert config == {"gradient_clipping": 2.5, "gradient_accumulation_steps": 4}
    fill_deepspeed_config(config, args)  # the same values again: fine
    with pytest.raises(ValueError, match="gradient_clipping=1.0, the arguments 2.5"):
        fill_deepspeed_config({"gradient_clipping": 1.0}, args)


def test_an_accelerate_config_overriding_gradient_accumulation_is_an_error(monkeypatch):
    """`accelerate launch` exports the config's value, which Accelerator prefers over the argument: the run would
    accumulate over 1 batch while the trainer counts 2 per step."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1, the arguments 2"):
        create_accelerator(TrainingArguments(output_dir="x", max_steps=3, gradient_accumulation_steps=2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of a sharding config")
def test_an_fsdp_config_on_a_cpu_only_machine_is_named_as_not_used(monkeypatch, caplog):
    """Accelerate drops FSDP (and DeepSpeed) on CPU without a word: the user should know nothing is sharded."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` exports for an FSDP config
    try:
        with caplog.at_level(logging.WARNING, logger="onepeace_hf.training.trainer"):
            accelerator = create_accelerator(TrainingArguments(output_dir="x", max_steps=3))
        assert accelerator.distributed_type != DistributedType.FSDP
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "asks for FSDP, which Accelerate runs on GPUs only" in caplog.text


def test_pairs_load_from_save_to_disk_folders_and_bad_columns_or_splits_are_named(tmp_path):
    import datasets

    from onepeace_hf.training.recipes import DataArguments, load_pairs

    rows = datasets.Dataset.from_dict({"caption": ["a", "b"], "image": ["x.png", "y.png"]})
    datasets.DatasetDict({"train": rows}).save_to_disk(tmp_path / "dict")
    rows.save_to_disk(tmp_path / "single")  # one Dataset: the training split
    for folder in ("dict", "single"):
        data = DataArguments(dataset=str(tmp_path / folder), text_column="caption", image_column="image")
        assert load_pairs(data, "train")["caption"] == ["a", "b"]
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train'\]"):
        load_pairs(DataArguments(dataset=str(tmp_path / "dict"), text_column="caption", image_column="image"), "test")
    with pytest.raises(ValueError, match="single saved Dataset.*DatasetDict"):
        load_pairs(DataArguments(dataset=str(tmp_path / "single"), text_column="caption", image_column="image"), "test")
    with pytest.raises(ValueError, match=r"has no column \['text'\]; its columns are \['caption', 'image'\]"):
        load_pairs(DataArguments(dataset=str(tmp_path / "dict"), image_column="image"), "train")
    # Generated sets have fixed names: a --text_column meant for a real set does not break --synthetic.
    synthetic = DataArguments(synthetic=4, text_column="caption", image_column="picture")
    assert (synthetic.text_column, synthetic.image_column) == ("text", "image")
    assert {"text", "image"} <= set(load_pairs(synthetic, "train").column_names)


def test_retrieval_evaluation_counts_identical_captions_and_on_digits_the_same_digit(monkeypatch):
    """An embedding that sees only the digit cannot tell two captions of one digit apart: on the digits set that is
    a perfect retrieval model; counting only each row's own caption, its ties would all count as misses."""
    import datasets

    from onepeace_hf.training import recipes

    def by_digit(model, collate_fn, dataset, batch_size):
        digit = F.one_hot(torch.tensor(list(dataset["label"])), 10).float()
        return digit, digit

    monkeypatch.setattr(recipes, "embed_pairs", by_digit)
    collate_fn = PairCollator(None, image_column="image")
    digits = DataArguments(digits_root=str(Path(__file__).resolve().parents[1] / "data" / "digits"), eval_split="test")
    result = recipes._evaluator(digits, TrainingArguments(output_dir="x", max_steps=1), collate_fn)(None)
    assert result["image_to_text_R@1"] == result["text_to_image_R@1"] == 100.0

    # Elsewhere identical captions are the same answer, different captions are not.
    rows = datasets.Dataset.from_dict({"text": ["6", "6", "a six", "seven"], "label": [6, 6, 6, 7],
                                       "image": ["6a.png", "6b.png", "6c.png", "7.png"]})  # four pictures
    result = recipes.retrieval_evaluator(collate_fn, rows)(None)
    # Rows 0-2 tie on every digit-6 caption; "a six" is not the answer of rows 0 and 1, nor "6" that of row 2.
    assert result["image_to_text_R@1"] == 25.0 and result["image_to_text_R@5"] == 100.0

    def by_caption(model, collate_fn, dataset, batch_size):
        caption = F.one_hot(torch.tensor([list(dataset["text"]).index(t) for t in dataset["text"]]), 4).float()
        return caption, caption

    monkeypatch.setattr(recipes, "embed_pairs", by_caption)
    result = recipes.retrieval_evaluator(collate_fn, rows)(None)
    assert result["image_to_text_R@1"] == result["text_to_image_R@1"] == 100.0  # rows 0 and 1: either "6" is right


def test_a_single_data_file_and_list_captions(tmp_path):
    import datasets

    from onepeace_hf.training.recipes import load_pairs

    (tmp_path / "pairs.csv").write_text("path,caption\na.png,a dog\nb.png,a cat\n")
    data = DataArguments(dataset=str(tmp_path / "pairs.csv"), image_column="path", text_column="caption")
    assert list(load_pairs(data, "train")["caption"]) == ["a dog", "a cat"]
    with pytest.raises(ValueError, match=r"pairs.csv is one file, which stands for the 'train' split; split "
                                         r"'validation' needs a folder of split-named files \(train.csv, "):
        load_pairs(data, "validation")
    coco = datasets.Dataset.from_dict({"image": ["a.png"], "captions": [["a dog", "a brown dog"]]})
    coco.save_to_disk(tmp_path / "coco")
    with pytest.raises(ValueError, match="'captions' holds several texts per row .* one caption per row"):
        load_pairs(DataArguments(dataset=str(tmp_path / "coco"), image_column="image", text_column="captions"),
                   "train")


@pytest.mark.parametrize("script", ["finetune_retrieval.py", "pretrain.py"])
def test_scripts_check_their_data_before_loading_the_model(script, tmp_path, monkeypatch, capsys):
    import transformers

    from onepeace_hf import OnePeaceForPretraining

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", loaded)
    monkeypatch.setattr(OnePeaceForPretraining, "from_pretrained", loaded)
    (tmp_path / "pairs.csv").write_text("path,caption\na.png,a dog\n")
    stage = ["--stage", "vision_language"] if script == "pretrain.py" else []
    monkeypatch.setattr(sys, "argv", [script, "--model", str(tmp_path), "--dataset", str(tmp_path / "pairs.csv"),
                                      "--image_column", "path", "--text_column", "text", "--output_dir",
                                      str(tmp_path / "run"), "--max_steps", "1", *stage])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / script), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: Split 'train' has no column ['text']; its columns are ['path', 'caption'].")


@pytest.mark.parametrize("script", ["finetune_retrieval.py", "pretrain.py", "finetune_classification.py",
                                    "lora_classification.py"])
def test_scripts_check_their_evaluation_split_before_loading_the_model(script, tmp_path, monkeypatch, capsys):
    import transformers

    from onepeace_hf import OnePeaceForPretraining
    from onepeace_hf.training import classification

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    for owner, name in ((transformers.AutoModel, "from_pretrained"), (OnePeaceForPretraining, "from_pretrained"),
                        (classification, "load_classification_model")):
        monkeypatch.setattr(owner, name, loaded)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    image = tmp_path / "a.png"
    (tmp_path / "pairs.csv").write_text(f"path,caption,label\n{image},a dog,0\n{image},a cat,1\n")
    if "classification" in script:
        columns = ["--modality", "image", "--input_column", "path"]
    else:
        columns = ["--image_column", "path", "--text_column", "caption"]
    stage = ["--stage", "vision_language"] if script == "pretrain.py" else []
    monkeypatch.setattr(sys, "argv", [script, "--model", str(tmp_path), "--dataset", str(tmp_path / "pairs.csv"),
                                      *columns, "--eval_split", "validation", "--output_dir", str(tmp_path / "run"),
                                      "--max_steps", "1", *stage])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / script), run_name="__main__")
    assert exit_info.value.code == 2
    assert "split 'validation' needs a folder of split-named files" in capsys.readouterr().err.splitlines()[-1]


def test_undecoded_images_of_a_dataset_are_read(tmp_path):
    """datasets.Image(decode=False) gives {"bytes", "path"}, as Audio(decode=False) does for clips."""
    import datasets
    from PIL import Image

    from onepeace_hf.training.data import as_image

    picture = Image.new("RGB", (6, 4), (200, 10, 30))
    picture.save(tmp_path / "red.png")
    rows = datasets.Dataset.from_dict({"image": [str(tmp_path / "red.png")]}).cast_column("image", datasets.Image())
    stored = rows.cast_column("image", datasets.Image(decode=False))[0]["image"]
    for value in (stored, {"bytes": None, "path": str(tmp_path / "red.png")}):
        assert as_image(value).tobytes() == picture.tobytes()


def test_retrieval_evaluation_of_a_set_with_several_captions_per_image(monkeypatch):
    """COCO-style eval sets flattened to one caption per row repeat each image: its copies tie exactly, and a
    perfect model scored 0 at R@1 when only each row's own copy counted."""
    import datasets
    from PIL import Image

    from onepeace_hf.training import recipes

    pictures = [Image.new("RGB", (8, 8), (40 * k, 0, 0)) for k in range(3)]
    rows = datasets.Dataset.from_dict({
        "text": [f"caption {c} of picture {k}" for k in range(3) for c in range(2)],
        "image": [pictures[k] for k in range(3) for _ in range(2)],  # each picture twice, as datasets stores it
    }).cast_column("image", datasets.Image())

    def by_picture(model, collate_fn, dataset, batch_size):
        picture = F.one_hot(torch.arange(6) // 2, 3).float()  # the model sees which picture a caption is about
        return picture, picture

    monkeypatch.setattr(recipes, "embed_pairs", by_picture)
    result = recipes.retrieval_evaluator(PairCollator(None, image_column="image"), rows)(None)
    assert result["image_to_text_R@1"] == result["text_to_image_R@1"] == 100.0


def test_a_new_run_does_not_mix_with_a_previous_one_in_its_output_dir(tmp_path):
    accelerator = Accelerator(cpu=True)
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004" / "custom_checkpoint_0.pkl").write_bytes(b"")
    (tmp_path / "training_log.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    (tmp_path / "final").mkdir()

    def args(**kwargs):
        return TrainingArguments(output_dir=str(tmp_path), max_steps=8, **kwargs)

    with pytest.raises(ValueError, match="previous run .*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        clear_previous_run(args(), accelerator)
    clear_previous_run(args(resume_from_checkpoint="latest"), accelerator)  # continuing it: nothing touched
    assert (tmp_path / "training_log.jsonl").exists() and (tmp_path / "checkpoints").exists()
    (tmp_path / "eval_results.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    clear_previous_run(args(overwrite_output_dir=True), accelerator)
    # A stale final/ (a LoRA adapter beside the new full weights) or accuracy would pass for this run's.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    clear_previous_run(args(), accelerator)  # nothing left to mix with


def test_training_keeps_the_logit_scale_weight_in_the_original_bounds(pretraining_model, tmp_path):
    """A loss that raises the scale pushes the weight past ln 100 at every step; as in the original, each training
    step starts from the weight clamped back to ln 100 (and a weight below 0 from 0)."""
    model = copy.deepcopy(pretraining_model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100) - 1e-3)
    seen = []

    def criterion(model, x):
        seen.append(model.logit_scale.item())
        return {"loss": -(model.clamped_logit_scale() * x).sum()}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_batch_size=1, learning_rate=0.1,
                             find_unused_parameters=False)
    train(model, criterion, [{"x": torch.tensor(1.0)}] * 3, torch.utils.data.default_collate, args)
    assert seen[0] == pytest.approx(math.log(100) - 1e-3)
    assert seen[1:] == [pytest.approx(math.log(100), abs=1e-7)] * 2
    assert model.logit_scale.item() > math.log(100)  # the last step's update, clamped at the next step


@pytest.mark.parametrize("script", ["finetune_retrieval.py", "pretrain.py", "finetune_classification.py",
                                    "lora_classification.py"])
def test_every_script_option_says_what_it_does(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples" / script), run_name="__main__")
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.split("options:")[1].splitlines()
    undocumented = []
    for line, following in zip(lines, lines[1:] + [""]):
        option = re.match(r"^  (--\w+)", line)
        # argparse puts the help after two spaces on the same line, or indented on the next line.
        if option and len(re.split(r"\s{2,}", line.strip())) == 1 and not re.match(r"^ {20,}[^-\s]", following):
            undocumented.append(option.group(1))
    assert undocumented == []
