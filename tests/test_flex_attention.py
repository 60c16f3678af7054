"""The fused `onepeace_flex` attention against eager attention with the dense bias (the original's arithmetic).

The GPU tests cover both fused kernels: FlexAttention and our own Triton kernel (`onepeace_triton`)."""

import pytest
import torch

from onepeace_hf import OnePeaceModel
from onepeace_hf.attention import RelativeBias, eager_attention_forward
from onepeace_hf.flex_attention import FUSED_ATTENTION, onepeace_flex_attention_forward, padding_block_mask
from onepeace_hf.triton_attention import TRITON_ATTENTION, onepeace_triton_attention_forward

from .conftest import tiny_random_config


class _Attention(torch.nn.Module):
    is_causal = False


def _random_call(batch=2, heads=4, length=21, head_dim=8, buckets_per_sample=False, padded=True, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(3))
    table = torch.randn(12, heads, generator=generator)
    shape = (batch, length, length) if buckets_per_sample else (length, length)
    buckets = torch.randint(0, 12, shape, generator=generator)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    if padded:
        padding[1, length - 6 :] = True
    q, k, v, table, buckets, padding = (t.to(device) for t in (q, k, v, table, buckets, padding))
    return q, k, v, RelativeBias(table, buckets, padding, padding_block_mask(padding))


@pytest.fixture
def flex_calls(monkeypatch):
    """Shapes of the queries that reached the compiled FlexAttention kernel: a CPU test must not pass on the dense
    fallback alone."""
    import onepeace_hf.flex_attention as flex_module

    calls, kernel = [], flex_module._compiled_flex_attention()

    def counted(query, *args, **kwargs):
        calls.append(tuple(query.shape))
        return kernel(query, *args, **kwargs)

    monkeypatch.setattr(flex_module, "_compiled_flex_attention", lambda: counted)
    return calls


@pytest.mark.parametrize("buckets_per_sample", [False, True], ids=["shared_buckets", "per_sample_buckets"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_fused_forward_matches_eager_dense_bias(buckets_per_sample, padded, flex_calls):
    q, k, v, bias = _random_call(head_dim=32, buckets_per_sample=buckets_per_sample, padded=padded)
    scaling = q.shape[-1] ** -0.5
    module = _Attention().eval()
    with torch.no_grad():
        fused, _ = onepeace_flex_attention_forward(module, q, k, v, bias, scaling)
        eager, _ = eager_attention_forward(module, q, k, v, bias.materialize(q.dtype), scaling)
        # The bias does reach the kernel: a zero table gives a clearly different result.
        unbiased, _ = onepeace_flex_attention_forward(module, q, k, v, bias._replace(table=bias.table * 0), scaling)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
    assert (unbiased - eager).abs().max() > 1e-2
    assert len(flex_calls) == 2


@pytest.mark.parametrize("length", [8, 24])
def test_cpu_small_heads_take_the_dense_path_where_the_compiled_kernel_is_wrong(length, flex_calls):
    """torch 2.13's compiled CPU FlexAttention returns wrong values or NaN for 16-dim heads (the shipped model's) at
    key lengths of 8 mod 16; such heads take the dense path, and 32-dim heads, which it gets right, keep the kernel."""
    module = _Attention().eval()
    for head_dim in (16, 32):
        q, k, v, bias = _random_call(length=length, head_dim=head_dim)
        with torch.no_grad():
            fused, _ = onepeace_flex_attention_forward(module, q, k, v, bias, head_dim**-0.5)
            eager, _ = eager_attention_forward(module, q, k, v, bias.materialize(q.dtype), head_dim**-0.5)
        torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
    assert flex_calls == [(2, 4, length, 32)]


def test_dense_bias_is_shared_by_an_unpadded_batch_and_hides_padded_keys():
    _, _, _, unpadded = _random_call(padded=False)
    shared = unpadded.materialize(torch.float32)
    assert shared.shape == (1, 4, 21, 21)  # broadcast over the batch, not copied into it
    assert shared[0, 2, 3, 5] == unpadded.table[unpadded.buckets[3, 5], 2]

    _, _, _, padded = _random_call(padded=True)
    dense = padded.materialize(torch.float32)
    assert dense.shape == (2, 4, 21, 21)
    assert torch.isneginf(dense[1, :, :, -6:]).all()
    assert torch.isfinite(dense[0]).all() and torch.isfinite(dense[1, :, :, :-6]).all()


def test_padding_block_mask_is_none_without_padding():
    assert padding_block_mask(torch.zeros(2, 5, dtype=torch.bool)) is None


def _model_pair(implementation=FUSED_ATTENTION, **config_overrides):
    # Layer scale off so that attention visibly moves the outputs of a random model.
    torch.manual_seed(0)
    config = tiny_random_config(drop_path_rate=0.0, **config_overrides)
    eager = OnePeaceModel._from_config(config, attn_implementation="eager").eval()
    fused = OnePeaceModel._from_config(config, attn_implementation=implementation).eval()
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _inputs():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, 100, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = 1
    waveforms = torch.randn(2, 16000, generator=generator)
    padding_mask = torch.ones(2, 16000, dtype=torch.long)
    padding_mask[1, 9000:] = 0
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(2, 3, 32, 32, generator=generator),
        input_values=waveforms, padding_mask=padding_mask,
    )


@pytest.mark.slow
def test_selected_by_attn_implementation_and_matches_eager_model(flex_calls):
    eager, fused = _model_pair(hidden_size=64, intermediate_size=128)  # 32-dim heads: the CPU kernel runs
    assert fused.config._attn_implementation == FUSED_ATTENTION
    inputs = _inputs()
    with torch.no_grad():
        expected, actual = eager(**inputs), fused(**inputs)
        expected_joint = eager(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               pixel_values=inputs["pixel_values"], fusion=True)
        actual_joint = fused(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs["pixel_values"], fusion=True)
    for name in ("text_last_hidden_state", "image_last_hidden_state", "audio_last_hidden_state", "logits_per_image"):
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5)
    for name in ("text_last_hidden_state", "image_last_hidden_state"):
        torch.testing.assert_close(actual_joint[name], expected_joint[name], rtol=0, atol=1e-5)
    assert flex_calls  # the relative-bias layers ran in the kernel


