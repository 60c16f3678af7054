"""Joint text+image / text+audio task models: VQA / NLVR2 / AQA classification and visual grounding.

There is no reference checkpoint of these kinds: conversion is checked on original-format checkpoints assembled from
the reference pretraining checkpoint's own keys (the way the original fine-tuning upgrades them), whose fused hidden
states must then equal the original's `vl` / `al` reference outputs. Losses are checked against hand computations.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.initialization import no_init_weights

from onepeace_hf import OnePeaceConfig
from onepeace_hf.conversion import (
    CheckpointConversionError,
    config_from_checkpoint,
    convert_checkpoint,
    convert_state_dict,
    target_model_classes,
)
from onepeace_hf.modeling_onepeace_tasks import (
    OnePeaceForAudioLanguageClassification,
    OnePeaceForAudioLanguageMultipleChoice,
    OnePeaceForImageClassification,
    OnePeaceForVisionLanguageClassification,
    OnePeaceForVisualGrounding,
    multiple_choice_hinge_loss,
    paired_generalized_box_iou,
    visual_grounding_loss,
)


ATOL = 1e-5
PAD = 1


def tiny_config(modalities=("text", "image"), **kwargs):
    defaults = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, modalities=list(modalities),
        vocab_size=64, text_rel_bucket_size=8, image_size=32, image_pos_grid_size=2, image_rel_bucket_size=2,
        audio_conv_spec=[[8, 10, 5], [8, 8, 4]], audio_conv_pos_groups=2, audio_conv_pos_depth=2,
        audio_conv_pos_width=6, audio_rel_bucket_size=8, audio_min_samples=400, audio_max_samples=2500,
        num_labels=3, classifier_pooling="attention", classifier_head_scale_ratio=2, rel_pos_table_per_layer=True,
        max_relative_positions=128,  # smaller bucket tables: quicker to build, still longer than any test input
    )
    defaults.update(kwargs)
    return OnePeaceConfig(**defaults)


def randomized(model):
    """Random weights everywhere (relative tables, type embeddings and LayerNorms included), so nothing is trivial."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def tokens(batch=2, length=5, seed=1):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def pixels(batch=2, side=32, seed=2):
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def audio(batch=2, samples=2000, seed=3):
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Shapes, standard outputs, which part of the fused sequence the head reads
# ----------------------------------------------------------------------------------------------------------------------


def test_vision_language_outputs():
    # Attention probabilities come from the eager implementation (sdpa does not return them).
    model = randomized(OnePeaceForVisionLanguageClassification._from_config(tiny_config(), attn_implementation="eager"))
    out = model(input_ids=tokens(), pixel_values=pixels(), output_hidden_states=True, output_attentions=True)
    # 5 tokens + CLS, then 2x2 patches + CLS.
    assert out.logits.shape == (2, 3) and out.loss is None
    assert out.last_hidden_state.shape == (2, 6 + 5, 16)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 11, 16)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 11, 11)
    assert out.last_hidden_state_2 is None
    as_tuple = model(input_ids=tokens(), pixel_values=pixels(), return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits)


def test_audio_language_outputs():
    model = randomized(OnePeaceForAudioLanguageClassification(tiny_config(("text", "audio"))))
    mask = torch.ones(2, 2000, dtype=torch.long)
    mask[1, 1200:] = 0
    out = model(input_ids=tokens(), input_values=audio(), padding_mask=mask, output_hidden_states=True)
    frames = model.config.audio_frame_count(2000)
    assert out.logits.shape == (2, 3)
    assert out.last_hidden_state.shape == (2, 6 + frames + 1, 16) and len(out.hidden_states) == 3


@pytest.mark.parametrize("pool_text, position", [(None, 0), (True, 0), (False, 6)])
def test_cls_head_reads_the_configured_part_of_the_fused_sequence(pool_text, position):
    # Text part first (CLS at 0), image part after the 5 tokens + CLS (its CLS at 6).
    model = randomized(OnePeaceForVisionLanguageClassification(
        tiny_config(classifier_pooling="cls", classifier_pool_text=pool_text)
    ))
    with torch.no_grad():
        out = model(input_ids=tokens(), pixel_values=pixels())
        expected = model.classification_head.classifier(out.last_hidden_state[:, position])
    torch.testing.assert_close(out.logits, expected)


