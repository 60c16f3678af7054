"""OnePeaceProcessor: one call for all modalities, matching the reference inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from onepeace_hf.audio_utils import load_audio
from onepeace_hf.feature_extraction_onepeace import OnePeaceFeatureExtractor
from onepeace_hf.image_processing_onepeace import OnePeaceImageProcessor
from onepeace_hf.processing_onepeace import OnePeaceProcessor
from onepeace_hf.tokenization_onepeace import OnePeaceTokenizer


REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
TEXTS = ["cow", "dog", "elephant", "a photo of a dog playing in the snow"]


@pytest.fixture(scope="module")
def processor():
    return OnePeaceProcessor()


@pytest.fixture(scope="module")
def reference():
    return load_file(REFERENCE / "expected_tiny_pretrain.safetensors")


@pytest.fixture(scope="module")
def inputs():
    images = [Image.open(REFERENCE / "assets" / name) for name in ("dog.JPEG", "elephant.JPEG")]
    cow, _ = load_audio(REFERENCE / "assets" / "cow.flac")
    dog, _ = load_audio(REFERENCE / "assets" / "dog.flac")
    return {"text": TEXTS, "images": images, "audio": [cow, dog[:12000]]}


def test_all_modalities_match_reference(processor, inputs, reference):
    batch = processor(**inputs, sampling_rate=16000, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "input_values", "padding_mask"}
    assert batch["input_ids"].tolist() == reference["inputs.src_tokens"].tolist()
    assert batch["attention_mask"].tolist() == (reference["inputs.src_tokens"] != 1).long().tolist()
    assert (batch["pixel_values"] - reference["inputs.src_images"]).abs().max().item() <= 1e-6
    assert (batch["input_values"] - reference["inputs.src_audios"]).abs().max().item() <= 1e-6
    assert batch["padding_mask"].dtype == torch.int64
    assert batch["padding_mask"].sum(dim=1).tolist() == [80000, 16000]


@pytest.mark.parametrize(
    "given, keys",
    [
        ("text", {"input_ids", "attention_mask"}),
        ("images", {"pixel_values"}),
        ("audio", {"input_values", "padding_mask"}),
    ],
)
def test_only_the_given_modality(processor, inputs, given, keys):
    kwargs = {"sampling_rate": 16000} if given == "audio" else {}
    assert set(processor(**{given: inputs[given]}, return_tensors="pt", **kwargs)) == keys


def test_text_is_truncated_by_default(processor):
    long_text = " ".join(f"word{i}" for i in range(60))
    input_ids = processor(text=[long_text, "dog"], return_tensors="pt")["input_ids"]
    assert input_ids.shape == (2, 71)
    assert input_ids[0, -1].item() == 2 and input_ids[1, :2].tolist() == [2335, 2]
    assert processor(text=long_text, truncation=False, return_tensors="pt")["input_ids"].shape[1] > 71


def test_a_saved_processor_keeps_no_call_state(tmp_path):
    """A call leaves its truncation on the Rust tokenizer; saved and read back, it used to become a fixed
    `max_length=71` that beat `model_max_length`, and `pad_to_multiple_of` failed against the prime 71."""
    from onepeace_hf import DEFAULT_MODEL_PATH

    long_text = " ".join(["word"] * 100)
    used = OnePeaceProcessor()
    used(text=[long_text])
    used.save_pretrained(tmp_path)
    assert "max_length" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    for folder in (tmp_path, DEFAULT_MODEL_PATH):
        shorter = OnePeaceProcessor.from_pretrained(folder, model_max_length=20)
        assert shorter(text=[long_text], return_tensors="pt")["input_ids"].shape == (1, 20)
        texts = ["a cow", "a big dog"]
        batch = shorter(text=texts, pad_to_multiple_of=8, return_tensors="pt")["input_ids"].tolist()
        unpadded = [shorter.tokenizer(text)["input_ids"] for text in texts]  # ids: test_tokenization's oracle
        assert batch == [ids + [1] * (8 - len(ids)) for ids in unpadded]


def test_audio_needs_sampling_rate(processor, inputs):
    with pytest.raises(ValueError, match="sampling_rate"):
        processor(audio=inputs["audio"], return_tensors="pt")


def test_do_normalize_reaches_the_feature_extractor(processor):
    clip = 3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    raw = processor(audio=clip, sampling_rate=16000, do_normalize=False, return_tensors="pt")["input_values"]
    np.testing.assert_array_equal(raw[0].numpy(), clip)
    assert processor(audio=clip, sampling_rate=16000, return_tensors="pt")["input_values"].std() < 1.01


def test_audio_is_resampled(processor):
    clip = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)
    assert processor(audio=clip, sampling_rate=44100, return_tensors="pt")["input_values"].shape == (1, 16000)


def test_audio_files_are_decoded_at_their_own_rates(processor, tmp_path):
    import soundfile

    rng = np.random.default_rng(0)
    stereo = 0.3 * rng.standard_normal((33075, 2)).astype(np.float32)  # 1.5 s at 22.05 kHz
    mono = 0.3 * rng.standard_normal(24000).astype(np.float32)  # 1.5 s at 16 kHz
    soundfile.write(tmp_path / "stereo.wav", stereo, 22050, subtype="FLOAT")
    soundfile.write(tmp_path / "mono.flac", mono, 16000, subtype="PCM_24")
    files = [tmp_path / "stereo.wav", str(tmp_path / "mono.flac")]
    from_files = processor(audio=files, text=["a dog"], return_tensors="pt")
    # The same clips as arrays, each given with its own rate to the feature extractor (one call per rate).
    clips = [processor.feature_extractor(wave, sampling_rate=rate)["input_values"][0] for wave, rate in
             (load_audio(files[0]), load_audio(files[1]))]
    np.testing.assert_allclose(from_files["input_values"].numpy(), np.stack(clips), rtol=0, atol=1e-6)
    assert from_files["padding_mask"].all() and from_files["input_ids"].shape[0] == 1
    torch.testing.assert_close(processor(audio=files[1], return_tensors="pt")["input_values"][0],
                               from_files["input_values"][1])
    with pytest.raises(ValueError, match="not both in one call"):
        processor(audio=[files[0], mono], sampling_rate=16000)
    with pytest.raises(ValueError, match="audio files and dicts carry their own"):
        processor(audio=files, sampling_rate=16000)
    with pytest.raises(ValueError, match=r"Audio file .*missing\.wav does not exist"):
        processor(audio=[tmp_path / "missing.wav"])


@pytest.mark.parametrize("name", ["text", "images", "audio"])
def test_an_empty_list_is_refused_by_name(processor, name):
    with pytest.raises(ValueError, match=f"`{name}` is an empty list"):
        processor(**{name: []}, sampling_rate=16000)


def test_python_lists_of_integer_samples_are_clips(processor):
    """The feature extractor reads Python lists as float samples; transformers' own audio checks refused ints."""
    samples = [(3 * k) % 7 - 3 for k in range(16000)]
    expected = processor(audio=np.asarray(samples, dtype=np.float32), sampling_rate=16000)["input_values"]
    for given in (samples, [samples], [samples, np.asarray(samples, dtype=np.float32)]):
        values = processor(audio=given, sampling_rate=16000)["input_values"]
        assert all(np.array_equal(row, expected[0]) for row in values)


