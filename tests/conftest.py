"""Shared fixtures: the reference data of the original implementation and the converted tiny model."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onepeace_hf.conversion import config_from_checkpoint, convert_state_dict, load_original_checkpoint
from onepeace_hf.modeling_onepeace import OnePeaceModel


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