def test_grounding_reads_the_image_part_by_default_and_returns_sigmoid_boxes():
    model = randomized(OnePeaceForVisualGrounding(tiny_config(classifier_pooling="cls", num_labels=7)))
    with torch.no_grad():
        out = model(input_ids=tokens(), pixel_values=pixels())
        expected = model.classification_head.classifier(out.last_hidden_state[:, 6])
    assert out.logits.shape == (2, 4)  # four coordinates whatever num_labels says
    torch.testing.assert_close(out.logits, expected)
    for row_logits, row_boxes in zip(out.logits.tolist(), out.pred_boxes.tolist()):
        for logit, box in zip(row_logits, row_boxes):
            assert abs(box - 32 / (1 + math.exp(-logit))) < 1e-4
    assert out.loss is None
    # One box without its batch dimension is named as a shape mistake, not a batch-size mismatch.
    with pytest.raises(ValueError, match=r"labels must be \(batch, 4\) boxes .* got \(4,\)"):
        model(input_ids=tokens(), pixel_values=pixels(), labels=torch.tensor([0.0, 0.0, 8.0, 8.0]))


def test_audio_language_head_can_read_the_audio_part():
    model = randomized(OnePeaceForAudioLanguageClassification(
        tiny_config(("text", "audio"), classifier_pooling="cls", classifier_pool_text=False)
    ))
    with torch.no_grad():
        out = model(input_ids=tokens(), input_values=audio())
        expected = model.classification_head.classifier(out.last_hidden_state[:, 6])
    torch.testing.assert_close(out.logits, expected)


# ----------------------------------------------------------------------------------------------------------------------
# Padding invariance
# ----------------------------------------------------------------------------------------------------------------------


def padded(input_ids, extra=3):
    ids = torch.cat([input_ids, torch.full((input_ids.shape[0], extra), PAD)], dim=1)
    mask = torch.cat([torch.ones_like(input_ids), torch.zeros(input_ids.shape[0], extra, dtype=torch.long)], dim=1)
    return ids, mask


@pytest.mark.parametrize("pooling", ["cls", "attention"])
def test_text_padding_does_not_change_vision_language_logits(pooling):
    model = randomized(OnePeaceForVisionLanguageClassification(tiny_config(classifier_pooling=pooling)))
    ids, mask = padded(tokens())
    with torch.no_grad():
        plain = model(input_ids=tokens(), pixel_values=pixels())
        with_padding = model(input_ids=ids, attention_mask=mask, pixel_values=pixels())
    torch.testing.assert_close(with_padding.logits, plain.logits, atol=ATOL, rtol=0)
    # The image part of the fused sequence is unchanged as well.
    torch.testing.assert_close(with_padding.last_hidden_state[:, 9:], plain.last_hidden_state[:, 6:], atol=ATOL, rtol=0)


def test_text_padding_does_not_change_grounding_or_audio_language_outputs():
    grounding = randomized(OnePeaceForVisualGrounding(tiny_config()))
    audio_language = randomized(OnePeaceForAudioLanguageClassification(tiny_config(("text", "audio"))))
    ids, mask = padded(tokens())
    with torch.no_grad():
        boxes = grounding(input_ids=tokens(), pixel_values=pixels()).pred_boxes
        boxes_padded = grounding(input_ids=ids, attention_mask=mask, pixel_values=pixels()).pred_boxes
        logits = audio_language(input_ids=tokens(), input_values=audio()).logits
        logits_padded = audio_language(input_ids=ids, attention_mask=mask, input_values=audio()).logits
    torch.testing.assert_close(boxes_padded, boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_padded, logits, atol=ATOL, rtol=0)