def test_save_and_load(inputs, tmp_path):
    processor = OnePeaceProcessor(
        image_processor=OnePeaceImageProcessor(size={"height": 224, "width": 224}),
        tokenizer=OnePeaceTokenizer(),
        feature_extractor=OnePeaceFeatureExtractor(max_samples=32000),
    )
    processor.save_pretrained(tmp_path)
    reloaded = OnePeaceProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded.tokenizer, OnePeaceTokenizer)
    assert dict(reloaded.image_processor.size) == {"height": 224, "width": 224}
    assert reloaded.feature_extractor.max_samples == 32000
    expected = processor(**inputs, sampling_rate=16000, return_tensors="pt")
    batch = reloaded(**inputs, sampling_rate=16000, return_tensors="pt")
    assert set(batch) == set(expected)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and batch["input_values"].shape == (2, 32000)


def test_length_options_with_text_and_audio_are_the_texts(processor, inputs):
    """`max_length=71` counts tokens; handed to the feature extractor too (transformers' default) it would ask to
    pad clips of thousands of samples to 71 and fail."""
    clips = [np.zeros(20000, dtype=np.float32), np.ones(30000, dtype=np.float32)]
    batch = processor(text=TEXTS[:2], audio=clips, sampling_rate=16000, padding="max_length", max_length=71,
                      return_tensors="pt")
    assert batch["input_ids"].shape == (2, 71) and batch["input_values"].shape == (2, 30000)
    assert batch["padding_mask"].sum(1).tolist() == [20000, 30000]
    audio_padded = processor(text=TEXTS[:2], audio=clips, sampling_rate=16000, max_length=8,
                             audio_kwargs={"padding": "max_length", "max_length": 40000}, return_tensors="pt")
    assert audio_padded["input_values"].shape == (2, 40000) and audio_padded["input_ids"].shape[1] <= 8
    with pytest.raises(ValueError, match="max_length=71 samples, but a clip has 30000 samples"):
        processor(audio=clips, sampling_rate=16000, padding="max_length", max_length=71)  # audio alone: samples


