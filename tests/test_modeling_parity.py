"""Parity with the original implementation: every applicable tensor of expected_tiny_pretrain.safetensors."""

import pytest
import torch


ATOL = 1e-5


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= atol, f"max abs error {error:.3g} > {atol}"


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def outputs(request, tiny_model, expected, sample_padding_mask):
    tiny_model.config._attn_implementation = request.param
    try:
        with torch.no_grad():
            separate = tiny_model(
                input_ids=expected["inputs.src_tokens"],
                pixel_values=expected["inputs.src_images"],
                input_values=expected["inputs.src_audios"],
                padding_mask=sample_padding_mask,
                output_hidden_states=True,
            )
            vl = tiny_model(input_ids=expected["vl.src_tokens"], pixel_values=expected["inputs.src_images"], fusion=True)
            al = tiny_model(
                input_ids=expected["al.src_tokens"],
                input_values=expected["inputs.src_audios"],
                padding_mask=sample_padding_mask,
                fusion=True,
            )
    finally:
        tiny_model.config._attn_implementation = "sdpa"
    return {"separate": separate, "vl": vl, "al": al}


@pytest.mark.parametrize(
    "key, field",
    [
        ("text.embedding", "text_embeds"),
        ("text.hidden", "text_last_hidden_state"),
        ("image.embedding", "image_embeds"),
        ("image.hidden", "image_last_hidden_state"),
        ("audio.embedding", "audio_embeds"),
        ("audio.hidden", "audio_last_hidden_state"),
        ("logit_scale_exp", "logit_scale"),
    ],
)
def test_separate_passes(outputs, expected, key, field):
    assert_close(getattr(outputs["separate"], field), expected[key])


def test_first_layer_output(outputs, expected):
    assert_close(outputs["separate"].text_hidden_states[1], expected["text.layer_out.0"])


@pytest.mark.parametrize(
    "mode, key, field",
    [
        ("vl", "vl.text_hidden", "text_last_hidden_state"),
        ("vl", "vl.image_hidden", "image_last_hidden_state"),
        ("al", "al.text_hidden", "text_last_hidden_state"),
        ("al", "al.audio_hidden", "audio_last_hidden_state"),
    ],
)
def test_fusion_passes(outputs, expected, mode, key, field):
    assert_close(getattr(outputs[mode], field), expected[key])


def test_similarity_logits_follow_embeddings(outputs, expected):
    out = outputs["separate"]
    scale = expected["logit_scale_exp"]
    assert_close(out.logits_per_image, scale * expected["image.embedding"] @ expected["text.embedding"].t(), 1e-4)
    assert_close(out.logits_per_audio, scale * expected["audio.embedding"] @ expected["text.embedding"].t(), 1e-4)
    assert torch.equal(out.logits_per_text, out.logits_per_image.t())


def test_projected_features_normalize_to_embeddings(tiny_model, expected, sample_padding_mask):
    with torch.no_grad():
        text = tiny_model.get_text_features(expected["inputs.src_tokens"])
        image = tiny_model.get_image_features(expected["inputs.src_images"])
        audio = tiny_model.get_audio_features(expected["inputs.src_audios"], sample_padding_mask)
    for features, key in [(text, "text.embedding"), (image, "image.embedding"), (audio, "audio.embedding")]:
        assert features.shape == (features.shape[0], 64)
        assert_close(torch.nn.functional.normalize(features, dim=-1), expected[key])


class TestAdapters:
    def test_text_adapter(self, tiny_model, expected):
        out = tiny_model.adapters["text"](expected["inputs.src_tokens"])
        assert torch.equal(out.embeddings, expected["text.adapter_out"])
        assert torch.equal(out.padding_mask, expected["text.padding_mask"])
        length = expected["text.rel_pos_bias"].shape[-1]
        assert torch.equal(out.relative_position_bias(0)[:, :length, :length], expected["text.rel_pos_bias"])

    def test_image_adapter(self, tiny_model, expected):
        out = tiny_model.adapters["image"](expected["inputs.src_images"])
        assert_close(out.embeddings, expected["image.adapter_out"])

    def test_audio_feature_encoder(self, tiny_model, expected):
        with torch.no_grad():
            features = tiny_model.adapters["audio"].feature_encoder(expected["inputs.src_audios"])
        assert_close(features, expected["audio.feature_embed"])

    def test_audio_conv_positions(self, tiny_model, expected):
        # Fed the reference features, so this checks the conv positional stage on its own.
        with torch.no_grad():
            positions = tiny_model.adapters["audio"].conv_pos_embed(expected["audio.feature_embed"])
        assert_close(positions, expected["audio.conv_pos_embed"])

    def test_audio_frame_padding_mask_from_sample_mask(self, tiny_model, expected, sample_padding_mask):
        out = tiny_model.adapters["audio"](expected["inputs.src_audios"], sample_padding_mask)
        assert torch.equal(out.padding_mask, expected["inputs.audio_padding_masks"])


def test_recomputed_bucket_tables_equal_the_original(tiny_model, original_checkpoint):
    state = original_checkpoint["model"]
    for modality in ("text", "image", "audio"):
        stored = state[f"encoder_wrapper.{modality}_adapter.rp_bucket"]
        assert torch.equal(tiny_model.adapters[modality].rel_pos_buckets, stored)
