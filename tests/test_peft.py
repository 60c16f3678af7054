"""LoRA with PEFT: target selection per modality, what trains and what stays frozen, save/reload, merging,
activation checkpointing, and a short run that learns."""

import copy
import re

import peft
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from onepeace_hf import (
    OnePeaceConfig,
    OnePeaceForAudioClassification,
    OnePeaceForImageClassification,
    OnePeaceForPretraining,
    OnePeaceModel,
    OnePeaceProcessor,
    load_lora_classifier,
    lora_classifier_kwargs,
    lora_config_for,
    lora_target_modules,
    save_classifier_labels,
    write_adapter_card,
)
from onepeace_hf.model_card import validate_model_card
from onepeace_hf.peft_utils import lora_target_names
from onepeace_hf.training import create_optimizer, enable_activation_checkpointing
from onepeace_hf.training.data import as_audio
from onepeace_hf.training.synthetic import synthetic_pairs

from .conftest import tiny_random_config


R = 4
NUM_LABELS = 8


def audio_batch(dataset) -> dict:
    clips = [as_audio(value)[0] for value in dataset["audio"]]
    batch = dict(OnePeaceProcessor()(audio=clips, sampling_rate=16000, return_tensors="pt"))
    return {**batch, "labels": torch.tensor(list(dataset["label"]))}


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    model.eval()
    return model(input_values=batch["input_values"], padding_mask=batch["padding_mask"]).logits


def accuracy(model, batch: dict) -> float:
    return (logits_of(model, batch).argmax(-1) == batch["labels"]).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# Target selection
# ----------------------------------------------------------------------------------------------------------------------


