"""`attn_implementation="onepeace_flex"`: attention that reads the relative-position bias inside the kernel.

The original adds a dense (batch, heads, L, L) bias in every layer, which rules out fused kernels and costs memory
that grows with L². Here FlexAttention adds `table[buckets[q, k], head]` as a score modification and skips padded
keys through a block mask, so no L x L bias tensor is ever built. Where FlexAttention cannot run the call (attention
dropout; on CPU: backward, or inside an outer `torch.compile`), the same `RelativeBias` is made dense and handed to
SDPA, so selecting this implementation never changes results, only speed.
"""

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .attention import RelativeBias, capturing_graph, sdpa_with_dense_bias


FUSED_ATTENTION = "onepeace_flex"
MIN_CPU_HEAD_DIM = 32  # wrong at 8 and 16; right at 24, 32 and 64 for every key length tried (1-40, 56-751)


@functools.cache
def _compiled_flex_attention():
    # FlexAttention is only fused when compiled; one compiled callable serves every layer and shape.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def padding_block_mask(padding_mask: torch.BoolTensor, block_size: int = 128):
    """FlexAttention block mask that hides padded keys, or None when nothing is padded (full attention).

    Built straight from per-block counts of kept keys (the same mask `create_block_mask` derives by evaluating the
    mask function on every (query, key) pair, at a fraction of the cost): key blocks with no padding are "full",
    blocks with some are "partial" (the mask function runs inside them), fully padded ones are skipped.
    """
    # A data-dependent shortcut; while a graph is captured the mask is always built, to keep one graph.
    if not capturing_graph() and not padding_mask.any():
        return None
    from torch.nn.attention.flex_attention import BlockMask

    batch_size, length = padding_mask.shape
    num_blocks = -(-length // block_size)
    keep = ~padding_mask
    kept = F.pad(keep, (0, num_blocks * block_size - length)).view(batch_size, num_blocks, block_size).sum(-1)
    # As create_block_mask: a block cut short by the sequence end is never "full", in either direction.
    full = kept.eq(block_size)[:, None, :].repeat(1, num_blocks, 1)  # (batch, query block, key block)
    if length % block_size:
        full[:, -1] = False
    partial = kept.gt(0)[:, None, :] & ~full

    def listed(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = flags.sum(-1, dtype=torch.int32)
        order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # flagged blocks first
        return counts[:, None].contiguous(), order[:, None].contiguous()

    def keep_key(batch, head, query_index, key_index):
        return keep[batch, key_index]

    return BlockMask.from_kv_blocks(
        *listed(partial), *listed(full), BLOCK_SIZE=block_size, mask_mod=keep_key, seq_lengths=(length, length)
    )


def flex_supported(query: torch.Tensor, bias: RelativeBias, dropout: float) -> bool:
    """Whether FlexAttention can run this call (else the dense SDPA fallback does).

    It has no attention dropout. On CPU it has no backward, inside a `torch.compile`d model Inductor's CPU backend
    fails to lower it when the score modification reads a tensor computed in the same graph, and with head dims below
    `MIN_CPU_HEAD_DIM` its compiled kernel returns wrong values, even NaN, whenever the key length is 8 mod 16
    (torch 2.13, plain `flex_attention` without any score modification too; the shipped model has 16-dim heads).
    """
    if query.device.type == "cpu":
        needs_grad = torch.is_grad_enabled() and (query.requires_grad or bias.table.requires_grad)
        if needs_grad or torch.compiler.is_compiling() or query.shape[-1] < MIN_CPU_HEAD_DIM:
            return False
    return dropout == 0.0


def onepeace_flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: RelativeBias | torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the ONE-PEACE relative bias; returns (batch, query, heads, head_dim) and no weights."""
    bias = attention_mask
    # No RelativeBias: no relative bias in this sequence (and no masking, as the original), plain SDPA.
    if not isinstance(bias, RelativeBias) or not flex_supported(query, bias, dropout):
        return sdpa_with_dense_bias(module, query, key, value, attention_mask, scaling, dropout)

    table, buckets = bias.table.to(query.dtype), bias.buckets
    if buckets.dim() == 2:

        def add_bias(score, batch, head, query_index, key_index):
            return score + table[buckets[query_index, key_index], head]

    else:

        def add_bias(score, batch, head, query_index, key_index):
            return score + table[buckets[batch, query_index, key_index], head]

    output = _compiled_flex_attention()(
        query, key, value, score_mod=add_bias, block_mask=bias.block_mask, scale=scaling
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(FUSED_ATTENTION, onepeace_flex_attention_forward)
