"""Conversion of original checkpoints: safe loading, config derivation, key map, the CLI end to end."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from onepeace_hf.conversion import (
    CheckpointConversionError,
    config_from_checkpoint,
    convert_checkpoint,
    convert_state_dict,
    load_original_checkpoint,
    parse_conv_spec,
)
from onepeace_hf.modeling_onepeace import OnePeaceModel

from .conftest import CLASSIFY_CHECKPOINT, PRETRAIN_CHECKPOINT, REFERENCE, REPO_ROOT


def model_keys(config):
    with torch.device("meta"):
        return set(OnePeaceModel(config).state_dict())


class _Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path, original_checkpoint):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"cfg": original_checkpoint["cfg"], "model": {}, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointConversionError, match="Refusing to load"):
        load_original_checkpoint(path)
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")  # an already converted weight file
    (tmp_path / "notes.txt").write_text("not weights")
    for path in (tmp_path / "model.safetensors", tmp_path / "notes.txt"):
        with pytest.raises(CheckpointConversionError, match="is not a torch.save checkpoint"):
            load_original_checkpoint(path)


def test_reference_checkpoints_load_with_numpy_metadata(original_checkpoint):
    assert original_checkpoint["cfg"]["model"]["_name"] == "one_peace_pretrain"
    assert "encoder_wrapper.text_adapter.embed_tokens.weight" in original_checkpoint["model"]
    assert load_original_checkpoint(CLASSIFY_CHECKPOINT)["cfg"]["model"]["_name"] == "one_peace_classify"


def test_config_derived_from_the_stored_cfg(original_checkpoint):
    config = config_from_checkpoint(original_checkpoint)
    assert config.modalities == ["text", "image", "audio"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert config.audio_conv_spec == [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2
    assert config.vocab_size == 50264 and config.layer_scale_init_value == 1e-6
    assert config.magneto_scale_attn and config.scale_fc and not config.scale_attn and not config.scale_heads
    assert not config.rel_pos_table_per_layer


def test_a_task_longer_than_the_position_tables_is_cut_to_what_fits(original_checkpoint):
    """The reference stem makes a frame per 320 samples with a 400-sample window: 1023 frames (1024 positions with
    CLS) need (1023 - 1) * 320 + 400 = 327440 samples, and 319 more still give 1023. 15 s (240000) fits."""
    assert config_from_checkpoint(original_checkpoint).audio_max_samples == 240000
    checkpoint = {"cfg": copy.deepcopy(original_checkpoint["cfg"]), "model": original_checkpoint["model"]}
    checkpoint["cfg"]["task"]["max_duration"] = 30
    assert config_from_checkpoint(checkpoint).audio_max_samples == 327759


def test_conv_spec_is_parsed_without_eval():
    assert parse_conv_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]") == (
        [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    )
    with pytest.raises(CheckpointConversionError):
        parse_conv_spec("__import__('os').system('true')")


def test_unknown_and_missing_keys_are_listed(original_checkpoint):
    config = config_from_checkpoint(original_checkpoint)
    state = dict(original_checkpoint["model"])
    state["encoder_wrapper.surprise.weight"] = torch.zeros(1)
    del state["encoder_wrapper.image_adapter.pos_embed"]
    with pytest.raises(CheckpointConversionError) as error:
        convert_state_dict(state, config, model_keys(config))
    message = str(error.value)
    assert "encoder_wrapper.surprise.weight" in message and "adapters.image.pos_embed" in message


def unknown_kind_checkpoint(original, path=None):
    """A checkpoint of a model kind the converter does not know (e.g. a captioning model)."""
    checkpoint = {"cfg": copy.deepcopy(original["cfg"]), "model": {}}
    checkpoint["cfg"]["model"]["_name"] = "one_peace_caption"
    if path is not None:
        torch.save(checkpoint, path)
    return checkpoint


def test_unknown_checkpoint_kinds_are_refused_clearly(original_checkpoint):
    with pytest.raises(CheckpointConversionError, match="one_peace_caption"):
        config_from_checkpoint(unknown_kind_checkpoint(original_checkpoint))


def retrieval_checkpoint(original, head_type, drop):
    """A retrieval checkpoint as the original saves one: built from head_type, other branches removed."""
    checkpoint = copy.deepcopy({"cfg": original["cfg"]})
    checkpoint["cfg"]["model"]["_name"] = "one_peace_retrieval"
    checkpoint["cfg"]["task"]["head_type"] = head_type
    checkpoint["model"] = {
        key: value for key, value in original["model"].items()
        if key.startswith(("encoder_wrapper.", "logit_scale", "text_proj", "image_proj", "audio_proj"))
        and not any(f"{m}_" in key for m in drop)
    }
    return checkpoint


@pytest.mark.parametrize("head_type, drop", [("image", ("text", "audio")), ("al", ("image",))])
def test_retrieval_checkpoints_take_branches_from_head_type(
    original_checkpoint, expected, sample_padding_mask, head_type, drop
):
    checkpoint = retrieval_checkpoint(original_checkpoint, head_type, drop)
    config = config_from_checkpoint(checkpoint)
    assert config.modalities == [m for m in ("text", "image", "audio") if m not in drop]
    model = OnePeaceModel(config).eval()
    model.load_state_dict(convert_state_dict(checkpoint["model"], config, model_keys(config)))
    with torch.no_grad():
        if head_type == "image":
            out = model(pixel_values=expected["inputs.src_images"])
            torch.testing.assert_close(out.image_embeds, expected["image.embedding"], atol=1e-5, rtol=0)
        else:
            out = model(input_ids=expected["inputs.src_tokens"], input_values=expected["inputs.src_audios"],
                        padding_mask=sample_padding_mask)
            torch.testing.assert_close(out.audio_embeds, expected["audio.embedding"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.text_embeds, expected["text.embedding"], atol=1e-5, rtol=0)


def test_cli_converts_shards_and_verifies(tmp_path, expected):
    from transformers import AutoModel

    output = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "conversion" / "convert_original_checkpoint.py"),
         "--checkpoint", str(PRETRAIN_CHECKPOINT), "--output-dir", str(output), "--max-shard-size", "4MB"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "verified bit-exact" in result.stdout
    assert (output / "model.safetensors.index.json").exists()
    assert len(list(output.glob("model-*.safetensors"))) > 1
    for name in ("config.json", "tokenizer.json", "processor_config.json"):
        assert (output / name).exists(), name
    # Every file gets the permissions of config.json (the umask's), the shards too: safetensors writes them 0600.
    modes = {path.name: path.stat().st_mode & 0o777 for path in output.iterdir()}
    assert set(modes.values()) == {modes["config.json"]}, modes
    model = AutoModel.from_pretrained(output).eval()
    with torch.no_grad():
        embeds = model(pixel_values=expected["inputs.src_images"]).image_embeds
    torch.testing.assert_close(embeds, expected["image.embedding"], atol=1e-5, rtol=0)


def test_cli_reports_errors_without_a_traceback(tmp_path, original_checkpoint):
    path = tmp_path / "caption.pt"
    unknown_kind_checkpoint(original_checkpoint, path)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "conversion" / "convert_original_checkpoint.py"),
         "--checkpoint", str(path), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 1
    assert "one_peace_caption" in result.stderr and "Traceback" not in result.stderr


def test_bfloat16_conversion(tmp_path, expected):
    from transformers import AutoModel

    convert_checkpoint(PRETRAIN_CHECKPOINT, tmp_path, dtype="bf16")
    model = AutoModel.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        embeds = model(pixel_values=expected["inputs.src_images"].bfloat16()).image_embeds
    assert (embeds.float() - expected["image.embedding"]).abs().max() < 0.05


@pytest.mark.parametrize("head_type, drop", [("vl", ("audio",)), ("al", ("image",))])
def test_retrieval_checkpoints_convert_and_pass_verification(tmp_path, original_checkpoint, head_type, drop):
    torch.save(retrieval_checkpoint(original_checkpoint, head_type, drop), tmp_path / "retrieval.pt")
    result = convert_checkpoint(tmp_path / "retrieval.pt", tmp_path / "out", kind="one_peace_retrieval",
                                expected_outputs=REFERENCE / "expected_tiny_pretrain.safetensors")
    compared = {check.name for check in result.verification.checks}
    kept = {"vl": "image", "al": "audio"}[head_type]
    assert {f"{kept}.embedding", "text.embedding", f"{head_type}.text_hidden"} <= compared
    assert not any(name.startswith(drop[0]) for name in compared)