def test_a_sample_does_not_depend_on_its_batch_companions():
    model = randomized(OnePeaceForVisionLanguageClassification(tiny_config()))
    short = tokens(1, 3)
    long_ids = tokens(1, 6, seed=5)
    short_padded = torch.cat([short, torch.full((1, 3), PAD)], dim=1)
    ids = torch.cat([short_padded, long_ids])
    mask = torch.cat([torch.tensor([[1, 1, 1, 0, 0, 0]]), torch.ones(1, 6, dtype=torch.long)])
    images = pixels()
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=images).logits
        alone = model(input_ids=short, pixel_values=images[:1]).logits
    torch.testing.assert_close(batched[:1], alone, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Two images (NLVR2) and type embeddings
# ----------------------------------------------------------------------------------------------------------------------


def test_two_images_with_type_embeddings_as_shifted_positions():
    """A type embedding added to every position is a shift of the absolute positions (CLS slot included), so the
    two-image model must equal a plain single-image model whose positions are shifted by hand: text by t_text,
    the first image by t_image, the second by t_image + t_image_2; the pooled vectors concatenated."""
    config = tiny_config(classifier_two_images=True, classifier_type_embeddings=True, classifier_use_pooler=True)
    pair_model = randomized(OnePeaceForVisionLanguageClassification(config))
    single = OnePeaceForVisionLanguageClassification(tiny_config(classifier_use_pooler=True)).eval()
    # The same encoder; the pair model's head is used below (its first Linear takes both pooled vectors).
    skipped = ("type_embeddings", "classification_head.classifier.0")
    encoder_state = {k: v for k, v in pair_model.state_dict().items() if not k.startswith(skipped)}
    single.load_state_dict(encoder_state, strict=False)
    types = pair_model.type_embeddings
    t_text, t_image, t_image_2 = (getattr(types, name).detach()[0] for name in ("text", "image", "image_2"))

    ids, mask = padded(tokens(), extra=2)
    first, second = pixels(), pixels(seed=7)
    with torch.no_grad():
        out = pair_model(input_ids=ids, attention_mask=mask, pixel_values=first, pixel_values_2=second)
        single.adapters["text"].embed_positions.weight += t_text
        single.adapters["image"].pos_embed += t_image
        hidden_1 = single(input_ids=ids, attention_mask=mask, pixel_values=first).last_hidden_state
        single.adapters["image"].pos_embed += t_image_2
        hidden_2 = single(input_ids=ids, attention_mask=mask, pixel_values=second).last_hidden_state
        head = pair_model.classification_head
        text_padding = torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask.eq(0)], dim=1)
        pooled = torch.cat([head.pool(hidden_1[:, :8], text_padding), head.pool(hidden_2[:, :8], text_padding)], -1)
        expected = head.classifier(pooled)
    assert head.classifier[0].in_features == 32
    torch.testing.assert_close(out.last_hidden_state, hidden_1, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.last_hidden_state_2, hidden_2, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)


def test_two_image_input_is_checked():
    pair_model = OnePeaceForVisionLanguageClassification(tiny_config(classifier_two_images=True)).eval()
    with pytest.raises(ValueError, match="give pixel_values_2"):
        pair_model(input_ids=tokens(), pixel_values=pixels())
    single = OnePeaceForVisionLanguageClassification(tiny_config()).eval()
    with pytest.raises(ValueError, match="pixel_values_2 is only taken"):
        single(input_ids=tokens(), pixel_values=pixels(), pixel_values_2=pixels())
    with pytest.raises(ValueError, match="same batch size"):
        single(input_ids=tokens(3), pixel_values=pixels())
    with pytest.raises(ValueError, match="does not take two images"):
        OnePeaceForVisualGrounding(tiny_config(classifier_two_images=True))
    with pytest.raises(ValueError, match="does not take two images"):
        OnePeaceForAudioLanguageClassification(tiny_config(("text", "audio"), classifier_two_images=True))
    with pytest.raises(ValueError, match="needs the audio branch"):
        OnePeaceForAudioLanguageClassification(tiny_config())
    with pytest.raises(Exception, match="classifier_pool_text"):
        tiny_config(classifier_pool_text="image")


# ----------------------------------------------------------------------------------------------------------------------
# Losses (hand computations)
# ----------------------------------------------------------------------------------------------------------------------