def expected_names(num_layers, attention, modalities):
    names = []
    for i in range(num_layers):
        if attention:
            names += [f"encoder.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        for modality in modalities:
            names += [f"encoder.layers.{i}.ffn.{modality}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return sorted(names)


@pytest.mark.parametrize("attention, modalities", [
    (True, ("audio",)), (False, ("audio",)), (True, ()), (False, ("image", "text")), (True, ("text", "image", "audio")),
])
def test_target_modules_select_the_attention_and_the_requested_ffns(attention, modalities):
    config = tiny_random_config(num_hidden_layers=3)
    with torch.device("meta"):
        model = OnePeaceModel(config)
    pattern = lora_target_modules(config, modalities, attention=attention, ffn=True)
    assert sorted(lora_target_names(model, pattern)) == expected_names(3, attention, modalities)


def test_pretraining_decoder_is_never_a_target():
    config = OnePeaceConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        audio_conv_spec=[[8, 10, 5], [8, 8, 4]], audio_max_samples=20000,
        decoder_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
    )
    with torch.device("meta"):
        model = OnePeaceForPretraining(config)
    assert any(name.startswith("decoder.layers.0.ffn.audio") for name, _ in model.named_modules())
    names = lora_target_names(model, lora_target_modules(config, ("audio",)))
    assert sorted(names) == expected_names(2, True, ("audio",))


def test_bad_target_requests_are_refused_clearly():
    config = tiny_random_config()
    with pytest.raises(ValueError, match=r"Unknown modality \['video'\].*\('text', 'image', 'audio'\)"):
        lora_target_modules(config, ("audio", "video"))
    with pytest.raises(ValueError, match="Nothing to adapt"):
        lora_target_modules(config, ("audio",), attention=False, ffn=False)
    audio_only = tiny_random_config(modalities=["audio"])
    with pytest.raises(ValueError, match=r"Unknown modality \['image'\]"):
        lora_target_modules(audio_only, "image")
    model = OnePeaceForImageClassification(tiny_random_config(num_labels=3)).fuse_projections()
    with pytest.raises(ValueError, match="unfuse_projections"):
        lora_config_for(model)
    config = lora_config_for(model.unfuse_projections())
    assert set(lora_target_names(model, config.target_modules)) == set(expected_names(2, True, ("image",)))


def test_audio_ffn_only_lora_leaves_image_and_text_outputs_bit_identical():
    torch.manual_seed(0)
    base = OnePeaceModel(tiny_random_config(drop_path_rate=0.0)).eval()
    inputs = dict(input_ids=torch.tensor([[5, 6, 2]]), pixel_values=torch.randn(1, 3, 32, 32),
                  input_values=torch.randn(1, 16000))
    with torch.no_grad():
        expected = base(**inputs)
        # init_lora_weights=False: B is random, so the adapters change what they touch from the start.
        config = lora_config_for(base, modalities="audio", attention=False, init_lora_weights=False)
        adapted = peft.get_peft_model(copy.deepcopy(base), config).eval()(**inputs)
    assert torch.equal(adapted.image_embeds, expected.image_embeds)
    assert torch.equal(adapted.text_embeds, expected.text_embeds)
    assert not torch.allclose(adapted.audio_embeds, expected.audio_embeds, atol=1e-4)


def test_lora_config_defaults_to_the_models_branch_and_its_head():
    model = OnePeaceForAudioClassification(tiny_random_config(num_labels=3))
    config = lora_config_for(model, r=R, lora_alpha=8)
    assert isinstance(config, peft.LoraConfig) and (config.r, config.lora_alpha) == (R, 8)
    assert set(config.modules_to_save) == {"classification_head"}
    assert sorted(lora_target_names(model, config.target_modules)) == expected_names(2, True, ("audio",))
    assert lora_config_for(OnePeaceModel(tiny_random_config())).modules_to_save is None


# ----------------------------------------------------------------------------------------------------------------------
# A short LoRA run on synthetic tones (8 classes, chance 12.5%)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A random audio classifier saved as the base, LoRA (attention + audio FFN, r=4) plus the head trained for 30
    steps; the base parameters before training and the validation accuracy before and after. About 10 s, so the
    tests using it are marked slow."""
    base_dir = tmp_path_factory.mktemp("lora_base")
    torch.manual_seed(0)
    config = tiny_random_config(num_labels=NUM_LABELS, drop_path_rate=0.0)
    OnePeaceForAudioClassification(config).save_pretrained(base_dir)
    base = OnePeaceForAudioClassification.from_pretrained(base_dir)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    train_batch = audio_batch(synthetic_pairs(128, "audio", seed=0))
    val_batch = audio_batch(synthetic_pairs(64, "audio", seed=1))

    model = peft.get_peft_model(base, lora_config_for(base, r=R))
    accuracy_before = accuracy(model, val_batch)
    optimizer = create_optimizer(model, learning_rate=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        rows = torch.randperm(128, generator=generator)[:16]
        model(**{k: v[rows] for k, v in train_batch.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    accuracy_after = accuracy(model, val_batch)
    return dict(model=model, base_dir=base_dir, before=before, config=config, val_batch=val_batch,
                accuracy_before=accuracy_before, accuracy_after=accuracy_after)


@pytest.mark.slow
def test_trainable_parameters_are_what_the_targets_imply(lora_run):
    model, config = lora_run["model"], lora_run["config"]
    h, i, n = config.hidden_size, config.intermediate_size, NUM_LABELS
    per_layer = 4 * R * (h + h) + 2 * R * (h + i) + R * (i + h)  # q/k/v/out; gate, up (h -> i); down (i -> h)
    inner = int(h * config.classifier_head_scale_ratio)
    head = 2 * h + (h * inner + inner) + 2 * inner + (inner * n + n)  # norm; Linear, LayerNorm, Linear of the MLP
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == config.num_hidden_layers * per_layer + head
    assert all("lora_" in name or ".modules_to_save." in name for name in trainable)


@pytest.mark.slow
def test_frozen_weights_are_bit_identical_after_training(lora_run):
    model, before = lora_run["model"], lora_run["before"]
    changed, checked = [], 0
    for name, parameter in model.named_parameters():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        original = re.sub(r"^base_model\.model\.|\.base_layer|\.original_module", "", name)
        checked += 1
        if not torch.equal(parameter, before[original]):
            changed.append(name)
    assert checked == len(before) and not changed
    # The image and text FFNs are not even wrapped: plain Linear layers, untouched.
    for name, module in model.named_modules():
        if re.search(r"\.ffn\.(image|text)\.\w+_proj$", name):
            assert type(module) is torch.nn.Linear, name
    lora_b = [p for name, p in model.named_parameters() if "ffn.audio" in name and "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the audio FFN adapters did train (B starts at 0)


@pytest.mark.slow
def test_short_lora_run_beats_the_untrained_model(lora_run):
    before, after = lora_run["accuracy_before"], lora_run["accuracy_after"]
    print(f"validation accuracy before {before:.3f}, after {after:.3f}")
    assert after >= before + 0.4 and after >= 0.6


@pytest.mark.slow
def test_merged_model_gives_the_adapter_models_outputs(lora_run):
    model, batch = lora_run["model"], lora_run["val_batch"]
    expected = logits_of(model, batch)
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is OnePeaceForAudioClassification
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, batch), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_saved_adapter_reloads_on_a_fresh_base(lora_run, tmp_path):
    model, batch = lora_run["model"], lora_run["val_batch"]
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("lora_" in key or "classification_head" in key for key in saved)
    fresh = OnePeaceForAudioClassification.from_pretrained(lora_run["base_dir"])
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(model, batch), rtol=0, atol=1e-6)
    untrained = logits_of(OnePeaceForAudioClassification.from_pretrained(lora_run["base_dir"]), batch)
    assert not torch.allclose(logits_of(reloaded, batch), untrained, atol=1e-3)


def test_lora_classifier_reloads_with_its_labels_from_the_adapter_folder(tmp_path):
    """A PEFT folder has no config.json: without the saved labels a reload gets LABEL_0... and a 2-way head."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    torch.manual_seed(0)
    OnePeaceModel(tiny_random_config()).save_pretrained(base_dir)  # a converted encoder: no head, no labels
    names = ["dog", "rain", "siren"]
    model = OnePeaceForAudioClassification.from_pretrained(  # the fine-tuned originals' head, not the base's
        base_dir, num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        problem_type="multi_label_classification", classifier_pooling="attention", classifier_head_scale_ratio=2,
        classifier_use_pooler=True,
    )
    model = peft.get_peft_model(model, lora_config_for(model, r=R, init_lora_weights=False))
    model.save_pretrained(adapter_dir)
    save_classifier_labels(model, adapter_dir)
    batch = {"input_values": torch.randn(2, 16000), "padding_mask": torch.ones(2, 16000, dtype=torch.long)}

    reloaded = load_lora_classifier(adapter_dir)
    assert reloaded.config.id2label == dict(enumerate(names))
    assert reloaded.config.label2id == {"dog": 0, "rain": 1, "siren": 2}
    assert reloaded.config.problem_type == "multi_label_classification"
    assert reloaded.config.classifier_pooling == "attention" and reloaded.config.classifier_head_scale_ratio == 2
    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(model, batch), rtol=0, atol=1e-6)

    # PEFT's own loader, as the adapter card shows it: the class from adapter_config.json's auto_mapping.
    kwargs = lora_classifier_kwargs(adapter_dir)
    with pytest.raises(ValueError, match="import allowlist"):
        peft.AutoPeftModel.from_pretrained(str(adapter_dir), **kwargs)
    auto = peft.AutoPeftModel.from_pretrained(str(adapter_dir), import_allowlist=["onepeace_hf"], **kwargs)
    assert type(auto.get_base_model()) is OnePeaceForAudioClassification
    assert auto.config.id2label == dict(enumerate(names)) and auto.config.classifier_pooling == "attention"
    torch.testing.assert_close(logits_of(auto, batch), logits_of(model, batch), rtol=0, atol=1e-6)

    moved = tmp_path / "moved_base"
    base_dir.rename(moved)  # the base given explicitly when it is no longer where training found it
    with pytest.raises(FileNotFoundError, match="pass base_model="):
        load_lora_classifier(adapter_dir)
    assert load_lora_classifier(adapter_dir, base_model=moved).config.id2label == dict(enumerate(names))
    (adapter_dir / "classifier_labels.json").unlink()
    with pytest.raises(FileNotFoundError, match="classifier_labels.json"):
        load_lora_classifier(adapter_dir, base_model=moved)