def test_cpu_training_falls_back_to_dense_bias_with_equal_gradients():
    """FlexAttention has no CPU backward: with gradients on, the fused implementation must give eager's gradients,
    bias tables included."""
    eager, fused = _model_pair()
    inputs = _inputs()
    for model in (eager, fused):
        model.zero_grad()
        out = model(pixel_values=inputs["pixel_values"], input_values=inputs["input_values"],
                    padding_mask=inputs["padding_mask"])
        (out.image_embeds.square().sum() + out.audio_embeds.sum()).backward()
    fused_grads = dict(fused.named_parameters())
    for name, parameter in eager.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(fused_grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert eager.adapters["image"].rel_pos.tables[0].weight.grad.abs().sum() > 0


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (FlexAttention backward, compiled Triton)"
)


def _output_and_gradients(fn, q, k, v, bias, dtype, dense):
    """Output and the gradients of q, k, v and the bias table for one attention call in `dtype`."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    table = bias.table.detach().clone().requires_grad_()
    call_bias = bias._replace(table=table)
    attention_mask = call_bias.materialize(dtype) if dense else call_bias
    out, _ = fn(_Attention().train(), *leaves, attention_mask, q.shape[-1] ** -0.5)
    grad_out = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(2), device=out.device)
    out.backward(grad_out.to(dtype))
    return [out, *(t.grad for t in leaves), table.grad]


GPU_CASES = [(True, False), (False, False), (True, True)]  # (padded, buckets_per_sample)
KERNELS = pytest.mark.parametrize(
    "fused_attention", [onepeace_flex_attention_forward, onepeace_triton_attention_forward], ids=["flex", "triton"]
)


@needs_cuda
@KERNELS
@pytest.mark.parametrize("padded,buckets_per_sample", GPU_CASES, ids=["padded", "unpadded", "per_sample_buckets"])
def test_fused_gradients_match_eager_on_gpu_float32(fused_attention, padded, buckets_per_sample):
    q, k, v, bias = _random_call(batch=2, heads=4, length=257, head_dim=64, padded=padded,
                                 buckets_per_sample=buckets_per_sample, device="cuda")
    fused = _output_and_gradients(fused_attention, q, k, v, bias, torch.float32, dense=False)
    eager = _output_and_gradients(eager_attention_forward, q, k, v, bias, torch.float32, dense=True)
    for name, actual, expected in zip(("out", "dq", "dk", "dv", "dtable"), fused, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


@needs_cuda
@KERNELS
@pytest.mark.parametrize("padded,buckets_per_sample", GPU_CASES, ids=["padded", "unpadded", "per_sample_buckets"])
def test_fused_bfloat16_is_as_accurate_as_eager_bfloat16_on_gpu(fused_attention, padded, buckets_per_sample):
    """bf16 tolerance, measured rather than guessed: against an fp32 reference from the same (bf16-rounded) inputs,
    the fused kernel's error must stay within twice the error of eager attention run in bf16."""
    q, k, v, bias = _random_call(batch=2, heads=4, length=257, head_dim=64, padded=padded,
                                 buckets_per_sample=buckets_per_sample, device="cuda")
    q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
    bias = bias._replace(table=bias.table.to(torch.bfloat16).float())
    reference = _output_and_gradients(eager_attention_forward, q, k, v, bias, torch.float32, dense=True)
    fused = _output_and_gradients(fused_attention, q, k, v, bias, torch.bfloat16, dense=False)
    eager = _output_and_gradients(eager_attention_forward, q, k, v, bias, torch.bfloat16, dense=True)
    for name, actual, low, expected in zip(("out", "dq", "dk", "dv", "dtable"), fused, eager, reference):
        fused_error = (actual.float() - expected).abs().max().item()
        eager_error = (low.float() - expected).abs().max().item()
        assert fused_error <= 2 * eager_error + 1e-3 * expected.abs().max().item(), (name, fused_error, eager_error)