def test_task_models_check_their_inputs_as_the_base_model_does():
    vl = OnePeaceForVisionLanguageClassification(tiny_config())
    al = OnePeaceForAudioLanguageClassification(tiny_config(("text", "audio")))
    choice = OnePeaceForAudioLanguageMultipleChoice(tiny_config(("text", "audio"), num_labels=1))
    image = OnePeaceForImageClassification(tiny_config(("image",)))
    mask = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids and attention_mask must have the same shape"):
        vl(input_ids=tokens(), attention_mask=mask[:, :4], pixel_values=pixels())
    with pytest.raises(ValueError, match=r"input_ids and attention_mask must have the same shape"):
        vl(input_ids=tokens(), attention_mask=mask[:1], pixel_values=pixels())
    with pytest.raises(ValueError, match=r"input_values and padding_mask must have the same shape"):
        al(input_ids=tokens(), input_values=audio(), padding_mask=torch.ones(2, 1999, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        image(pixel_values=pixels(0))
    # A text row with every token padded has nothing for attention pooling (its logits were NaN).
    mask[1] = 0
    with pytest.raises(ValueError, match=r"Rows \[1\] of the batch have no token to pool"):
        vl(input_ids=tokens(), attention_mask=mask, pixel_values=pixels())
    candidates = tokens(6, 4).view(2, 3, 4)
    with pytest.raises(ValueError, match=r"labels must be \(batch,\) = \(2,\)"):
        choice(input_ids=candidates, input_values=audio(), labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must index one of the 3 candidates"):
        choice(input_ids=candidates, input_values=audio(), labels=torch.tensor([0, 3]))


@pytest.mark.parametrize("model_class", [
    OnePeaceForImageClassification, OnePeaceForVisionLanguageClassification, OnePeaceForVisualGrounding,
    OnePeaceForAudioLanguageClassification, OnePeaceForAudioLanguageMultipleChoice,
])
def test_task_models_switch_attention_implementation(model_class):
    """transformers' source heuristic took the attention pooling's file for one without the attention interface."""
    model = model_class(tiny_config(("text", "image", "audio")))
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def sharp(model):
    nn.init.normal_(model.classification_head.classifier[3].weight, std=1.0)  # logits well away from zero
    return model


def test_vision_language_losses_follow_problem_type():
    model = sharp(randomized(OnePeaceForVisionLanguageClassification(tiny_config())))
    labels = torch.tensor([1, 2])
    out = model(input_ids=tokens(), pixel_values=pixels(), labels=labels)
    logits = out.logits.detach().tolist()
    expected = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, [1, 2])) / 2
    assert model.config.problem_type == "single_label_classification"
    assert abs(out.loss.item() - expected) < 1e-5
    model.config.problem_type = None  # int32 labels (NumPy / datasets) are class indices too
    as_int32 = model(input_ids=tokens(), pixel_values=pixels(), labels=labels.int())
    assert model.config.problem_type == "single_label_classification" and as_int32.loss.item() == out.loss.item()

    model.config.problem_type = None
    scores = torch.tensor([[0.0, 0.3, 1.0], [0.6, 0.0, 0.0]])  # VQA-style soft answer scores
    out = model(input_ids=tokens(), pixel_values=pixels(), labels=scores)
    total = 0.0
    for x, y in zip(out.logits.detach().flatten().tolist(), scores.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    assert model.config.problem_type == "multi_label_classification"
    assert abs(out.loss.item() - total / 6) < 1e-5
    out.loss.backward()
    assert model.adapters["text"].embed_tokens.weight.grad is not None


def test_hinge_loss_by_hand():
    scores = torch.tensor([[1.0, 0.5, 2.0, -1.0], [0.2, 0.1, 0.3, 0.0]])
    labels = torch.tensor([2, 0])
    # Row 0: max(0, 1 + s - 2) = 0, 0, 1, 0 -> 1. Row 1: 1 + s - 0.2 = 1, 0.9, 1.1, 0.8 -> 3.8. Mean 2.4.
    assert abs(multiple_choice_hinge_loss(scores, labels).item() - 2.4) < 1e-6


def test_multiple_choice_ranks_each_candidate_with_its_audio():
    config = tiny_config(("text", "audio"), num_labels=1)
    model = sharp(randomized(OnePeaceForAudioLanguageMultipleChoice(config)))
    pairs = OnePeaceForAudioLanguageClassification(config).eval()
    pairs.load_state_dict(model.state_dict())
    candidates = tokens(6, 4).view(2, 3, 4)
    waves = audio()
    mask = torch.ones(2, 2000, dtype=torch.long)
    mask[0, 1500:] = 0
    out = model(input_ids=candidates, input_values=waves, padding_mask=mask, labels=torch.tensor([2, 0]))
    with torch.no_grad():
        # Candidate j of question i is scored with audio i.
        flat = pairs(input_ids=candidates.view(6, 4), input_values=waves.repeat_interleave(3, 0),
                     padding_mask=mask.repeat_interleave(3, 0)).logits
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits.detach(), flat.view(2, 3), atol=ATOL, rtol=0)
    s = out.logits.detach().tolist()
    expected = (sum(max(0.0, 1 + v - s[0][2]) for v in s[0]) + sum(max(0.0, 1 + v - s[1][0]) for v in s[1])) / 2
    assert abs(out.loss.item() - expected) < 1e-5
    with pytest.raises(ValueError, match="num_choices"):
        model(input_ids=candidates[0], input_values=waves)


def giou_by_hand(box, target):
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    iw = max(0.0, min(box[2], target[2]) - max(box[0], target[0]))
    ih = max(0.0, min(box[3], target[3]) - max(box[1], target[1]))
    union = area(box) + area(target) - iw * ih
    hull = (max(box[2], target[2]) - min(box[0], target[0])) * (max(box[3], target[3]) - min(box[1], target[1]))
    return iw * ih / union - (hull - union) / hull


def test_generalized_iou_of_hand_made_boxes():
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.2, 0.3, 0.6, 0.9]])
    targets = torch.tensor([[0.3, 0.3, 0.7, 0.7], [0.5, 0.5, 1.0, 1.0], [0.2, 0.3, 0.6, 0.9]])
    # Overlap 0.04, union 0.28, hull 0.36: 1/7 - 0.08/0.36. Disjoint: 0 - (1 - 0.29) / 1. Identical: 1.
    expected = torch.tensor([1 / 7 - 0.08 / 0.36, -0.71, 1.0])
    torch.testing.assert_close(paired_generalized_box_iou(boxes, targets), expected, atol=1e-6, rtol=0)


