"""Model cards: every kind renders and passes the local checks, carries the metadata the Hub needs and the results the
original authors report; what the Hub would refuse (or a card would get wrong) is caught before any upload."""

import tomllib
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from setuptools import find_packages

import onepeace_hf
from onepeace_hf import OnePeaceConfig, OnePeaceVisionConfig
from onepeace_hf.conversion import ConversionResult, convert_checkpoint
from onepeace_hf.model_card import (
    CARD_KINDS,
    DERIVED_KINDS,
    HUB_PIPELINE_TAGS,
    card_template,
    render_converted_card,
    render_model_card,
    reported_results,
    validate_model_card,
)
from onepeace_hf.output_verification import OutputCheck, VerificationReport

from .conftest import CLASSIFY_CHECKPOINT, REFERENCE, REPO_ROOT


BASE_MODEL = "someone/onepeace-4b"
PIPELINE_TAGS = {
    "pretrained": "feature-extraction",
    "vision": "image-feature-extraction",
    "retrieval": "feature-extraction",
    "image_classification": "image-classification",
    "audio_classification": "audio-classification",
    "vqa": "visual-question-answering",
    "nlvr2": "visual-question-answering",
    "visual_grounding": "zero-shot-object-detection",
    "audio_question_answering": "multiple-choice",
    "tiny_default": "feature-extraction",
}
# What data/default_model.py fills in for the tiny model's card.
TINY_VALUES = {
    **{f"{direction}_R_at_{k}": "50.0" for direction in ("text_to_image", "text_to_audio", "audio_to_image",
                                                         "image_to_audio") for k in (1, 5)},
    **{f"train_{direction}_R_at_1": "90.0" for direction in ("text_to_image", "text_to_audio", "audio_to_image",
                                                            "image_to_audio")},
    "parameters": "4.01M", "size_mb": "8.0", "stage1_steps": "1200", "stage1b_steps": "0", "stage2_steps": "400",
}
# What render_converted_card fills in for a converted folder.
CONVERTED_VALUES = {
    "repo_id": "someone/onepeace-converted", "original_checkpoint": "my_finetune.pt", "dtype": "bfloat16",
    "model_class": "OnePeaceModel", "verification": "Its outputs were compared.", "base_model": BASE_MODEL,
    "modality_tags": "text, image", "image_size": 256, "num_labels": 3129,
}
# The released files of each kind that the original README reports results for.
RELEASED = {
    "pretrained": "one-peace.pt",
    "retrieval": "finetune_coco.pt",
    "audio_classification": "finetune_vggsound.pt",
    "vqa": "finetune_vqa.pt",
    "nlvr2": "finetune_nlvr2.pt",
    "visual_grounding": "finetune_refcoco.pt",
    "audio_question_answering": "finetune_aqa.pt",
}


def values_for(kind, **overrides):
    return {**(TINY_VALUES if kind == "tiny_default" else CONVERTED_VALUES), **overrides}


