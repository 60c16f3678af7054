"""Model behaviour beyond parity: save/load, attention implementations, batching, training features, errors."""

import math
import re
import warnings

import pytest
import torch

from onepeace_hf.configuration_onepeace import OnePeaceConfig
from onepeace_hf.modeling_onepeace import OnePeaceModel
from onepeace_hf.training import enable_activation_checkpointing

from .conftest import build_model


def max_error(a, b):
    return (a.float() - b.float()).abs().max().item()


def small_config(**overrides):
    """A random tiny config exercising options the reference checkpoint does not (per-layer tables, head scale...)."""
    values = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        text_rel_bucket_size=16, image_size=64, image_pos_grid_size=4, image_rel_bucket_size=4,
        audio_conv_spec=[[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2, audio_conv_pos_groups=4,
        audio_rel_bucket_size=32, vocab_size=100,
    )
    values.update(overrides)
    return OnePeaceConfig(**values)


def test_save_and_reload_is_bit_exact(tiny_model, expected, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    reloaded = OnePeaceModel.from_pretrained(tmp_path).eval()
    for key, tensor in tiny_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    # Non-persistent index buffers are rebuilt after meta-device loading, not left as garbage.
    for modality in ("text", "image", "audio"):
        assert torch.equal(reloaded.adapters[modality].rel_pos_buckets, tiny_model.adapters[modality].rel_pos_buckets)
    with torch.no_grad():
        a = tiny_model(input_ids=expected["inputs.src_tokens"], pixel_values=expected["inputs.src_images"])
        b = reloaded(input_ids=expected["inputs.src_tokens"], pixel_values=expected["inputs.src_images"])
    assert torch.equal(a.text_embeds, b.text_embeds) and torch.equal(a.image_embeds, b.image_embeds)


def test_sdpa_is_the_default(tiny_state, tmp_path):
    model = build_model(*tiny_state)
    model.save_pretrained(tmp_path)
    assert OnePeaceModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_eager_and_sdpa_agree_with_gradients(tiny_state, expected):
    eager, sdpa = build_model(*tiny_state, "eager"), build_model(*tiny_state, "sdpa")
    inputs = dict(input_ids=expected["vl.src_tokens"], pixel_values=expected["inputs.src_images"], fusion=True)
    outs = []
    for model in (eager, sdpa):
        model.zero_grad()
        out = model(**inputs)
        (out.text_last_hidden_state.sum() + out.image_last_hidden_state.pow(2).mean()).backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert max_error(outs[0][0].image_last_hidden_state, outs[1][0].image_last_hidden_state) <= 1e-5
    assert outs[0][1].keys() == outs[1][1].keys()
    table = "adapters.image.rel_pos.tables.0.weight"
    assert outs[0][1][table].abs().sum() > 0
    for name in outs[0][1]:
        assert max_error(outs[0][1][name], outs[1][1][name]) <= 1e-4, name


def test_text_alone_equals_text_in_padded_batch(tiny_model, expected):
    ids = expected["inputs.src_tokens"]
    with torch.no_grad():
        batch = tiny_model(input_ids=ids)
        for row in range(ids.shape[0]):
            length = int(ids[row].ne(1).sum())
            alone = tiny_model(input_ids=ids[row : row + 1, :length])
            assert max_error(alone.text_embeds[0], batch.text_embeds[row]) <= 1e-5
            assert max_error(alone.text_last_hidden_state[0], batch.text_last_hidden_state[row, : length + 1]) <= 1e-5


def test_left_padded_text_equals_right_padded_text(tiny_model, expected):
    # A tokenizer set to padding_side="left" puts the pads first; each text must still embed as it does alone.
    ids = expected["inputs.src_tokens"]
    real = ids.ne(1)
    assert not real.all(), "the reference batch should hold padding"
    order = torch.argsort(real.int(), dim=1, stable=True)  # pads first, tokens in their order
    left_ids = ids.gather(1, order)
    with torch.no_grad():
        right = tiny_model(input_ids=ids, attention_mask=real.long())
        left = tiny_model(input_ids=left_ids, attention_mask=left_ids.ne(1).long())
    assert max_error(left.text_embeds, right.text_embeds) <= 1e-5
    for row in range(ids.shape[0]):
        length = int(real[row].sum())
        left_row, right_row = left.text_last_hidden_state[row, -length:], right.text_last_hidden_state[row]
        assert max_error(left_row, right_row[1 : length + 1]) <= 1e-5


def test_image_alone_equals_image_in_batch(tiny_model, expected):
    images = expected["inputs.src_images"]
    with torch.no_grad():
        batch = tiny_model(pixel_values=images)
        for row in range(images.shape[0]):
            alone = tiny_model(pixel_values=images[row : row + 1])
            assert max_error(alone.image_last_hidden_state[0], batch.image_last_hidden_state[row]) <= 1e-5


def test_attention_mask_and_pad_id_agree(tiny_model, expected):
    ids = expected["inputs.src_tokens"]
    with torch.no_grad():
        by_pad = tiny_model.get_text_features(ids)
        by_mask = tiny_model.get_text_features(ids, attention_mask=ids.ne(1).long())
    assert torch.equal(by_pad, by_mask)


def test_hidden_states_and_attentions(tiny_state, expected):
    model = build_model(*tiny_state, "eager")
    with torch.no_grad():
        out = model(input_ids=expected["inputs.src_tokens"], output_hidden_states=True, output_attentions=True)
        fused = model(
            input_ids=expected["vl.src_tokens"], pixel_values=expected["inputs.src_images"], fusion=True,
            output_hidden_states=True, output_attentions=True,
        )
    assert len(out.text_hidden_states) == 3 and out.text_hidden_states[0].shape == (4, 11, 64)
    assert len(out.text_attentions) == 2 and out.text_attentions[0].shape == (4, 4, 11, 11)
    # Padding enters through the bias: padded keys get zero probability.
    assert out.text_attentions[0][0, :, :, 3:].abs().max() == 0
    torch.testing.assert_close(out.text_attentions[1].sum(-1), torch.ones(4, 4, 11))
    assert fused.fusion_hidden_states[-1].shape == (2, 3 + 257, 64)
    assert fused.fusion_attentions[0].shape == (2, 4, 260, 260)
    assert fused.text_embeds is None and out.image_embeds is None


@pytest.mark.parametrize("implementation", ["sdpa", "onepeace_flex"])
def test_attentions_are_returned_with_every_implementation(tiny_state, expected, implementation):
    """SDPA and the fused kernels compute no probabilities: such calls run eager, and say so."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    eager, other = build_model(*tiny_state, "eager"), build_model(*tiny_state, implementation)
    inputs = {"input_ids": expected["inputs.src_tokens"], "pixel_values": expected["inputs.src_images"]}
    logger = transformers_logging.get_logger("onepeace_hf.modeling_onepeace")
    transformers_logging.warning_once.cache_clear()  # another test may have given it already in this process
    with torch.no_grad(), CaptureLogger(logger) as log:
        reference = eager(**inputs, output_attentions=True)
        out = other(**inputs, output_attentions=True)
    assert f"attention runs eager for such calls, as '{implementation}' returns no attention weights" in log.out
    for name in ("text_attentions", "image_attentions"):
        assert len(getattr(out, name)) == 2
        for got, want in zip(getattr(out, name), getattr(reference, name)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(out.image_embeds, reference.image_embeds, rtol=0, atol=0)
    assert other.config._attn_implementation == implementation  # only those calls change


def test_tuple_output(tiny_model, expected):
    with torch.no_grad():
        out = tiny_model(input_ids=expected["inputs.src_tokens"], return_dict=False)
        as_dict = tiny_model(input_ids=expected["inputs.src_tokens"])
    assert isinstance(out, tuple)
    assert torch.equal(out[0], as_dict.text_embeds)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_state, expected, sample_padding_mask):
    grads = []
    for checkpointing in (False, True):
        model = build_model(*tiny_state).train()
        model.config.drop_path_rate = 0.0
        for layer in model.encoder.layers:
            layer.drop_path.drop_prob = 0.0
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no deprecation warning from the transformers installed
                enable_activation_checkpointing(model)
        out = model(input_ids=expected["al.src_tokens"], input_values=expected["inputs.src_audios"],
                    padding_mask=sample_padding_mask, fusion=True)
        out.audio_last_hidden_state[:, 0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert max_error(grads[0][name], grads[1][name]) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference_has_no_nans(tiny_state, expected, sample_padding_mask, dtype):
    model = build_model(*tiny_state).to(dtype)
    with torch.no_grad():
        out = model(
            input_ids=expected["inputs.src_tokens"], pixel_values=expected["inputs.src_images"],
            input_values=expected["inputs.src_audios"], padding_mask=sample_padding_mask,
        )
    for name in ("text_embeds", "image_embeds", "audio_embeds"):
        value = getattr(out, name)
        assert value.dtype == dtype and torch.isfinite(value).all()
        assert max_error(value, expected[name.replace("_embeds", ".embedding")]) < 0.1


@pytest.mark.slow
def test_torch_compile_matches_eager_mode(tiny_model, expected):
    compiled = torch.compile(tiny_model, fullgraph=True)
    with torch.no_grad():
        out = compiled(pixel_values=expected["inputs.src_images"], input_ids=expected["inputs.src_tokens"])
    assert max_error(out.image_embeds, expected["image.embedding"]) <= 1e-5
    assert max_error(out.text_embeds, expected["text.embedding"]) <= 1e-5


def test_a_traced_model_still_masks_padding(tiny_model, expected):
    """torch.jit.trace records one path: traced on an unpadded batch, it must not keep "no padding" for later ones."""
    import warnings

    class TextFeatures(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids, attention_mask)

    padded = expected["inputs.src_tokens"]  # rows of different lengths, padded with 1
    unpadded = padded[:, : int(padded.ne(1).sum(-1).min())].clone()
    unpadded[:, -1] = 2
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values
        traced = torch.jit.trace(TextFeatures(tiny_model), (unpadded, torch.ones_like(unpadded)))
        got = traced(padded, padded.ne(1).long())
        torch.testing.assert_close(got, tiny_model.get_text_features(padded, padded.ne(1).long()), rtol=0, atol=1e-6)


def test_other_image_sizes_interpolate_positions(tiny_model, expected):
    images = torch.nn.functional.interpolate(expected["inputs.src_images"], size=(128, 128), mode="bilinear")
    with torch.no_grad():
        out = tiny_model(pixel_values=images)
        positions = tiny_model.adapters["image"].position_embeddings(8)
    assert out.image_last_hidden_state.shape == (2, 65, 64) and torch.isfinite(out.image_embeds).all()
    assert positions.shape == (65, 64)
    assert torch.equal(positions[0], tiny_model.adapters["image"].pos_embed[0])


def test_options_beyond_the_reference_run(expected):
    config = small_config(rel_pos_table_per_layer=True, scale_heads=True, scale_attn=True, image_stem="conv",
                          audio_pos_type="fixed", audio_conv_pos_pre_ln=True, modalities=["text", "image", "audio"])
    model = OnePeaceModel(config).eval()
    assert len(model.adapters["image"].rel_pos.tables) == 2
    ids = torch.tensor([[5, 6, 7, 2], [8, 2, 1, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 64, 64), input_values=torch.randn(2, 16000),
                    padding_mask=torch.ones(2, 16000, dtype=torch.long))
        fused = model(input_ids=ids, input_values=torch.randn(2, 16000), fusion=True)
    assert out.logits_per_image.shape == (2, 2) and out.logits_per_audio.shape == (2, 2)
    assert fused.audio_last_hidden_state.shape == (2, 50, 32)


def test_single_modality_model_has_only_that_branch():
    model = OnePeaceModel(small_config(modalities=["image"]))
    assert list(model.adapters) == ["image"] and list(model.projections) == ["image"]
    assert not any("text" in name or "audio" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="no text branch"):
        model(input_ids=torch.tensor([[5, 2]]))


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(pixel_values=torch.randn(1, 3, 250, 250)), "multiple of 16"),
        (dict(pixel_values=torch.randn(1, 3, 256, 128)), "square"),
        (dict(input_ids=torch.full((1, 600), 5)), "too long"),
        (dict(input_values=torch.randn(1, 8000)), "outside the supported"),
        (dict(input_values=torch.randn(1, 240001)), "outside the supported"),
        (dict(input_ids=torch.tensor([[5, 2]]), fusion=True), "text\\+image or text\\+audio"),
        (dict(input_ids=torch.tensor([[5, 2], [6, 2]]), pixel_values=torch.randn(1, 3, 256, 256), fusion=True),
         "batch sizes must match; got \\{'text': 2, 'image': 1\\}"),
        (dict(input_ids=torch.tensor([5, 6, 2])), "input_ids must be \\(batch, tokens\\)"),
        (dict(input_ids=torch.randn(1, 3, 32, 32)), "input_ids must be \\(batch, tokens\\)"),  # pixels given as text
        # fairseq's convention (True = padding) given where 1 means a real sample: every sample would be padding.
        (dict(input_values=torch.randn(2, 16000), padding_mask=torch.zeros(2, 16000, dtype=torch.bool)),
         "no real samples"),
        (dict(), "at least one"),
        # transformers' audio models call their mask attention_mask; here it would be dropped without a word.
        (dict(input_values=torch.randn(2, 16000), attention_mask=torch.ones(2, 16000, dtype=torch.long)),
         "the audio mask is padding_mask"),
        (dict(input_ids=torch.tensor([[5, 2]]), padding_mask=torch.ones(1, 16000, dtype=torch.long)),
         "padding_mask masks input_values"),
        (dict(input_ids=torch.tensor([[5, 6, 2]]), attention_mask=torch.ones(1, 2, dtype=torch.long)),
         "input_ids and attention_mask must have the same shape, got \\(1, 3\\) and \\(1, 2\\)"),
        (dict(input_values=torch.randn(2, 16000), padding_mask=torch.ones(2, 15000, dtype=torch.long)),
         "input_values and padding_mask must have the same shape"),
        (dict(input_ids=torch.ones(0, 3, dtype=torch.long)), "input_ids is an empty batch"),
        (dict(pixel_values=torch.randn(0, 3, 256, 256)), "pixel_values is an empty batch"),
    ],
)
def test_clear_errors_for_bad_input(tiny_model, inputs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**inputs)


def test_the_vision_model_says_which_class_loads_a_full_model_folder(tiny_model, tmp_path):
    from onepeace_hf import OnePeaceVisionModel

    tiny_model.save_pretrained(tmp_path)
    # huggingface_hub's strict dataclasses wrap the ValueError in an error of their own.
    with pytest.raises(Exception, match="only the image modality, got \\['text', 'image', 'audio'\\]: a folder "
                                         "of the full model loads with OnePeaceModel"):
        OnePeaceVisionModel.from_pretrained(tmp_path)


def test_extra_arguments_that_the_attention_sets_itself_are_refused(tiny_model):
    """Extra keyword arguments go on to the attention function: these names clashed there with a TypeError
    about its own signature."""
    from onepeace_hf import OnePeaceForAudioClassification

    classifier = OnePeaceForAudioClassification(tiny_model.config).eval()
    mask = torch.ones(1, 16000, dtype=torch.long)
    with pytest.raises(TypeError, match=r"attention_mask \(the audio mask is padding_mask\)"):
        classifier(input_values=torch.randn(1, 16000), attention_mask=mask)
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) scaling"):
        tiny_model(input_ids=torch.tensor([[5, 2]]), scaling=1.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=65), "divisible by num_attention_heads"),
        (dict(modalities=[]), "at least one"),
        (dict(modalities=["text", "video"]), "distinct names"),
        (dict(image_size=250), "multiple of 16"),
        (dict(audio_conv_spec=[[512, 10]]), "channels, kernel, stride"),
        (dict(audio_conv_spec=[]), "channels, kernel, stride"),
        (dict(image_stem="vit"), "image_stem"),
        (dict(num_attention_heads=0), "num_attention_heads=0: sizes must be positive integers"),
        (dict(hidden_size=-64, num_hidden_layers=-1), "hidden_size=-64, num_hidden_layers=-1"),
        (dict(text_max_position_embeddings=1), "text_max_position_embeddings=1"),
        (dict(attention_dropout=-0.5), "attention_dropout=-0.5: dropout rates must be in \\[0, 1\\)"),
        (dict(drop_path_rate=1.0), "drop_path_rate=1.0"),
        (dict(audio_min_samples=300000), "audio_min_samples \\(300000\\) must be positive and at most"),
    ],
)
def test_config_refuses_impossible_combinations(overrides, message):
    with pytest.raises(Exception, match=message):
        OnePeaceConfig(**overrides)


def test_config_refuses_audio_longer_than_its_position_tables():
    """A 20-samples-per-frame stem: 15 s gives (240000 - 10) // 5 + 1 = 47999, then (47999 - 8) // 4 + 1 = 11998
    frames, 11999 positions with CLS. The bound the error names must be the real one: a model at exactly that length
    runs, one sample more is refused."""
    settings = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    modalities=["audio"], audio_conv_spec=[[8, 10, 5], [8, 8, 4]], audio_conv_pos_groups=2)
    with pytest.raises(Exception, match=r"gives 11999 audio positions .* more than max_relative_positions \(1024\)"):
        OnePeaceConfig(**settings)
    with pytest.raises(Exception, match="audio_max_position_embeddings"):
        OnePeaceConfig(**settings, audio_use_rel_bias=False, audio_pos_type="fixed", audio_max_samples=20000,
                       audio_max_position_embeddings=512)
    longest = int(re.search(r"at most (\d+)", str(pytest.raises(Exception, OnePeaceConfig, **settings).value))[1])
    with pytest.raises(Exception, match="at most"):
        OnePeaceConfig(**settings, audio_max_samples=longest + 1)
    model = OnePeaceModel(OnePeaceConfig(**settings, audio_max_samples=longest)).eval()
    with torch.no_grad():
        output = model(input_values=torch.randn(1, longest), output_hidden_states=True)
    assert output.audio_hidden_states[-1].shape[1] == 1024  # CLS and 1023 frames: every relative position used


def test_config_round_trip_and_defaults(tmp_path):
    default = OnePeaceConfig()
    assert (default.hidden_size, default.intermediate_size, default.num_hidden_layers) == (1536, 6144, 40)
    assert default.audio_conv_spec == [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    config = small_config(modalities=["text", "audio"])
    config.save_pretrained(tmp_path)
    reloaded = OnePeaceConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()


def test_device_map_auto_loads_whole_layers(tiny_model, expected, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    model = OnePeaceModel.from_pretrained(tmp_path, device_map="auto").eval()
    with torch.no_grad():
        embeds = model(pixel_values=expected["inputs.src_images"]).image_embeds
    assert max_error(embeds, expected["image.embedding"]) <= 1e-5


@pytest.mark.parametrize("weight, clamped", [(math.log(100) + 0.5, math.log(100)), (-0.5, 0.0)])
def test_logit_scale_gradient_does_not_vanish_beyond_its_bounds(weight, clamped):
    """The original clamps the weight itself to [0, ln 100] before taking exp, so d exp / d weight = exp(clamped)."""
    model = OnePeaceModel(small_config())
    with torch.no_grad():
        model.logit_scale.fill_(weight)
    scale = model.clamped_logit_scale()
    scale.backward()
    assert scale.item() == pytest.approx(math.exp(clamped))
    assert model.logit_scale.grad.item() == pytest.approx(math.exp(clamped))
