"""transformers pipelines on folders saved by the package (model.save_pretrained + processor.save_pretrained).

Expected scores are computed here from the model's embeddings or logits with the formulas written out (softmax of
`exp(clamped logit_scale) * cosine`, softmax / sigmoid of the logits), or taken from the original implementation's
reference outputs, never from the pipeline's own code path.
"""

import logging
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

import onepeace_hf  # noqa: F401  (registers the Auto classes the pipelines load through)
from onepeace_hf import (
    OnePeaceFeatureExtractor,
    OnePeaceForAudioClassification,
    OnePeaceForImageClassification,
    OnePeaceImageProcessor,
    OnePeaceModel,
    OnePeaceProcessor,
    OnePeaceTokenizer,
    load_audio,
)
from onepeace_hf.conversion import config_from_checkpoint, convert_state_dict, load_original_checkpoint

from .conftest import CLASSIFY_CHECKPOINT, REFERENCE, REPO_ROOT, build_model, tiny_random_config


ASSETS = REFERENCE / "assets"
# Row order of the reference texts (see ../shared/reference/README.md).
REFERENCE_TEXTS = ["cow", "dog", "elephant", "a photo of a dog playing in the snow"]


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


@contextmanager
def transformers_errors():
    """Collect what transformers logs at ERROR level (e.g. "The model ... is not supported for <task>")."""
    records = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def make_pipeline(task, folder):
    """`pipeline(task, model=folder)` with nothing else given; fails on any error transformers logs on the way."""
    with transformers_errors() as errors:
        pipe = pipeline(task, model=str(folder), device="cpu")
    assert [r.getMessage() for r in errors] == []
    return pipe


def save_with_processor(model, folder, image_size):
    model.save_pretrained(folder)
    size = {"height": image_size, "width": image_size}
    processor = OnePeaceProcessor(image_processor=OnePeaceImageProcessor(size=size))
    processor.save_pretrained(folder)
    return folder


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def softmax(x):
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def zero_shot_probabilities(query_embeds, text_embeds, logit_scale):
    """What a CLIP-style zero-shot classifier should report: softmax over the texts of scale * cosine."""
    scale = math.exp(min(float(logit_scale), math.log(100)))
    return softmax(scale * unit(query_embeds) @ unit(text_embeds).T)