def reported(card):
    """{(dataset, split, metric name): value} of the card's model-index."""
    return {(r.dataset_name, r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results or []}


@pytest.mark.parametrize("kind", CARD_KINDS)
def test_every_kind_renders_with_hub_metadata(kind):
    card = render_model_card(kind, values_for(kind, original_checkpoint=RELEASED.get(kind, "my_finetune.pt")))
    validate_model_card(card, kind)
    data = card.data
    assert (data.license, data.library_name) == ("apache-2.0", "transformers")
    assert data.pipeline_tag == PIPELINE_TAGS[kind] and data.pipeline_tag in HUB_PIPELINE_TAGS
    assert {"onepeace-hf", "one-peace"} <= set(data.tags)
    assert data.base_model == (BASE_MODEL if kind in DERIVED_KINDS else None)
    assert "$" not in card.content
    # A saved card reads back as the same metadata (what the Hub will parse).
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()


@pytest.mark.parametrize("kind, original_checkpoint, expected", [
    # README.md of github.com/OFA-Sys/ONE-PEACE (commit 71cfadf), table "Audio Tasks": ESC-50 zero-shot accuracy of
    # the pretrained model (run_scripts/esc50/zero_shot_evaluate.sh evaluates one-peace.pt), AudioCaps/Clotho R@1.
    ("pretrained", "one-peace.pt", {("ESC-50", "full", "zero-shot accuracy"): 91.8}),
    ("retrieval", "finetune_al_retrieval.pt", {("AudioCaps", "test", "text-to-audio R@1"): 42.5,
                                               ("Clotho", "evaluation", "audio-to-text R@1"): 27.1}),
    ("audio_classification", "finetune_fsd50k.pt", {("FSD50K", "eval", "mAP"): 69.7}),
    ("audio_question_answering", "finetune_aqa.pt", {("AVQA", "val", "accuracy"): 92.2}),
    # Same README, table "Vision-Language Tasks".
    ("retrieval", "finetune_coco.pt", {("MSCOCO", "test", "image-to-text R@1"): 84.1,
                                       ("MSCOCO", "test", "text-to-image R@1"): 65.4}),
    ("vqa", "finetune_vqa.pt", {("VQAv2", "test-dev", "VQA accuracy"): 82.6,
                                ("VQAv2", "test-std", "VQA accuracy"): 82.5}),
    ("nlvr2", "finetune_nlvr2.pt", {("NLVR2", "dev", "accuracy"): 87.8, ("NLVR2", "test-P", "accuracy"): 88.3}),
    ("visual_grounding", "finetune_refcoco.pt", {("RefCOCO", "testA", "Acc@0.5"): 94.18}),
    # Saved from the download URL as is, the RefCOCO+ file keeps its %2B.
    ("visual_grounding", "finetune_refcoco%2B.pt", {("RefCOCO+", "testB", "Acc@0.5"): 83.23}),
    ("visual_grounding", "finetune_refcocog.pt", {("RefCOCOg", "test-u", "Acc@0.5"): 89.27}),
])
def test_released_checkpoints_carry_the_reported_results(kind, original_checkpoint, expected):
    card = render_model_card(kind, values_for(kind, original_checkpoint=original_checkpoint))
    results = reported(card)
    assert expected.items() <= results.items()
    assert card.data.model_name == CONVERTED_VALUES["repo_id"]
    assert {r.source_url for r in card.data.eval_results} == {"https://github.com/OFA-Sys/ONE-PEACE#results"}
    # The same numbers, as a table in the text, with the statement of where they come from.
    assert "not re-measured by onepeace-hf" in card.text
    for (dataset, split, metric), value in results.items():
        assert f"| {dataset} | {split} | {metric} | {value} |" in card.text


def test_other_checkpoints_get_no_reported_results():
    card = render_model_card("vqa", values_for("vqa"))
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "report no results for this checkpoint" in card.text


def test_a_released_file_gets_only_its_own_kind():
    with pytest.raises(ValueError, match="finetune_vqa.pt is the original vqa checkpoint; it cannot get a nlvr2 card"):
        render_model_card("nlvr2", values_for("nlvr2", original_checkpoint="finetune_vqa.pt"))
    # Reported results are matched by file name only.
    assert reported_results("vqa", "/downloads/finetune_vqa.pt") == reported_results("vqa", "finetune_vqa.pt") != []


def test_a_missing_value_is_named():
    values = values_for("vqa")
    del values["base_model"], values["num_labels"]
    with pytest.raises(ValueError, match=r"vqa model card needs a value for: \$base_model, \$num_labels"):
        render_model_card("vqa", values)
    with pytest.raises(ValueError, match=r"\$stage2_steps"):
        render_model_card("tiny_default", {k: v for k, v in TINY_VALUES.items() if k != "stage2_steps"})


def test_an_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="Unknown model card kind 'detection'; the kinds are: pretrained, vision, "):
        render_model_card("detection", CONVERTED_VALUES)