@needs_cuda
@pytest.mark.parametrize("implementation", [FUSED_ATTENTION, TRITON_ATTENTION])
def test_fused_model_trains_like_eager_on_gpu(implementation):
    """The whole model on GPU: the fused paths (compiled FlexAttention with block masks, or the Triton kernel) give
    eager's gradients."""
    eager, fused = _model_pair(implementation)
    inputs = {name: value.cuda() for name, value in _inputs().items()}
    for model in (eager, fused):
        model.cuda()
        out = model(pixel_values=inputs["pixel_values"], input_values=inputs["input_values"],
                    padding_mask=inputs["padding_mask"], input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"])
        (out.image_embeds.square().sum() + out.audio_embeds.sum() + out.text_embeds.pow(3).sum()).backward()
    fused_grads = dict(fused.named_parameters())
    for name, parameter in eager.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(fused_grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fused.adapters["image"].rel_pos.tables[0].weight.grad.abs().sum() > 0


def test_padding_block_mask_equals_flex_attentions_own_construction():
    from torch.nn.attention.flex_attention import create_block_mask

    padding = torch.zeros(4, 300, dtype=torch.bool)
    padding[0, 260:] = True  # a partial last block
    padding[1, 100:] = True  # two fully padded blocks
    padding[2, 5:20] = True  # padding in the middle (text inside a joint sequence)
    keep = ~padding
    expected = create_block_mask(lambda b, h, q, k: keep[b, k], 4, None, 300, 300, device="cpu")
    actual = padding_block_mask(padding)
    for count_name, index_name in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        counts, expected_counts = getattr(actual, count_name), getattr(expected, count_name)
        assert torch.equal(counts, expected_counts), count_name
        indices, expected_indices = getattr(actual, index_name), getattr(expected, index_name)
        for b in range(4):
            n = int(counts[b, 0, 0])
            for q_block in range(indices.shape[2]):
                listed = indices[b, 0, q_block, :n].tolist()
                assert sorted(listed) == sorted(expected_indices[b, 0, q_block, :n].tolist())