def test_a_folder_with_only_the_feature_extractor_does_not_load_as_the_image_processor(tmp_path):
    """Both parts save preprocessor_config.json, and transformers maps a *FeatureExtractor type to the
    *ImageProcessor of the same name."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor

    OnePeaceFeatureExtractor(max_samples=32000).save_pretrained(tmp_path / "audio")
    OnePeaceImageProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp_path / "image")
    loaded = AutoProcessor.from_pretrained(tmp_path / "audio")
    assert isinstance(loaded, OnePeaceFeatureExtractor) and loaded.max_samples == 32000
    assert isinstance(AutoFeatureExtractor.from_pretrained(tmp_path / "audio"), OnePeaceFeatureExtractor)
    for loader in (AutoImageProcessor, OnePeaceImageProcessor):
        with pytest.raises(ValueError, match="audio feature extractor, not its image processor"):
            loader.from_pretrained(tmp_path / "audio")
    image = AutoProcessor.from_pretrained(tmp_path / "image")
    assert isinstance(image, OnePeaceImageProcessor) and image.size.height == 224


def test_datasets_audio_dicts_and_a_tuple_of_texts_are_taken(processor, tmp_path):
    """What a `datasets` row holds: {"array", "sampling_rate"} decoded, {"path"} with Audio(decode=False)."""
    import soundfile

    clip = 0.3 * np.random.default_rng(1).standard_normal(33075).astype(np.float32)  # 1.5 s at 22.05 kHz
    soundfile.write(tmp_path / "clip.wav", clip, 22050, subtype="FLOAT")
    expected = processor.feature_extractor(clip, sampling_rate=22050)["input_values"]
    decoded = {"array": clip, "sampling_rate": 22050, "path": None}
    for given in (decoded, [decoded, {"path": str(tmp_path / "clip.wav"), "bytes": None}]):
        values = processor(audio=given, text=("a", "b"), return_tensors="np")["input_values"]
        assert all(np.array_equal(row, expected[0]) for row in values)
    assert np.array_equal(processor.feature_extractor([decoded])["input_values"], expected)
    with pytest.raises(ValueError, match="contradicts the audio dict's sampling_rate 22050"):
        processor.feature_extractor(decoded, sampling_rate=16000)
    with pytest.raises(ValueError, match=r"needs 'array' and 'sampling_rate' .* got the keys \['bytes'\]"):
        processor(audio={"bytes": b"RIFF"})
    assert len(processor(text=("a dog", "a cat"))["input_ids"]) == 2


def test_a_missing_image_file_is_named(processor, tmp_path):
    for missing in (tmp_path / "dog.png", str(tmp_path / "dog.png"), "photos/my dog.jpeg"):
        with pytest.raises(ValueError, match="Image file .*dog.*does not exist"):
            processor(images=missing)