def test_a_base_recorded_by_a_relative_folder_name_is_explained(tmp_path, monkeypatch):
    """A base loaded as "onepeace-4b" from the working directory is recorded so: elsewhere it reads as a Hub id."""
    model = OnePeaceForAudioClassification(tiny_random_config(num_labels=2))
    model = peft.get_peft_model(model, lora_config_for(model, r=R))
    model.peft_config["default"].base_model_name_or_path = "onepeace-4b"
    model.save_pretrained(tmp_path)
    save_classifier_labels(model, tmp_path)

    def offline(*args, **kwargs):  # what from_pretrained raises for a Hub id it cannot reach (after retries)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(OnePeaceForAudioClassification, "from_pretrained", offline)
    with pytest.raises(OSError, match=r"couldn't connect(.|\n)*'onepeace-4b' \(adapter_config.json\) could not be "
                                      r"loaded; if it is a local folder, pass its path as base_model="):
        load_lora_classifier(tmp_path)
    with pytest.raises(OSError, match=r"couldn't connect to 'https://huggingface.co' to load the files.$"):
        load_lora_classifier(tmp_path, base_model="onepeace-4b")  # given by the caller: their error as it is


def test_lora_classifier_loads_a_bf16_base_in_float32_unless_told(tmp_path):
    """The adapter was trained on float32 weights: a bf16 base would shift its logits and its merge."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    OnePeaceModel(tiny_random_config()).to(torch.bfloat16).save_pretrained(base_dir)  # converted with --dtype bf16
    model = OnePeaceForAudioClassification.from_pretrained(base_dir, num_labels=2, dtype=torch.float32)
    model = peft.get_peft_model(model, lora_config_for(model, r=R))
    model.save_pretrained(adapter_dir)
    save_classifier_labels(model, adapter_dir)
    assert load_lora_classifier(adapter_dir).base_model.model.dtype == torch.float32
    assert load_lora_classifier(adapter_dir, dtype=torch.bfloat16).base_model.model.dtype == torch.bfloat16


def test_adapter_card_replaces_peft_template_and_passes_hub_checks(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    torch.manual_seed(0)
    OnePeaceModel(tiny_random_config()).save_pretrained(base_dir)
    (base_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    names = [f"class_{i}" for i in range(25)]
    model = OnePeaceForAudioClassification.from_pretrained(base_dir, num_labels=25, id2label=dict(enumerate(names)))
    model = peft.get_peft_model(model, lora_config_for(model, r=R))
    model.save_pretrained(adapter_dir)
    assert "[More Information Needed]" in (adapter_dir / "README.md").read_text()  # PEFT's template

    write_adapter_card(model, adapter_dir)
    text = (adapter_dir / "README.md").read_text()
    validate_model_card(text)  # licence (the base's), library_name, pipeline_tag; no local path as base_model
    assert "[More Information Needed]" not in text
    card = ModelCard.load(adapter_dir / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "audio-classification"
    assert card.data.license == "apache-2.0" and card.data.base_model is None
    assert not any(str(base_dir) in tag for tag in card.data.tags)  # PEFT's "base_model:adapter:<path>" tag
    assert str(base_dir) in card.text and "load_lora_classifier" in card.text and "lora_classifier_kwargs" in card.text
    assert "`class_19` and 5 more" in card.text and "class_20" not in card.text
    assert f"LoRA rank {R}" in card.text and "classification_head" in card.text

    model.peft_config["default"].base_model_name_or_path = "OFA-Sys/ONE-PEACE"  # a base from the Hub
    write_adapter_card(model, adapter_dir)
    validate_model_card((adapter_dir / "README.md").read_text())
    card = ModelCard.load(adapter_dir / "README.md")
    assert card.data.base_model == "OFA-Sys/ONE-PEACE" and "https://huggingface.co/OFA-Sys/ONE-PEACE" in card.text


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------------------------------


def test_every_adapter_output_requires_grad_when_enabled():
    torch.manual_seed(0)
    model = OnePeaceModel(tiny_random_config()).requires_grad_(False)
    inputs = dict(input_ids=torch.tensor([[5, 6, 2]]), pixel_values=torch.randn(1, 3, 32, 32),
                  input_values=torch.randn(1, 16000), output_hidden_states=True)

    def first_states(output):
        return [output[f"{m}_hidden_states"][0] for m in ("text", "image", "audio")]

    assert not any(state.requires_grad for state in first_states(model(**inputs)))
    model.enable_input_require_grads()
    assert all(state.requires_grad for state in first_states(model(**inputs)))
    model.enable_input_require_grads()  # again: still one hook per adapter
    assert len(model._require_grads_hooks) == 3
    model.disable_input_require_grads()
    assert not any(state.requires_grad for state in first_states(model(**inputs)))


def test_checkpointed_lora_gradients_equal_plain_ones_without_warnings(recwarn):
    """Reentrant checkpointing gives the LoRA weights inside a layer no gradient unless the layer's input requires
    grad; PEFT asks the model for that through `enable_input_require_grads`, which must cover the audio adapter."""
    torch.manual_seed(0)
    base = OnePeaceForAudioClassification(tiny_random_config(num_labels=NUM_LABELS, drop_path_rate=0.0))
    inputs = dict(input_values=torch.randn(2, 16000), labels=torch.tensor([1, 3]))
    root_logger = transformers_logging.get_logger("transformers")

    def lora_gradients(checkpointing: bool) -> dict:
        model = copy.deepcopy(base)
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=True)
        torch.manual_seed(1)
        # init_lora_weights=False: B is random too, so the gradients of both A and B are non-zero.
        model = peft.get_peft_model(model, lora_config_for(model, r=R, init_lora_weights=False)).train()
        model(**inputs).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if "lora_" in name}

    transformers_logging.warning_once.cache_clear()  # a warning already given once would otherwise stay silent
    plain = lora_gradients(False)
    recwarn.clear()
    with CaptureLogger(root_logger) as logged:
        checkpointed = lora_gradients(True)
    assert logged.out == ""
    # PEFT itself reads transformers' deprecated `is_gradient_checkpointing`: not ours, and not about gradients.
    ours = [w for w in recwarn if "is_gradient_checkpointing" not in str(w.message)]
    assert not ours, [str(w.message) for w in ours]
    assert len(plain) == 2 * 7 * 2 and plain.keys() == checkpointed.keys()  # A and B, 7 projections, 2 layers
    for name, gradient in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], gradient, rtol=0, atol=1e-6)


def test_lora_checkpoints_hold_the_trained_weights_only_and_resume_exactly(tmp_path):
    """A checkpoint of a LoRA run holds the adapter and the head, not the frozen base (16 GB at 4B); resuming from it
    on the same base continues as the uninterrupted run."""
    from onepeace_hf import OnePeaceImageProcessor
    from onepeace_hf.training import TrainingArguments, train
    from onepeace_hf.training.classification import ClassificationCollator, classification_criterion

    torch.manual_seed(0)
    base = OnePeaceForImageClassification(tiny_random_config(num_labels=NUM_LABELS, drop_path_rate=0.0))
    rows = list(synthetic_pairs(16, "image", seed=0))
    collate = ClassificationCollator(OnePeaceImageProcessor(size={"height": 32, "width": 32}), "image", "image")

    def run(output_dir, attention=True, **settings):
        torch.manual_seed(1)  # the same LoRA initialization each time
        model = peft.get_peft_model(copy.deepcopy(base), lora_config_for(base, r=R, attention=attention))
        args = TrainingArguments(output_dir=str(output_dir), max_steps=4, per_device_batch_size=4, save_steps=2,
                                 learning_rate=1e-2, find_unused_parameters=False, **settings)
        train(model, classification_criterion, rows, collate, args)
        return model

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", stop_after_steps=2)
    checkpoint = load_file(tmp_path / "cut" / "checkpoints" / "step_00000002" / "model.safetensors")
    trained = {name for name, p in whole.named_parameters() if p.requires_grad}
    assert {re.sub(r"^model\.", "", name) for name in checkpoint} == trained
    run(tmp_path / "ffn_only", attention=False, stop_after_steps=2)
    with pytest.raises(ValueError, match="lacks .* trained weights of this model"):  # another adapter layout
        run(tmp_path / "ffn_only", resume_from_checkpoint="latest")
    resumed = run(tmp_path / "cut", resume_from_checkpoint="latest")
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
