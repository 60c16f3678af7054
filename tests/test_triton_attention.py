"""Our Triton kernel (`onepeace_triton`) against eager attention with the dense bias (the original's arithmetic).

Without a GPU the kernels run on CPU tensors through Triton's interpreter (`TRITON_INTERPRET=1`), which executes the
same kernel code with NumPy: this checks the arithmetic, indexing and masking, not speed. The GPU cases (bf16 too) are
in test_flex_attention.py, next to FlexAttention's.
"""

import importlib.util
import os

import pytest
import torch

from onepeace_hf.attention import eager_attention_forward
from onepeace_hf.triton_attention import TRITON_ATTENTION, onepeace_triton_attention_forward

from .test_flex_attention import _Attention, _inputs, _model_pair, _output_and_gradients, _random_call


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (the `test` extra)")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the kernel's calls, so that a test passing through the SDPA fallback fails. On CPU the kernels need
    Triton's interpreter, which conftest.py switches on before Triton is imported."""
    assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    from onepeace_hf.triton_kernels import BucketBiasAttention

    calls, apply = [], BucketBiasAttention.apply
    monkeypatch.setattr(BucketBiasAttention, "apply", lambda *args: calls.append(1) or apply(*args))
    yield calls
    assert calls, "the Triton kernel never ran"


@pytest.mark.parametrize("buckets_per_sample", [False, True], ids=["shared_buckets", "per_sample_buckets"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_kernel_output_and_gradients_match_eager(kernel_calls, buckets_per_sample, padded):
    q, k, v, bias = _random_call(length=37, buckets_per_sample=buckets_per_sample, padded=padded, device=DEVICE)
    fused = _output_and_gradients(onepeace_triton_attention_forward, q, k, v, bias, torch.float32, dense=False)
    eager = _output_and_gradients(eager_attention_forward, q, k, v, bias, torch.float32, dense=True)
    for name, actual, expected in zip(("out", "dq", "dk", "dv", "dtable"), fused, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)
    assert fused[-1].abs().sum() > 0  # the table does get a gradient


@pytest.mark.parametrize("buckets_per_sample", [False, True], ids=["shared_buckets", "per_sample_buckets"])
def test_a_batch_of_one_gets_the_gradients_of_eager(kernel_calls, buckets_per_sample):
    # One sample: views of its (1, heads, L) per-row tensors keep non-contiguous strides that a reshape copies for more.
    q, k, v, bias = _random_call(batch=1, length=37, buckets_per_sample=buckets_per_sample, padded=False, device=DEVICE)
    fused = _output_and_gradients(onepeace_triton_attention_forward, q, k, v, bias, torch.float32, dense=False)
    eager = _output_and_gradients(eager_attention_forward, q, k, v, bias, torch.float32, dense=True)
    for name, actual, expected in zip(("out", "dq", "dk", "dv", "dtable"), fused, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_bias_reaches_the_kernel(kernel_calls):
    q, k, v, bias = _random_call(device=DEVICE)
    module, scaling = _Attention().eval(), q.shape[-1] ** -0.5
    with torch.no_grad():
        biased, _ = onepeace_triton_attention_forward(module, q, k, v, bias, scaling)
        unbiased, _ = onepeace_triton_attention_forward(module, q, k, v, bias._replace(table=bias.table * 0), scaling)
        without_padding = bias._replace(padding_mask=torch.zeros_like(bias.padding_mask))
        unpadded, _ = onepeace_triton_attention_forward(module, q, k, v, without_padding, scaling)
    assert (biased - unbiased).abs().max() > 1e-2
    assert (biased[1] - unpadded[1]).abs().max() > 1e-2  # padded keys were hidden
    torch.testing.assert_close(biased[0], unpadded[0], rtol=0, atol=1e-6)  # the unpadded sample is unchanged


@pytest.mark.slow
def test_model_matches_eager_in_outputs_and_gradients(kernel_calls):
    """The whole model on text and images (audio's shortest clip is too long for the interpreter; it runs the same
    code): outputs and every gradient, relative-position tables included, equal eager's; so do the joint encoding
    (padding inside the sequence, no bias between modalities) and, with fused projections (q, k and v strided slices
    of one tensor), the outputs."""
    eager, fused = _model_pair(TRITON_ATTENTION)
    assert fused.config._attn_implementation == TRITON_ATTENTION
    inputs = {name: _inputs()[name].to(DEVICE) for name in ("input_ids", "attention_mask", "pixel_values")}
    outputs = []
    for model in (eager.to(DEVICE), fused.to(DEVICE)):
        out = model(**inputs)
        (out.image_embeds.square().sum() + out.text_embeds.pow(3).sum()).backward()
        outputs.append(out)
    fused_grads = dict(fused.named_parameters())
    for name, parameter in eager.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(fused_grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    for modality in ("image", "text"):
        assert fused.adapters[modality].rel_pos.tables[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        outputs.append(fused.fuse_projections()(**inputs))
        joint = [model(**inputs, fusion=True) for model in (eager, fused)]
    expected, *actual = outputs
    for out in actual:
        for name in ("text_embeds", "image_embeds", "logits_per_image"):
            torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=0, atol=1e-5, msg=name)
    for name in ("text_last_hidden_state", "image_last_hidden_state"):
        torch.testing.assert_close(joint[1][name], joint[0][name], rtol=0, atol=1e-5, msg=name)


def test_without_gpu_or_interpreter_it_is_sdpa_with_the_dense_bias(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, bias = _random_call()
    module, scaling = _Attention().eval(), q.shape[-1] ** -0.5
    with torch.no_grad():
        actual, _ = onepeace_triton_attention_forward(module, q, k, v, bias, scaling)
        expected, _ = eager_attention_forward(module, q, k, v, bias.materialize(q.dtype), scaling)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA's grid limits)")
def test_more_batch_times_heads_than_a_grid_axis_of_65535_on_gpu(kernel_calls):
    """(batch x heads) programs go on the grid axis that holds 2**31 - 1 of them: 8200 x 8 of them here."""
    q, k, v, bias = _random_call(batch=8200, heads=8, length=16, head_dim=16, device=DEVICE)
    fused = _output_and_gradients(onepeace_triton_attention_forward, q, k, v, bias, torch.float32, dense=False)
    eager = _output_and_gradients(eager_attention_forward, q, k, v, bias, torch.float32, dense=True)
    for name, actual, expected in zip(("out", "dq", "dk", "dv", "dtable"), fused, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels under torch.compile)")
def test_compiled_model_with_triton_kernel_matches_eager_on_gpu():
    eager, fused = _model_pair(TRITON_ATTENTION)
    inputs = {name: value.cuda() for name, value in _inputs().items()}
    compiled = torch.compile(fused.cuda(), fullgraph=True)
    with torch.no_grad():
        expected, actual = eager.cuda()(**inputs), compiled(**inputs)
    for name in ("text_embeds", "image_embeds", "audio_embeds"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=0, atol=1e-5, msg=name)
