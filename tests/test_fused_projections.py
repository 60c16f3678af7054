"""Fused Q/K/V and GeGLU projections: same outputs and gradients, same checkpoint format."""

import pytest
import torch

from onepeace_hf import OnePeaceModel
from onepeace_hf.fused_projections import FusedLinear

from .conftest import tiny_random_config


def _model():
    torch.manual_seed(0)
    return OnePeaceModel(tiny_random_config(drop_path_rate=0.0)).eval()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(
        input_ids=torch.randint(4, 100, (2, 7), generator=generator),
        pixel_values=torch.randn(2, 3, 32, 32, generator=generator),
        input_values=torch.randn(2, 16000, generator=generator),
    )


def test_fused_model_matches_separate_projections():
    model, fused = _model(), _model()
    config = model.config
    assert fused.fuse_projections() is fused
    attention = fused.encoder.layers[0].self_attn
    assert isinstance(attention.qkv_proj, FusedLinear) and not hasattr(attention, "q_proj")
    num_fused = sum(isinstance(m, FusedLinear) for m in fused.modules())
    assert num_fused == config.num_hidden_layers * (1 + len(config.modalities))
    with torch.no_grad():
        expected, actual = model(**_inputs()), fused(**_inputs())
    for name in ("text_last_hidden_state", "image_last_hidden_state", "audio_last_hidden_state"):
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5)


def test_checkpoint_format_is_unchanged(tmp_path):
    model = _model()
    reference = model.state_dict()
    fused = _model().fuse_projections()
    state = fused.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    assert "encoder.layers.0.self_attn.k_proj.bias" not in state  # the key projection stays bias-free

    fused.save_pretrained(tmp_path)
    reloaded = OnePeaceModel.from_pretrained(tmp_path).eval()
    assert reloaded.encoder.layers[0].self_attn.qkv_proj is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_inputs()).image_embeds, model(**_inputs()).image_embeds)

    # and an ordinary (separate) state dict loads into a fused model
    other = OnePeaceModel(tiny_random_config(drop_path_rate=0.0)).fuse_projections()
    other.load_state_dict(reference)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in reference.items())


# float32 weight gradients sum over every token; one fused GEMM blocks that sum differently from three small ones.
GRAD_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def test_gradients_match_and_key_projection_gets_no_bias():
    model, fused = _model().train(), _model().train().fuse_projections()
    for m in (model, fused):
        out = m(pixel_values=_inputs()["pixel_values"], input_values=_inputs()["input_values"])
        (out.image_embeds.square().sum() + out.audio_embeds.sum()).backward()
    attention, fused_attention = model.encoder.layers[1].self_attn, fused.encoder.layers[1].self_attn
    q_grad, k_grad, v_grad = fused_attention.qkv_proj.weight.grad.chunk(3)
    torch.testing.assert_close(q_grad, attention.q_proj.weight.grad, **GRAD_TOLERANCE)
    torch.testing.assert_close(k_grad, attention.k_proj.weight.grad, **GRAD_TOLERANCE)
    torch.testing.assert_close(v_grad, attention.v_proj.weight.grad, **GRAD_TOLERANCE)
    assert len(fused_attention.qkv_proj.biases) == 2  # q and v; k has none to learn
    ffn, fused_ffn = model.encoder.layers[0].ffn["audio"], fused.encoder.layers[0].ffn["audio"]
    gate_grad, up_grad = fused_ffn.gate_up_proj.weight.grad.chunk(2)
    torch.testing.assert_close(gate_grad, ffn.gate_proj.weight.grad, **GRAD_TOLERANCE)
    torch.testing.assert_close(up_grad, ffn.up_proj.weight.grad, **GRAD_TOLERANCE)


def test_unfuse_restores_the_separate_modules():
    model = _model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    model.unfuse_projections()
    assert not any(isinstance(m, FusedLinear) for m in model.modules())
    assert type(model.encoder.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert model.encoder.layers[0].self_attn.k_proj.bias is None
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], v) for k, v in reference.items())


def test_refuses_to_fuse_adapted_projections():
    class Adapted(torch.nn.Linear):
        pass

    model = _model()
    attention = model.encoder.layers[0].self_attn
    adapted = Adapted(attention.q_proj.in_features, attention.q_proj.out_features)
    attention.q_proj = adapted
    with pytest.raises(ValueError, match="not plain nn.Linear"):
        model.fuse_projections()