def test_grounding_loss_of_hand_made_boxes():
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.6, 0.2, 0.4, 0.9]])  # the second is no box: x0 > x1
    targets = torch.tensor([[0.3, 0.3, 0.7, 0.7], [0.5, 0.1, 0.7, 0.8]])
    total, l1, giou = visual_grounding_loss(boxes, targets)
    # L1 summed over coordinates, averaged over the batch: (0.8 + 0.6) / 2. GIoU only over the proper box.
    assert abs(l1.item() - 0.7) < 1e-6
    assert abs(giou.item() - (1 - (1 / 7 - 0.08 / 0.36))) < 1e-6
    assert abs(total.item() - (0.7 + 1 - (1 / 7 - 0.08 / 0.36))) < 1e-6
    # No proper box at all: the GIoU term is 0 (the original's mean over nothing would be NaN).
    total, l1, giou = visual_grounding_loss(boxes[1:], targets[1:])
    assert giou.item() == 0.0 and abs(total.item() - 0.6) < 1e-6


def test_grounding_model_loss_by_hand():
    model = sharp(randomized(OnePeaceForVisualGrounding(tiny_config())))
    labels = torch.tensor([[4.0, 8.0, 20.0, 30.0], [0.0, 0.0, 32.0, 16.0]])  # pixels of the 32 x 32 input
    out = model(input_ids=tokens(), pixel_values=pixels(), labels=labels)
    boxes = [[1 / (1 + math.exp(-v)) for v in row] for row in out.logits.detach().tolist()]
    targets = [[v / 32 for v in row] for row in labels.tolist()]
    l1 = sum(abs(b - t) for box, target in zip(boxes, targets) for b, t in zip(box, target)) / 2
    proper = [(b, t) for b, t in zip(boxes, targets) if b[0] < b[2] and b[1] < b[3]]
    giou = sum(1 - giou_by_hand(b, t) for b, t in proper) / len(proper) if proper else 0.0
    assert abs(out.loss_l1.item() - l1) < 1e-5 and abs(out.loss_giou.item() - giou) < 1e-5
    assert abs(out.loss.item() - (l1 + giou)) < 1e-5
    out.loss.backward()
    assert model.classification_head.classifier[3].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x0 <= x1"):
        model(input_ids=tokens(), pixel_values=pixels(), labels=labels[:, [2, 1, 0, 3]])
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        model(input_ids=tokens(), pixel_values=pixels(), labels=labels[:, :3])


# ----------------------------------------------------------------------------------------------------------------------
# Save / load and Auto classes
# ----------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_auto_class(tmp_path):
    from transformers import AutoConfig, AutoModelForVisualQuestionAnswering

    config = tiny_config(classifier_two_images=True, classifier_type_embeddings=True, classifier_pool_text=True)
    model = randomized(OnePeaceForVisionLanguageClassification(config))
    model.save_pretrained(tmp_path / "vl")
    loaded = AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path / "vl").eval()
    assert isinstance(loaded, OnePeaceForVisionLanguageClassification)
    reloaded_config = AutoConfig.from_pretrained(tmp_path / "vl")
    assert reloaded_config.classifier_two_images and reloaded_config.classifier_type_embeddings
    assert reloaded_config.classifier_pool_text is True
    inputs = dict(input_ids=tokens(), pixel_values=pixels(), pixel_values_2=pixels(seed=9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert isinstance(AutoModelForVisualQuestionAnswering.from_config(tiny_config()),
                      OnePeaceForVisionLanguageClassification)

    grounding = randomized(OnePeaceForVisualGrounding(tiny_config()))
    grounding.save_pretrained(tmp_path / "grounding")
    loaded = OnePeaceForVisualGrounding.from_pretrained(tmp_path / "grounding").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=tokens(), pixel_values=pixels()).pred_boxes,
            grounding(input_ids=tokens(), pixel_values=pixels()).pred_boxes, atol=0, rtol=0,
        )


def test_image_classification_weight_names_unchanged():
    # Existing image checkpoints must keep loading: no new parameters unless the new options are set.
    keys = set(OnePeaceForImageClassification(tiny_config(("image",))).state_dict())
    assert not any(k.startswith("type_embeddings") for k in keys)
    assert "classification_head.classifier.0.weight" in keys and "adapters.image.pos_embed" in keys


