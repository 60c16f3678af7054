"""From raw strings and files to the original's embeddings: converted folder + AutoProcessor + AutoModel."""

import runpy
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor, AutoTokenizer

# From its module: transformers 5.17 exports a torchvision-requiring placeholder at the top level without torchvision.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

import onepeace_hf  # noqa: F401
from onepeace_hf import load_audio
from onepeace_hf.conversion import convert_checkpoint

from .conftest import PRETRAIN_CHECKPOINT, REFERENCE, REPO_ROOT


TEXTS = ["cow", "dog", "elephant", "a photo of a dog playing in the snow"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted")
    convert_checkpoint(PRETRAIN_CHECKPOINT, folder)
    return folder


def test_every_auto_class_loads_the_folder(converted):
    assert type(AutoModel.from_pretrained(converted)).__name__ == "OnePeaceModel"
    assert type(AutoProcessor.from_pretrained(converted)).__name__ == "OnePeaceProcessor"
    assert type(AutoTokenizer.from_pretrained(converted)).__name__ == "OnePeaceTokenizer"
    assert type(AutoImageProcessor.from_pretrained(converted)).__name__ == "OnePeaceImageProcessor"
    assert type(AutoFeatureExtractor.from_pretrained(converted)).__name__ == "OnePeaceFeatureExtractor"


def test_raw_inputs_give_the_original_embeddings(converted, expected):
    model = AutoModel.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    images = [Image.open(REFERENCE / "assets" / name) for name in ("dog.JPEG", "elephant.JPEG")]
    cow, rate = load_audio(REFERENCE / "assets" / "cow.flac")
    dog, _ = load_audio(REFERENCE / "assets" / "dog.flac")
    inputs = processor(text=TEXTS, images=images, audio=[cow, dog[:12000]], sampling_rate=rate, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "input_values", "padding_mask"}
    with torch.no_grad():
        out = model(**inputs)
    for field, key in (("text_embeds", "text.embedding"), ("image_embeds", "image.embedding"),
                       ("audio_embeds", "audio.embedding"), ("audio_last_hidden_state", "audio.hidden")):
        error = (getattr(out, field) - expected[key]).abs().max().item()
        assert error <= 1e-5, (field, error)


@pytest.mark.slow
def test_main_demo_prints_similarity_tables(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "reference_similarity.py"), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    for title in ("text x image (cosine)", "text x audio (cosine)", "image x audio (cosine)"):
        assert title in result.stdout
    assert "dog.JPEG" in result.stdout and "cow.flac" in result.stdout


def test_similarity_tables_embed_each_clip_as_it_is_alone(tmp_path):
    import soundfile

    from onepeace_hf import DEFAULT_MODEL_PATH, OnePeaceModel, OnePeaceProcessor
    from onepeace_hf.similarity import embed_all

    model = OnePeaceModel.from_pretrained(DEFAULT_MODEL_PATH, dtype=torch.float32).eval()
    processor = OnePeaceProcessor.from_pretrained(DEFAULT_MODEL_PATH)
    cow, rate = load_audio(REFERENCE / "assets" / "cow.flac")
    soundfile.write(tmp_path / "short.wav", cow[: rate * 5 // 4], rate)  # shorter than cow.flac: padded with it
    paths = [REFERENCE / "assets" / "cow.flac", tmp_path / "short.wav"]
    together = embed_all(model, processor, audio_paths=paths)["audio"]
    alone = torch.cat([embed_all(model, processor, audio_paths=[path])["audio"] for path in paths])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def test_reference_similarity_names_a_missing_checkpoint(tmp_path, monkeypatch, capsys):
    """Also over an earlier conversion: a checkpoint given explicitly is converted, never silently replaced."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    monkeypatch.setattr("sys.argv", ["reference_similarity.py", "--checkpoint", str(tmp_path / "none.pt"),
                                     "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "examples" / "reference_similarity.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"--checkpoint {tmp_path / 'none.pt'}: no such file")