def test_an_invalid_pipeline_tag_fails_validation():
    card = render_model_card("vqa", values_for("vqa"))
    card.data.pipeline_tag = "visual-question-anwsering"
    with pytest.raises(ValueError, match="pipeline_tag 'visual-question-anwsering' is not a Hub pipeline tag"):
        validate_model_card(card)


def test_a_non_numeric_metric_fails_validation():
    card = render_model_card("vqa", values_for("vqa", original_checkpoint="finetune_vqa.pt"))
    card.data.eval_results[0].metric_value = "82.6%"
    with pytest.raises(ValueError, match=r"model-index value '82\.6%' of VQA accuracy on VQAv2 is not a number"):
        validate_model_card(card)


def test_validation_lists_every_problem():
    card = """---
library_name: transformers
base_model: not a model id
model-index:
- name: x
  results:
  - task: {type: image-classification}
    metrics: [{type: accuracy, value: 1.0}]
---
# $title, price $$5
"""
    with pytest.raises(ValueError) as error:
        validate_model_card(card, "image_classification")
    message = str(error.value)
    for problem in ("license is missing", "pipeline_tag is missing", "model-index does not parse (KeyError: 'dataset')",
                    "base_model 'not a model id' is not a Hub model id", "placeholders left unrendered: $title"):
        assert problem in message
    with pytest.raises(ValueError, match=r"base_model is missing \(a vision model is made from the pretrained"):
        validate_model_card(render_model_card("pretrained", values_for("pretrained")).content, "vision")
    with pytest.raises(ValueError, match="no YAML metadata block"):
        validate_model_card("# A card without metadata\n")


def test_the_shipped_default_model_card_validates():
    readme = Path(onepeace_hf.DEFAULT_MODEL_PATH) / "README.md"
    if not readme.is_file():
        pytest.skip("no default model in this installation")
    card = ModelCard.load(readme)
    validate_model_card(card, "tiny_default")
    assert card.data.pipeline_tag == "feature-extraction" and card.data.eval_results


def conversion_result(kind, model_class, config, verification=None):
    return ConversionResult(Path("/models/onepeace-task"), kind, config, model_class, [], verification)


@pytest.mark.parametrize("checkpoint_kind, class_name, config, card_kind", [
    ("one_peace_pretrain", "OnePeaceModel", OnePeaceConfig(), "pretrained"),
    ("one_peace_pretrain", "OnePeaceForPretraining", OnePeaceConfig(), "pretrained"),
    ("vision", "OnePeaceVisionModel", OnePeaceVisionConfig(), "vision"),
    ("one_peace_retrieval", "OnePeaceModel", OnePeaceConfig(modalities=["text", "audio"]), "retrieval"),
    ("one_peace_classify", "OnePeaceForImageClassification", OnePeaceConfig(modalities=["image"], num_labels=1000),
     "image_classification"),
    ("one_peace_classify", "OnePeaceForAudioClassification", OnePeaceConfig(modalities=["audio"], num_labels=309),
     "audio_classification"),
    ("one_peace_classify", "OnePeaceForVisionLanguageClassification",
     OnePeaceConfig(modalities=["text", "image"], num_labels=3129), "vqa"),
    ("one_peace_classify", "OnePeaceForVisionLanguageClassification",
     OnePeaceConfig(modalities=["text", "image"], num_labels=2, classifier_two_images=True), "nlvr2"),
    ("one_peace_classify", "OnePeaceForVisualGrounding", OnePeaceConfig(modalities=["text", "image"]),
     "visual_grounding"),
    ("one_peace_classify", "OnePeaceForAudioLanguageMultipleChoice", OnePeaceConfig(modalities=["text", "audio"]),
     "audio_question_answering"),
    ("one_peace_classify", "OnePeaceForAudioLanguageClassification", OnePeaceConfig(modalities=["text", "audio"]),
     "audio_question_answering"),
])
def test_converted_folders_get_the_card_of_their_kind(checkpoint_kind, class_name, config, card_kind):
    model_class = getattr(onepeace_hf, class_name)
    card = render_converted_card(conversion_result(checkpoint_kind, model_class, config), "my_model.pt", "bf16")
    assert card.data.pipeline_tag == PIPELINE_TAGS[card_kind]
    assert card.data.base_model == (None if card_kind == "pretrained" else "OFA-Sys/ONE-PEACE")
    assert f"`{class_name}`" in card.text and "weights stored in bfloat16" in card.text
    assert 'from_pretrained("onepeace-task"' in card.text  # the folder's name unless repo_id is given
    if card_kind == "retrieval":
        assert {"text", "audio"} <= set(card.data.tags) and "image" not in card.data.tags
    assert "Not the released model's size" not in card.text  # the released size: the template's figures hold


