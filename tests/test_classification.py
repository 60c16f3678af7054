"""Classification task models: parity with the original classify model, conversion, losses and the head's parts."""

import copy
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from onepeace_hf import OnePeaceConfig
from onepeace_hf.conversion import (
    CheckpointConversionError,
    config_from_checkpoint,
    convert_state_dict,
    load_original_checkpoint,
)
from onepeace_hf.modeling_onepeace_tasks import (
    OnePeaceAttentionPooling,
    OnePeaceClassificationHead,
    OnePeaceForAudioClassification,
    OnePeaceForImageClassification,
)

from .conftest import CLASSIFY_CHECKPOINT, REFERENCE, REPO_ROOT


def converted_model(model_class, checkpoint):
    config = config_from_checkpoint(checkpoint)
    with torch.device("meta"):
        keys = set(model_class(config).state_dict())
    model = model_class(config)
    model.load_state_dict(convert_state_dict(checkpoint["model"], config, keys), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def classify_checkpoint():
    return load_original_checkpoint(CLASSIFY_CHECKPOINT)


@pytest.fixture(scope="module")
def classify_expected():
    return load_file(REFERENCE / "expected_tiny_classify_image.safetensors")


@pytest.fixture(scope="module")
def classify_model(classify_checkpoint):
    return converted_model(OnePeaceForImageClassification, classify_checkpoint)


def test_config_derived_as_the_original_builds_it(classify_checkpoint):
    config = config_from_checkpoint(classify_checkpoint)
    assert config.modalities == ["image"]
    assert config.rel_pos_table_per_layer and config.image_rel_bucket_size == 256 // 16
    assert config.num_labels == 5 and len(config.id2label) == 5
    assert config.classifier_pooling == "cls" and not config.classifier_use_pooler
    assert config.classifier_head_scale_ratio == 2 and config.classifier_dropout == 0.0


def test_image_classification_matches_the_original(classify_model, classify_expected, expected):
    with torch.no_grad():
        out = classify_model(pixel_values=expected["inputs.src_images"], output_hidden_states=True)
    torch.testing.assert_close(out.logits, classify_expected["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, classify_expected["image.hidden"], atol=1e-5, rtol=0)
    assert out.loss is None and len(out.hidden_states) == classify_model.config.num_hidden_layers + 1
    # The two layers' relative-position tables differ in this checkpoint: both must be in use.
    tables = classify_model.adapters["image"].rel_pos.tables
    assert len(tables) == 2 and not torch.equal(tables[0].weight, tables[1].weight)


def test_cli_converts_the_classify_checkpoint_for_auto_loading(tmp_path, classify_model, classify_expected, expected):
    from transformers import AutoConfig, AutoModelForImageClassification

    output = tmp_path / "classify"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "conversion" / "convert_original_checkpoint.py"),
         "--checkpoint", str(CLASSIFY_CHECKPOINT), "--output-dir", str(output)],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert AutoConfig.from_pretrained(output).architectures == ["OnePeaceForImageClassification"]
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    assert isinstance(model, OnePeaceForImageClassification)
    with torch.no_grad():
        logits = model(pixel_values=expected["inputs.src_images"]).logits
        reference = classify_model(pixel_values=expected["inputs.src_images"]).logits
    torch.testing.assert_close(logits, classify_expected["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head_type", ["text", "val"])
def test_unsupported_head_types_are_refused_clearly(classify_checkpoint, head_type):
    checkpoint = {"cfg": copy.deepcopy(classify_checkpoint["cfg"]), "model": classify_checkpoint["model"]}
    checkpoint["cfg"]["task"]["head_type"] = head_type
    with pytest.raises(CheckpointConversionError, match=f"head_type '{head_type}' are not supported yet"):
        config_from_checkpoint(checkpoint)


def test_two_images_without_text_are_refused_clearly(classify_checkpoint):
    checkpoint = {"cfg": copy.deepcopy(classify_checkpoint["cfg"]), "model": classify_checkpoint["model"]}
    checkpoint["cfg"]["task"]["use_two_images"] = True
    with pytest.raises(CheckpointConversionError, match="use_two_images needs head_type 'vl'"):
        config_from_checkpoint(checkpoint)


# ----------------------------------------------------------------------------------------------------------------------
# Losses (expected values computed by hand from the returned logits)
# ----------------------------------------------------------------------------------------------------------------------


def small_config(**kwargs):
    defaults = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, modalities=["image"],
        image_size=32, image_pos_grid_size=2, image_rel_bucket_size=2, num_labels=3, audio_conv_pos_groups=2,
    )
    defaults.update(kwargs)
    return OnePeaceConfig(**defaults)


def small_image_model(**kwargs):
    torch.manual_seed(0)
    model = OnePeaceForImageClassification(small_config(**kwargs)).eval()
    nn.init.normal_(model.classification_head.classifier[3].weight, std=1.0)  # logits well away from zero
    return model


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_single_label_loss_is_cross_entropy():
    model = small_image_model()
    labels = torch.tensor([2, 0])
    out = model(pixel_values=PIXELS, labels=labels)
    assert model.config.problem_type == "single_label_classification"
    logits = out.logits.detach()
    expected = sum(
        -(logits[i, labels[i]] - math.log(sum(math.exp(v) for v in logits[i].tolist()))) for i in range(2)
    ) / 2
    assert abs(out.loss.item() - float(expected)) < 1e-5
    out.loss.backward()
    assert model.classification_head.classifier[3].weight.grad is not None


def test_multi_label_loss_is_binary_cross_entropy_with_logits():
    model = small_image_model()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = model(pixel_values=PIXELS, labels=labels)
    assert model.config.problem_type == "multi_label_classification"
    total = 0.0
    for x, y in zip(out.logits.detach().flatten().tolist(), labels.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    assert abs(out.loss.item() - total / 6) < 1e-5


def test_regression_loss_is_mean_squared_error():
    model = small_image_model(num_labels=1)
    targets = torch.tensor([0.5, -1.5])
    out = model(pixel_values=PIXELS, labels=targets)
    assert model.config.problem_type == "regression" and out.logits.shape == (2, 1)
    predictions = out.logits.detach().flatten().tolist()
    expected = ((predictions[0] - 0.5) ** 2 + (predictions[1] + 1.5) ** 2) / 2
    assert abs(out.loss.item() - expected) < 1e-5


def test_explicit_problem_type_wins_over_label_dtype():
    model = small_image_model(problem_type="multi_label_classification")
    labels = torch.tensor([[1, 0, 0], [0, 1, 1]])
    out = model(pixel_values=PIXELS, labels=labels)
    logits = out.logits.detach()
    p = torch.sigmoid(logits)
    expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert abs(out.loss.item() - expected.item()) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# The head's parts against hand-written computations
# ----------------------------------------------------------------------------------------------------------------------


def test_attention_pooling_matches_a_hand_computation():
    torch.manual_seed(0)
    config = small_config(hidden_size=4, num_attention_heads=2, intermediate_size=8)
    pooling = OnePeaceAttentionPooling(config)
    for parameter in pooling.parameters():
        nn.init.normal_(parameter)
    x = torch.randn(2, 3, 4)
    padding = torch.tensor([[False, False, False], [False, True, False]])
    out = pooling(x, padding)

    q = pooling.query.detach().reshape(2, 2)  # (heads, head_dim)
    k = x @ pooling.k_proj.weight.detach().t()
    v = x @ pooling.v_proj.weight.detach().t() + pooling.v_proj.bias.detach()
    for b in range(2):
        pooled = []
        for h in range(2):
            cols = slice(2 * h, 2 * h + 2)
            # Unscaled dot products; padded keys are left out of the softmax.
            scores = [(q[h] * k[b, t, cols]).sum().item() if not padding[b, t] else None for t in range(3)]
            weights = [math.exp(s) if s is not None else 0.0 for s in scores]
            weights = [w / sum(weights) for w in weights]
            pooled.append(sum(w * v[b, t, cols] for t, w in enumerate(weights)))
        expected = torch.cat(pooled) @ pooling.out_proj.weight.detach().t() + pooling.out_proj.bias.detach()
        torch.testing.assert_close(out[b].detach(), expected, atol=1e-5, rtol=0)


def test_attention_head_skips_cls_and_padding_and_applies_pooler():
    torch.manual_seed(0)
    config = small_config(hidden_size=4, num_attention_heads=2, intermediate_size=8, classifier_pooling="attention",
                          classifier_use_pooler=True, classifier_head_scale_ratio=1.5, num_labels=2)
    head = OnePeaceClassificationHead(config).eval()
    for parameter in head.parameters():
        nn.init.normal_(parameter)
    hidden = torch.randn(1, 4, 4)
    padding = torch.tensor([[False, False, False, True]])
    logits = head(hidden, padding)
    changed = hidden.clone()
    changed[:, 0] += 10.0  # the CLS slot
    changed[:, 3] -= 10.0  # a padded position
    torch.testing.assert_close(head(changed, padding), logits)

    def layer_norm(x, module):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * module.weight + module.bias

    with torch.no_grad():
        pooled = layer_norm(head.attention_pooling(hidden[:, 1:], padding[:, 1:]), head.norm)
        pooled = torch.tanh(pooled @ head.pooler[1].weight.t() + head.pooler[1].bias)
        first, norm, last = head.classifier[0], head.classifier[1], head.classifier[3]
        inner = layer_norm(pooled @ first.weight.t() + first.bias, norm)
        assert inner.shape[-1] == 6
        inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))
        expected = inner @ last.weight.t() + last.bias
    torch.testing.assert_close(logits.detach(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "field, value", [("classifier_pooling", "mean"), ("classifier_dropout", 1.0), ("classifier_head_scale_ratio", 0)]
)
def test_invalid_head_options_are_refused(field, value):
    with pytest.raises(Exception, match=field):
        small_config(**{field: value})


# ----------------------------------------------------------------------------------------------------------------------
# Audio: a classify checkpoint built from the pretrain weights the way the original upgrades them
# ----------------------------------------------------------------------------------------------------------------------


def audio_classify_checkpoint(pretrain):
    checkpoint = {"cfg": copy.deepcopy(pretrain["cfg"])}
    model_cfg, task = checkpoint["cfg"]["model"], checkpoint["cfg"]["task"]
    model_cfg.update(_name="one_peace_classify", attn_pooling=True, use_pooler=True, pooler_dropout=0.1,
                     head_scale_ratio=2)
    task.update(head_type="audio", num_classes=3, use_two_images=False)
    state = {
        key: value for key, value in pretrain["model"].items()
        if key.startswith("encoder_wrapper.") and "text_" not in key and "image_" not in key
    }
    table = state.pop("encoder_wrapper.audio_adapter.rel_pos_table_list.0.weight")
    layers = pretrain["cfg"]["model"]["encoder"]["layers"]
    for i in range(layers):
        state[f"encoder_wrapper.audio_adapter.rel_pos_table_list.{i}.weight"] = table.clone()
    generator = torch.Generator().manual_seed(0)
    dim = pretrain["cfg"]["model"]["encoder"]["embed_dim"]
    heads = pretrain["cfg"]["model"]["encoder"]["attention_heads"]
    shapes = {
        "attn_pooling_func.q": (1, 1, heads, dim // heads),
        "attn_pooling_func.k_proj.weight": (dim, dim),
        **{f"attn_pooling_func.{n}.{p}": (dim, dim) if p == "weight" else (dim,)
           for n in ("v_proj", "out_proj") for p in ("weight", "bias")},
        "norm.weight": (dim,), "norm.bias": (dim,),
        "pooler.1.weight": (dim, dim), "pooler.1.bias": (dim,),
        "classifier.0.weight": (2 * dim, dim), "classifier.0.bias": (2 * dim,),
        "classifier.1.weight": (2 * dim,), "classifier.1.bias": (2 * dim,),
        "classifier.3.weight": (3, 2 * dim), "classifier.3.bias": (3,),
    }
    for name, shape in shapes.items():
        state[f"classify_head.{name}"] = torch.randn(shape, generator=generator) * 0.3
    checkpoint["model"] = state
    return checkpoint


def test_audio_classification_from_a_classify_checkpoint(original_checkpoint, expected, sample_padding_mask):
    checkpoint = audio_classify_checkpoint(original_checkpoint)
    model = converted_model(OnePeaceForAudioClassification, checkpoint)
    config = model.config
    assert config.modalities == ["audio"] and config.classifier_pooling == "attention"
    assert config.classifier_use_pooler and config.classifier_dropout == 0.1 and config.num_labels == 3
    with torch.no_grad():
        out = model(input_values=expected["inputs.src_audios"], padding_mask=sample_padding_mask)
        head = model.classification_head
        frames = model.adapters["audio"].frame_padding_mask(sample_padding_mask, out.last_hidden_state.shape[1] - 1)
        by_hand = head.classifier(head.pool(out.last_hidden_state, frames))
    # Same encoder weights and the shared table copied per layer: the pretrain model's audio output.
    torch.testing.assert_close(out.last_hidden_state, expected["audio.hidden"], atol=1e-5, rtol=0)
    assert out.logits.shape == (2, 3) and frames[1].any()
    torch.testing.assert_close(out.logits, by_hand)
    out = model(input_values=expected["inputs.src_audios"], padding_mask=sample_padding_mask, labels=torch.tensor([0, 2]))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
