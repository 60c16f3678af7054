"""Shared fixtures: the reference data of the original implementation and the converted tiny model."""

import os
from pathlib import Path

import pytest
import torch


# Without a GPU, our Triton kernel runs on CPU through Triton's interpreter (test_triton_attention.py). Triton reads
# this when it is first imported, which importing transformers or onepeace_hf already does: hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safetensors.torch import load_file  # noqa: E402

from onepeace_hf.conversion import config_from_checkpoint, convert_state_dict, load_original_checkpoint  # noqa: E402
from onepeace_hf.configuration_onepeace import OnePeaceConfig  # noqa: E402
from onepeace_hf.modeling_onepeace import OnePeaceModel  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT / ".." / "shared" / "reference"
PRETRAIN_CHECKPOINT = REFERENCE / "one_peace_tiny_pretrain.pt"
CLASSIFY_CHECKPOINT = REFERENCE / "one_peace_tiny_classify_image.pt"


@pytest.fixture(scope="session")
def expected():
    return load_file(REFERENCE / "expected_tiny_pretrain.safetensors")


@pytest.fixture(scope="session")
def original_checkpoint():
    return load_original_checkpoint(PRETRAIN_CHECKPOINT)


@pytest.fixture(scope="session")
def tiny_state(original_checkpoint):
    """Config and converted weights of the reference pretraining checkpoint (encoder part)."""
    config = config_from_checkpoint(original_checkpoint)
    with torch.device("meta"):
        keys = set(OnePeaceModel(config).state_dict())
    return config, convert_state_dict(original_checkpoint["model"], config, keys)


def build_model(config, state, attn_implementation="sdpa"):
    model = OnePeaceModel._from_config(config, attn_implementation=attn_implementation)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_state):
    return build_model(*tiny_state)


@pytest.fixture(scope="session")
def sample_padding_mask(expected):
    """Per-sample padding mask of `inputs.src_audios`: the cow clip fills 80000 samples, the tiled dog clip 16000."""
    waveforms = expected["inputs.src_audios"]
    mask = torch.zeros(waveforms.shape, dtype=torch.long)
    mask[0] = 1
    mask[1, :16000] = 1
    return mask


def tiny_random_config(**overrides):
    """A small random ONE-PEACE for training tests (32-px images, short conv stem); layer scale off so that a random
    model's embeddings depend on its input from the first step."""
    settings = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        audio_conv_spec=[[16, 10, 5], [16, 8, 4], [16, 4, 4]], audio_max_samples=80000,  # 5 s: 1001 positions
        use_layer_scale=False, drop_path_rate=0.1,
    )
    return OnePeaceConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory):
    """Folder with a random `tiny_random_config` model and a processor for 32-px images."""
    from onepeace_hf import OnePeaceImageProcessor, OnePeaceProcessor

    folder = tmp_path_factory.mktemp("tiny_random")
    torch.manual_seed(0)
    OnePeaceModel(tiny_random_config()).save_pretrained(folder)
    OnePeaceProcessor(image_processor=OnePeaceImageProcessor(size={"height": 32, "width": 32})).save_pretrained(folder)
    return folder