def test_converted_card_states_the_output_verification():
    report = VerificationReport("/records/expected_tiny_pretrain.safetensors", atol=1e-4, rtol=0.0,
                                checks=[OutputCheck("text.embedding", 3.1e-6, True), OutputCheck("logits", 1e-6, True)])
    result = conversion_result("one_peace_pretrain", onepeace_hf.OnePeaceModel, OnePeaceConfig(), report)
    card = render_converted_card(result, "/downloads/one-peace.pt", "float32", repo_id="me/onepeace-4b")
    assert ("Its outputs were compared with `expected_tiny_pretrain.safetensors`, recorded with the original code: 2 "
            "outputs, all within atol + rtol x |expected| (atol 0.0001, rtol 0); largest absolute difference "
            "3.1e-06.") in card.text
    assert reported(card) == {("ESC-50", "full", "zero-shot accuracy"): 91.8}
    assert card.data.base_model is None and 'from_pretrained("me/onepeace-4b")' in card.text
    unchecked = render_converted_card(conversion_result("one_peace_pretrain", onepeace_hf.OnePeaceModel,
                                                        OnePeaceConfig()), "one-peace.pt", "float32")
    assert "were not compared with outputs recorded with the original code" in unchecked.text


@pytest.mark.skipif(not CLASSIFY_CHECKPOINT.exists(), reason="reference checkpoints missing")
def test_conversion_writes_a_valid_card(tmp_path):
    convert_checkpoint(CLASSIFY_CHECKPOINT, tmp_path / "classifier", expected_outputs=REFERENCE /
                       "expected_tiny_classify_image.safetensors", expected_inputs=REFERENCE /
                       "expected_tiny_pretrain.safetensors")
    card = ModelCard.load(tmp_path / "classifier" / "README.md")
    validate_model_card(card, "image_classification")
    assert card.data.pipeline_tag == "image-classification" and "`one_peace_tiny_classify_image.pt`" in card.text
    assert "compared with `expected_tiny_classify_image.safetensors`" in card.text
    # A tiny checkpoint: the card says, under its title, that the quoted sizes are the released model's.
    title, note = card.text.strip().split("\n\n")[:2]
    assert title.startswith("# ") and note.startswith("> **Not the released model's size.** This folder holds a "
                                                      "ONE-PEACE with hidden size 64 and 2 fusion layers")


def test_templates_ship_as_package_data():
    """pyproject.toml installs model_cards/ as onepeace_hf.model_cards, beside every package of src/."""
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"": "src", "onepeace_hf.model_cards": "model_cards"}
    assert sorted(setuptools["packages"]) == sorted(find_packages(REPO_ROOT / "src") + ["onepeace_hf.model_cards"])
    patterns = setuptools["package-data"]["onepeace_hf.model_cards"]
    shipped = {path.name for pattern in patterns for path in (REPO_ROOT / "model_cards").glob(pattern)}
    assert {f"{kind}.md" for kind in CARD_KINDS} | {"reported_results.yaml"} <= shipped
    assert all(card_template(kind).startswith("---\nlicense: apache-2.0\n") for kind in CARD_KINDS)