def assert_ranked_scores(result, labels, probabilities, atol=1e-5):
    """`result` is a pipeline answer: [{"score", "label"}], best first; compare with `probabilities` over `labels`."""
    assert all(set(entry) == {"score", "label"} for entry in result)
    order = torch.argsort(probabilities, descending=True).tolist()
    assert [entry["label"] for entry in result] == [labels[i] for i in order]
    np.testing.assert_allclose([entry["score"] for entry in result], probabilities[order].numpy(), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def dog_image():
    return Image.open(ASSETS / "dog.JPEG")


@pytest.fixture(scope="module")
def elephant_image():
    return Image.open(ASSETS / "elephant.JPEG")


@pytest.fixture(scope="module")
def cow_audio():
    waveform, rate = load_audio(ASSETS / "cow.flac")
    assert rate == 16000 and waveform.ndim == 1  # the pipelines take 16 kHz mono arrays as they are
    return waveform


@pytest.fixture(scope="module")
def short_audio(cow_audio):
    """1.5 s of the cow clip: enough for the random models, and quicker."""
    return cow_audio[:24000]


@pytest.fixture(scope="module")
def reference_dir(tiny_state, tmp_path_factory):
    """The converted reference checkpoint (original implementation's random weights), saved with a 256-px processor."""
    return save_with_processor(build_model(*tiny_state), tmp_path_factory.mktemp("reference"), 256)


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------------------------------------


def test_zero_shot_pipelines_find_their_components(tiny_random_model_dir):
    image_pipe = make_pipeline("zero-shot-image-classification", tiny_random_model_dir)
    assert isinstance(image_pipe.model, OnePeaceModel)
    assert isinstance(image_pipe.tokenizer, OnePeaceTokenizer)
    assert isinstance(image_pipe.image_processor, OnePeaceImageProcessor)
    assert image_pipe.image_processor.size.height == 32  # the saved processor, not the class defaults
    audio_pipe = make_pipeline("zero-shot-audio-classification", tiny_random_model_dir)
    assert isinstance(audio_pipe.model, OnePeaceModel)
    assert isinstance(audio_pipe.tokenizer, OnePeaceTokenizer)
    assert isinstance(audio_pipe.feature_extractor, OnePeaceFeatureExtractor)


@torch.no_grad()
def test_zero_shot_image_scores_are_softmax_of_scaled_cosines(tiny_random_model_dir, dog_image):
    labels = ["cow", "dog", "a large grey elephant"]  # different token counts: the texts are padded in one batch
    result = make_pipeline("zero-shot-image-classification", tiny_random_model_dir)(
        dog_image, candidate_labels=labels, hypothesis_template="a photo of a {}."
    )

    model = OnePeaceModel.from_pretrained(tiny_random_model_dir).eval()
    processor = OnePeaceProcessor.from_pretrained(tiny_random_model_dir)
    text = processor(text=[f"a photo of a {label}." for label in labels], return_tensors="pt")
    image_embeds = model.get_image_features(processor(images=[dog_image], return_tensors="pt")["pixel_values"])
    text_embeds = model.get_text_features(text["input_ids"], text["attention_mask"])
    probabilities = zero_shot_probabilities(image_embeds, text_embeds, model.logit_scale)[0]

    assert probabilities.max() - probabilities.min() > 0.02  # the comparison below is about a real ranking
    assert_ranked_scores(result, labels, probabilities)


@torch.no_grad()
def test_zero_shot_audio_scores_are_softmax_of_scaled_cosines(tiny_random_model_dir, short_audio):
    labels = ["cow", "dog", "a large grey elephant"]
    result = make_pipeline("zero-shot-audio-classification", tiny_random_model_dir)(
        short_audio, candidate_labels=labels, hypothesis_template="the sound of a {}"
    )

    model = OnePeaceModel.from_pretrained(tiny_random_model_dir).eval()
    processor = OnePeaceProcessor.from_pretrained(tiny_random_model_dir)
    text = processor(text=[f"the sound of a {label}" for label in labels], return_tensors="pt")
    audio = processor(audio=[short_audio], sampling_rate=16000, return_tensors="pt")
    audio_embeds = model.get_audio_features(audio["input_values"], audio["padding_mask"])
    text_embeds = model.get_text_features(text["input_ids"], text["attention_mask"])
    probabilities = zero_shot_probabilities(audio_embeds, text_embeds, model.logit_scale)[0]

    assert probabilities.max() - probabilities.min() > 0.02
    assert_ranked_scores(result, labels, probabilities)


def test_zero_shot_image_on_the_reference_model_matches_the_original(
    reference_dir, expected, dog_image, elephant_image
):
    """Scores from the original implementation's embeddings of the same images and texts (hypothesis "{}")."""
    pipe = make_pipeline("zero-shot-image-classification", reference_dir)
    probabilities = zero_shot_probabilities(
        expected["image.embedding"], expected["text.embedding"], math.log(expected["logit_scale_exp"])
    )
    for batch_size in (1, 2):
        results = pipe(
            [dog_image, elephant_image], candidate_labels=REFERENCE_TEXTS, hypothesis_template="{}",
            batch_size=batch_size,
        )
        assert len(results) == 2
        for result, row in zip(results, probabilities):
            assert_ranked_scores(result, REFERENCE_TEXTS, row, atol=1e-4)
            assert math.isclose(sum(entry["score"] for entry in result), 1.0, abs_tol=1e-5)


def test_zero_shot_audio_on_the_reference_model_matches_the_original(reference_dir, expected, cow_audio):
    result = make_pipeline("zero-shot-audio-classification", reference_dir)(
        cow_audio, candidate_labels=REFERENCE_TEXTS, hypothesis_template="{}"
    )
    # Audio 0 of the reference batch is the whole cow clip, the longest of its batch (no padding involved).
    probabilities = zero_shot_probabilities(
        expected["audio.embedding"][:1], expected["text.embedding"], math.log(expected["logit_scale_exp"])
    )[0]
    assert_ranked_scores(result, REFERENCE_TEXTS, probabilities, atol=1e-4)
    assert math.isclose(sum(entry["score"] for entry in result), 1.0, abs_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------------


def test_feature_extraction_returns_the_text_embedding(reference_dir, expected):
    """The first output of `OnePeaceModel` on text is the L2-normalized projected [CLS]: (1, hidden) per text."""
    pipe = make_pipeline("feature-extraction", reference_dir)
    assert isinstance(pipe.model, OnePeaceModel) and isinstance(pipe.tokenizer, OnePeaceTokenizer)
    reference = unit(expected["text.embedding"])
    # batch_size 2 pads "elephant" to the length of the long text in one model call; the result must not change.
    for batch_size in (1, 2):
        features = pipe(REFERENCE_TEXTS, batch_size=batch_size)
        assert len(features) == 4
        for row, feature in zip(reference, features):
            feature = np.asarray(feature)
            assert feature.shape == (1, 64)
            np.testing.assert_allclose(feature[0], row.numpy(), atol=1e-5, rtol=0)
    tensor = pipe("elephant", return_tensors=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (1, 64)


def test_image_feature_extraction_returns_the_image_embedding(reference_dir, expected, dog_image, elephant_image):
    pipe = make_pipeline("image-feature-extraction", reference_dir)
    assert isinstance(pipe.model, OnePeaceModel) and isinstance(pipe.image_processor, OnePeaceImageProcessor)
    reference = unit(expected["image.embedding"])
    for batch_size in (1, 2):
        features = [np.asarray(f) for f in pipe([dog_image, elephant_image], batch_size=batch_size)]
        assert len(features) == 2
        for row, feature in zip(reference, features):
            assert feature.shape == (1, 64)
            np.testing.assert_allclose(feature[0], row.numpy(), atol=1e-5, rtol=0)


@torch.no_grad()
def test_feature_extraction_on_a_saved_random_model(tiny_random_model_dir, dog_image):
    model = OnePeaceModel.from_pretrained(tiny_random_model_dir).eval()
    processor = OnePeaceProcessor.from_pretrained(tiny_random_model_dir)
    text = processor(text=["a dog in the snow"], return_tensors="pt")
    expected_text = unit(model.get_text_features(text["input_ids"], text["attention_mask"]))
    expected_image = unit(model.get_image_features(processor(images=[dog_image], return_tensors="pt")["pixel_values"]))

    text_features = make_pipeline("feature-extraction", tiny_random_model_dir)("a dog in the snow", return_tensors=True)
    image_features = make_pipeline("image-feature-extraction", tiny_random_model_dir)(dog_image, return_tensors=True)
    torch.testing.assert_close(text_features, expected_text, atol=1e-6, rtol=0)
    torch.testing.assert_close(image_features, expected_image, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Classification heads
# ----------------------------------------------------------------------------------------------------------------------


LABELS = {0: "cat", 1: "dog", 2: "cow", 3: "bird"}


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory):
    """Random image and audio classifiers, single- and multi-label, each saved with a 32-px processor."""
    folders = {}
    for problem_type in ("single_label_classification", "multi_label_classification"):
        config = tiny_random_config(id2label=LABELS, problem_type=problem_type)
        for name, model_class in (("image", OnePeaceForImageClassification), ("audio", OnePeaceForAudioClassification)):
            torch.manual_seed(0)
            model = model_class(config)
            with torch.no_grad():
                # Spread the logits so that the scores differ clearly (a fresh head's logits are all near 0).
                model.classification_head.classifier[-1].weight.mul_(50)
            folders[name, problem_type] = save_with_processor(model, tmp_path_factory.mktemp(f"{name}_cls"), 32)
    return folders


def check_classification(result, logits, problem_type, top_k):
    """Labels by descending logit; scores softmax (single-label) or sigmoid (multi-label) of the logits."""
    if problem_type == "single_label_classification":
        scores = softmax(logits)
    else:
        scores = 1 / (1 + torch.exp(-logits))
    order = torch.argsort(logits, descending=True)[:top_k].tolist()
    assert [entry["label"] for entry in result] == [LABELS[i] for i in order]
    np.testing.assert_allclose([entry["score"] for entry in result], scores[order].numpy(), atol=1e-5, rtol=0)
    assert scores.max() - scores.min() > 0.05


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification"])
@torch.no_grad()
def test_image_classification_pipeline(classifier_dirs, problem_type, dog_image):
    folder = classifier_dirs["image", problem_type]
    pipe = make_pipeline("image-classification", folder)
    assert isinstance(pipe.model, OnePeaceForImageClassification)
    result = pipe(dog_image, top_k=3)

    model = OnePeaceForImageClassification.from_pretrained(folder).eval()
    pixel_values = OnePeaceImageProcessor.from_pretrained(folder)(dog_image, return_tensors="pt")["pixel_values"]
    check_classification(result, model(pixel_values=pixel_values).logits[0], problem_type, top_k=3)


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification"])
@torch.no_grad()
def test_audio_classification_pipeline(classifier_dirs, problem_type, short_audio):
    folder = classifier_dirs["audio", problem_type]
    pipe = make_pipeline("audio-classification", folder)
    assert isinstance(pipe.model, OnePeaceForAudioClassification)
    assert isinstance(pipe.feature_extractor, OnePeaceFeatureExtractor)
    # Default top_k 5, capped at the 4 labels. transformers 5.17 applies softmax here whatever the problem type
    # (later releases follow problem_type), so the multi-label case names its function.
    sigmoid = {"function_to_apply": "sigmoid"} if problem_type == "multi_label_classification" else {}
    result = pipe(short_audio, **sigmoid)

    model = OnePeaceForAudioClassification.from_pretrained(folder).eval()
    inputs = OnePeaceFeatureExtractor.from_pretrained(folder)(short_audio, sampling_rate=16000, return_tensors="pt")
    check_classification(result, model(**inputs).logits[0], problem_type, top_k=4)


def test_image_classification_on_the_converted_classifier_matches_the_original(tmp_path, dog_image, elephant_image):
    checkpoint = load_original_checkpoint(CLASSIFY_CHECKPOINT)
    config = config_from_checkpoint(checkpoint)
    model = OnePeaceForImageClassification(config)
    model.load_state_dict(convert_state_dict(checkpoint["model"], config, set(model.state_dict())), strict=True)
    folder = save_with_processor(model, tmp_path / "classify", 256)

    results = make_pipeline("image-classification", folder)([dog_image, elephant_image], top_k=5)
    original_logits = load_file(REFERENCE / "expected_tiny_classify_image.safetensors")["logits"]
    for result, logits in zip(results, original_logits):
        order = torch.argsort(logits, descending=True).tolist()
        assert [entry["label"] for entry in result] == [config.id2label[i] for i in order]
        np.testing.assert_allclose([e["score"] for e in result], softmax(logits)[order].numpy(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# The shipped default model on the digits test split
# ----------------------------------------------------------------------------------------------------------------------

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.mark.slow
def test_zero_shot_pipelines_name_the_digits_with_the_default_model():
    """Labels a trained model gets right well above chance (10%): measured 0.28 (100 images) and 0.40 (60 clips),
    with the bare digit names as labels."""
    import json

    import soundfile

    split = REPO_ROOT / "data" / "digits" / "test"
    rows = [json.loads(line) for line in (split / "metadata.jsonl").read_text().splitlines()]
    images = [r for r in rows if r["modality"] == "image"]
    clips = [r for r in rows if r["modality"] == "audio"]

    image_pipe = make_pipeline("zero-shot-image-classification", onepeace_hf.DEFAULT_MODEL_PATH)
    outputs = image_pipe([Image.open(split / r["file"]) for r in images], candidate_labels=DIGIT_NAMES,
                         hypothesis_template="{}")
    image_accuracy = np.mean([out[0]["label"] == r["label_name"] for out, r in zip(outputs, images)])

    audio_pipe = make_pipeline("zero-shot-audio-classification", onepeace_hf.DEFAULT_MODEL_PATH)
    outputs = [
        audio_pipe(soundfile.read(split / r["file"], dtype="float32")[0], candidate_labels=DIGIT_NAMES,
                   hypothesis_template="{}")
        for r in clips
    ]
    audio_accuracy = np.mean([out[0]["label"] == r["label_name"] for out, r in zip(outputs, clips)])
    assert image_accuracy >= 0.2 and audio_accuracy >= 0.3, (image_accuracy, audio_accuracy)