# ----------------------------------------------------------------------------------------------------------------------
# Conversion of original-format checkpoints
# ----------------------------------------------------------------------------------------------------------------------


BRANCHES = {"vl": ("text", "image"), "al": ("text", "audio")}


def classify_checkpoint(pretrain, head_type, task_name, num_classes, patch_image_size=256, two_images=False,
                        type_embeddings=False, use_image_features=False, multi_label=False):
    """An original one_peace_classify checkpoint made from the pretrain one as the original fine-tuning does:
    other branches removed, the shared relative tables copied per layer (a new image size gets new tables), and a
    random head."""
    checkpoint = {"cfg": copy.deepcopy(pretrain["cfg"])}
    model_cfg, task = checkpoint["cfg"]["model"], checkpoint["cfg"]["task"]
    model_cfg.update(_name="one_peace_classify", attn_pooling=True, use_pooler=head_type == "vl", pooler_dropout=0.0,
                     head_scale_ratio=2, use_image_features=use_image_features)
    task.update(_name=task_name, head_type=head_type, num_classes=num_classes, use_two_images=two_images,
                patch_image_size=patch_image_size)
    checkpoint["cfg"]["criterion"] = {"_name": "classify_criterion", "use_multi_label": multi_label}
    encoder = model_cfg["encoder"]
    branches = BRANCHES[head_type]
    for branch in branches:
        encoder[f"{branch}_adapter"]["add_type_embedding"] = type_embeddings
    others = [m for m in ("text", "image", "audio") if m not in branches]
    state = {
        key: value for key, value in pretrain["model"].items()
        if key.startswith("encoder_wrapper.") and not any(f"{m}_" in key for m in others)
    }
    dim, heads, layers = encoder["embed_dim"], encoder["attention_heads"], encoder["layers"]
    generator = torch.Generator().manual_seed(0)
    random = lambda *shape: torch.randn(shape, generator=generator) * 0.3  # noqa: E731
    for branch in branches:
        table = state.pop(f"encoder_wrapper.{branch}_adapter.rel_pos_table_list.0.weight")
        if branch == "image" and patch_image_size != 256:
            state.pop("encoder_wrapper.image_adapter.rp_bucket")
            table = random((2 * (patch_image_size // 16) - 1) ** 2 + 3, heads)
        for i in range(layers):
            state[f"encoder_wrapper.{branch}_adapter.rel_pos_table_list.{i}.weight"] = table.clone()
        if type_embeddings:
            state[f"encoder_wrapper.{branch}_adapter.type_embedding"] = random(1, 1, dim)
    if type_embeddings and "image" in branches:
        state["encoder_wrapper.image_adapter.type_embedding_2"] = random(1, 1, dim)
    inputs = 2 * dim if two_images else dim
    head = {
        "attn_pooling_func.q": (1, 1, heads, dim // heads), "attn_pooling_func.k_proj.weight": (dim, dim),
        "attn_pooling_func.v_proj.weight": (dim, dim), "attn_pooling_func.v_proj.bias": (dim,),
        "attn_pooling_func.out_proj.weight": (dim, dim), "attn_pooling_func.out_proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,),
        "classifier.0.weight": (2 * dim, inputs), "classifier.0.bias": (2 * dim,),
        "classifier.1.weight": (2 * dim,), "classifier.1.bias": (2 * dim,),
        "classifier.3.weight": (num_classes, 2 * dim), "classifier.3.bias": (num_classes,),
    }
    if head_type == "vl":
        head.update({"pooler.1.weight": (dim, dim), "pooler.1.bias": (dim,)})
    for name, shape in head.items():
        state[f"classify_head.{name}"] = random(*shape)
    checkpoint["model"] = state
    return checkpoint


def convert(checkpoint):
    """Config, converted model (loaded strictly) and its class, as convert_checkpoint builds them."""
    config = config_from_checkpoint(checkpoint)
    model_class, _ = target_model_classes(checkpoint, config)
    with torch.device("meta"):
        keys = set(model_class(config).state_dict())
    with no_init_weights():  # every weight is loaded next
        model = model_class(config)
    model.load_state_dict(convert_state_dict(checkpoint["model"], config, keys), strict=True)
    return config, model.eval()


def assert_landed(model, checkpoint, pairs):
    state = model.state_dict()
    for original, ours in pairs:
        assert torch.equal(state[ours], checkpoint["model"][original]), ours


HEAD_PAIRS = [
    ("classify_head.attn_pooling_func.q", "classification_head.attention_pooling.query"),
    ("classify_head.classifier.0.weight", "classification_head.classifier.0.weight"),
    ("classify_head.classifier.3.bias", "classification_head.classifier.3.bias"),
    ("classify_head.norm.weight", "classification_head.norm.weight"),
]


def test_vqa_checkpoint_converts_and_matches_the_original_fused_pass(original_checkpoint, expected):
    checkpoint = classify_checkpoint(original_checkpoint, "vl", "vqa", 5, multi_label=True)
    config, model = convert(checkpoint)
    assert isinstance(model, OnePeaceForVisionLanguageClassification)
    assert config.problem_type == "multi_label_classification"  # the original's VQA criterion: use_multi_label
    assert config.modalities == ["text", "image"] and config.rel_pos_table_per_layer and config.num_labels == 5
    assert config.classifier_pool_text is True and config.classifier_use_pooler and not config.classifier_two_images
    assert_landed(model, checkpoint, HEAD_PAIRS + [
        ("classify_head.pooler.1.weight", "classification_head.pooler.1.weight"),
        ("encoder_wrapper.image_adapter.rel_pos_table_list.1.weight", "adapters.image.rel_pos.tables.1.weight"),
        ("encoder_wrapper.text_adapter.rel_pos_table_list.0.weight", "adapters.text.rel_pos.tables.0.weight"),
        ("encoder_wrapper.fusion_model.image_layer_norm.weight", "encoder.final_layer_norms.image.weight"),
    ])
    with torch.no_grad():
        out = model(input_ids=expected["vl.src_tokens"], pixel_values=expected["inputs.src_images"])
        head = model.classification_head
        by_reference = head(expected["vl.text_hidden"], torch.zeros(2, 3, dtype=torch.bool))
    # The shared tables copied per layer: the fused pass equals the original's `vl` encoder output.
    torch.testing.assert_close(out.last_hidden_state[:, :3], expected["vl.text_hidden"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.last_hidden_state[:, 3:], expected["vl.image_hidden"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, by_reference, atol=1e-4, rtol=0)


def test_nlvr2_checkpoint_converts_with_two_images_and_type_embeddings(original_checkpoint, expected):
    checkpoint = classify_checkpoint(original_checkpoint, "vl", "nlvr2", 2, two_images=True, type_embeddings=True)
    config, model = convert(checkpoint)
    assert config.classifier_two_images and config.classifier_type_embeddings and config.num_labels == 2
    assert config.problem_type is None  # single-label: left to the labels' dtype, as transformers does
    assert_landed(model, checkpoint, HEAD_PAIRS + [
        ("encoder_wrapper.text_adapter.type_embedding", "type_embeddings.text"),
        ("encoder_wrapper.image_adapter.type_embedding", "type_embeddings.image"),
        ("encoder_wrapper.image_adapter.type_embedding_2", "type_embeddings.image_2"),
    ])
    images = expected["inputs.src_images"]
    with torch.no_grad():
        out = model(input_ids=expected["vl.src_tokens"], pixel_values=images, pixel_values_2=images.flip(0))
        swapped = model(input_ids=expected["vl.src_tokens"], pixel_values=images.flip(0), pixel_values_2=images)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
    # The second-image type embedding makes the order of the pair matter.
    assert not torch.allclose(out.logits, swapped.logits, atol=1e-3)


def test_refcoco_checkpoint_converts_to_visual_grounding(original_checkpoint):
    checkpoint = classify_checkpoint(original_checkpoint, "vl", "refcoco", 4, patch_image_size=384,
                                     use_image_features=True)
    config, model = convert(checkpoint)
    assert isinstance(model, OnePeaceForVisualGrounding)
    # The original rebuilds the image relative tables for the fine-tuning size: 384 / 16 = 24 per side.
    assert config.image_size == 384 and config.image_rel_bucket_size == 24 and config.image_pos_grid_size == 16
    assert config.classifier_pool_text is False
    assert model.adapters["image"].rel_pos.tables[0].weight.shape == ((2 * 24 - 1) ** 2 + 3, 4)
    assert_landed(model, checkpoint, HEAD_PAIRS + [
        ("encoder_wrapper.image_adapter.rel_pos_table_list.1.weight", "adapters.image.rel_pos.tables.1.weight"),
    ])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[12094, 2]]), pixel_values=pixels(1, 384))
    assert out.pred_boxes.shape == (1, 4) and ((out.pred_boxes >= 0) & (out.pred_boxes <= 384)).all()


def test_audio_language_checkpoints_convert(original_checkpoint, expected, sample_padding_mask):
    checkpoint = classify_checkpoint(original_checkpoint, "al", "audio_text_classify", 3)
    config, model = convert(checkpoint)
    assert isinstance(model, OnePeaceForAudioLanguageClassification) and config.modalities == ["text", "audio"]
    assert_landed(model, checkpoint, HEAD_PAIRS + [
        ("encoder_wrapper.audio_adapter.rel_pos_table_list.1.weight", "adapters.audio.rel_pos.tables.1.weight"),
    ])
    inputs = dict(input_ids=expected["al.src_tokens"], input_values=expected["inputs.src_audios"],
                  padding_mask=sample_padding_mask)
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out.last_hidden_state[:, :3], expected["al.text_hidden"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.last_hidden_state[:, 3:], expected["al.audio_hidden"], atol=ATOL, rtol=0)

    aqa = classify_checkpoint(original_checkpoint, "al", "aqa", 1)
    _, choice_model = convert(aqa)
    assert isinstance(choice_model, OnePeaceForAudioLanguageMultipleChoice)
    assert_landed(choice_model, aqa, [("classify_head.classifier.3.weight", "classification_head.classifier.3.weight")])


def test_conversion_writes_a_folder_the_auto_class_reloads(tmp_path, original_checkpoint, expected):
    from transformers import AutoModelForVisualQuestionAnswering

    checkpoint = classify_checkpoint(original_checkpoint, "vl", "vqa", 5)
    torch.save(checkpoint, tmp_path / "vqa.pt")
    config = convert_checkpoint(tmp_path / "vqa.pt", tmp_path / "vqa").config
    assert config.architectures == ["OnePeaceForVisionLanguageClassification"]
    model = AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path / "vqa").eval()
    with torch.no_grad():
        out = model(input_ids=expected["vl.src_tokens"], pixel_values=expected["inputs.src_images"])
    torch.testing.assert_close(out.last_hidden_state[:, :3], expected["vl.text_hidden"], atol=ATOL, rtol=0)


def test_only_audio_question_answering_folders_keep_the_text_case(tmp_path, original_checkpoint):
    """The original's AQA data encodes questions and answers as given; every other task lowercases them first."""
    from transformers import AutoProcessor

    bpe = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bpe"
    gpt2_ids = json.loads((bpe / "encoder.json").read_text(encoding="utf-8"))
    dictionary = [line.rsplit(" ", 1)[0] for line in (bpe / "dict.txt").read_text(encoding="utf-8").splitlines()]
    fairseq_ids = lambda *tokens: [4 + dictionary.index(str(gpt2_ids[t])) for t in tokens] + [2]  # noqa: E731
    for task_name, head_type, num_classes, expected_ids in [
        ("aqa", "al", 1, fairseq_ids("\u0120What", "\u0120Guitar")),
        ("vqa", "vl", 5, fairseq_ids("\u0120what", "\u0120guitar")),
    ]:
        torch.save(classify_checkpoint(original_checkpoint, head_type, task_name, num_classes), tmp_path / "in.pt")
        convert_checkpoint(tmp_path / "in.pt", tmp_path / task_name)
        processor = AutoProcessor.from_pretrained(tmp_path / task_name)
        assert processor(text=["What Guitar"])["input_ids"] == [expected_ids], task_name


@pytest.mark.parametrize(
    "head_type, task_name, num_classes, changes, message",
    [
        ("vl", "refcoco", 5, {}, "num_classes 4"),
        ("vl", "aqa", 1, {}, "head_type 'al'"),
        ("al", "audio_text_classify", 3, {"use_two_images": True}, "use_two_images needs head_type 'vl'"),
        ("vl", "nlvr2", 2, {"text_type_only": True}, "add_type_embedding must be set on all"),
        ("vl", "vqa", 5, {"layernorm_embedding": True}, "layernorm_embedding"),
    ],
)
def test_unsupported_variants_are_refused_clearly(original_checkpoint, head_type, task_name, num_classes, changes,
                                                   message):
    checkpoint = {"cfg": copy.deepcopy(original_checkpoint["cfg"]), "model": {}}
    model_cfg, task = checkpoint["cfg"]["model"], checkpoint["cfg"]["task"]
    model_cfg["_name"] = "one_peace_classify"
    task.update(_name=task_name, head_type=head_type, num_classes=num_classes,
                use_two_images=changes.get("use_two_images", False))
    if changes.get("text_type_only"):
        model_cfg["encoder"]["text_adapter"]["add_type_embedding"] = True
    if changes.get("layernorm_embedding"):
        model_cfg["encoder"]["image_adapter"]["layernorm_embedding"] = True
    with pytest.raises(CheckpointConversionError, match=message):
        config_from_checkpoint(checkpoint)
