"""Relative-position buckets and the attention functions of ONE-PEACE.

The relative-position bias is a separate, additive input of the attention function (`attention_mask`), computed from
small per-modality bucket tables. `eager_attention_forward` reproduces the original's arithmetic; every other
implementation (sdpa, or the fused `onepeace_flex` of `flex_attention.py` and `onepeace_triton` of
`triton_attention.py`) comes from transformers' attention interface. `RelativeBias` carries the bias compactly
(bucket table + indices) until an implementation needs it dense.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def token_relative_buckets(bucket_size: int, max_positions: int) -> torch.Tensor:
    """Bucket index of every (query, key) pair of a 1-D sequence whose position 0 is the CLS slot.

    Distances below `bucket_size // 2` get their own bucket; longer ones share log-spaced buckets up to
    `max_positions`. The CLS row, column and corner get the three extra buckets after the `2 * bucket_size - 1`
    distance buckets. Same index table as the original's `make_token_bucket_position` (text and audio adapters).
    """
    positions = torch.arange(max_positions, dtype=torch.long)
    relative = positions[:, None] - positions[None, :]
    sign = torch.sign(relative)
    mid = bucket_size // 2
    near = (relative < mid) & (relative > -mid)
    # Near pairs take `mid - 1` only to keep the log below finite; their bucket is the exact distance anyway.
    magnitude = torch.where(near, mid - 1, relative.abs())
    log_bucket = mid + torch.ceil(torch.log(magnitude / mid) / math.log((max_positions - 1) / mid) * (mid - 1)).long()
    buckets = torch.where(magnitude.le(mid), relative, log_bucket * sign) + bucket_size - 1
    num_distances = 2 * bucket_size - 1
    buckets[0, :] = num_distances
    buckets[:, 0] = num_distances + 1
    buckets[0, 0] = num_distances + 2
    return buckets


def num_token_buckets(bucket_size: int) -> int:
    return 2 * bucket_size - 1 + 3


def image_relative_buckets(grid_size: int, table_grid_size: int) -> torch.Tensor:
    """Bucket index of every (query, key) pair of a CLS-prefixed `grid_size` x `grid_size` patch sequence.

    The table covers relative offsets up to `table_grid_size - 1` in each direction (the original's
    `make_image_bucket_position`, identical when `grid_size == table_grid_size`). For larger grids, offsets beyond
    the table are clipped to its border, so any image size can run with a pretrained table.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    limit = table_grid_size - 1
    d_row = (rows[:, None] - rows[None, :]).clamp(-limit, limit) + limit
    d_col = (cols[:, None] - cols[None, :]).clamp(-limit, limit) + limit
    num_buckets = num_image_buckets(table_grid_size)
    buckets = torch.zeros((grid_size * grid_size + 1,) * 2, dtype=torch.long)
    buckets[1:, 1:] = d_row * (2 * table_grid_size - 1) + d_col
    buckets[0, :] = num_buckets - 3
    buckets[:, 0] = num_buckets - 2
    buckets[0, 0] = num_buckets - 1
    return buckets


def num_image_buckets(table_grid_size: int) -> int:
    return (2 * table_grid_size - 1) ** 2 + 3


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention in the original's order: q is scaled (after its bias), bias added, softmax in float32.

    `attention_mask` is the additive relative-position bias with -inf on padded keys, shape (batch or 1, heads,
    query, key). Returns the output as (batch, query, heads, head_dim) and the attention probabilities.
    """
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def capturing_graph() -> bool:
    """Whether torch.compile / torch.export or torch.jit.trace is recording: no data-dependent shortcuts then, or
    the recorded graph would keep the branch of the example inputs (e.g. "no padding") for every later input."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class RelativeBias(NamedTuple):
    """The relative-position bias of one attention call, kept compact: bucket table and bucket indices.

    table: (num_buckets + 1, heads), the tables of every modality in the sequence stacked, last row zero (the blocks
        between modalities, and modalities without a relative bias, point at it).
    buckets: (L, L), or (batch, L, L) for masked passes, indices into `table`.
    padding_mask: (batch, L) bool, True = padded key (-inf).
    block_mask: FlexAttention's block mask of the padding, or None when there is no padding (built only for the
        fused kernel).
    """

    table: torch.Tensor
    buckets: torch.LongTensor
    padding_mask: torch.BoolTensor
    block_mask: object = None

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        """The (batch or 1, heads, L, L) additive bias with -inf on padded keys, as eager and sdpa take it.

        Without padding (and with one bucket index table for the batch) every sequence shares one (1, heads, L, L)
        bias: broadcasting it costs SDPA nothing, while expanding it to the batch costs batch times the memory and,
        on CPU, doubles the attention time at batch 8. While a graph is captured it is always expanded (one graph).
        """
        bias = self.table.to(dtype)[self.buckets]  # (..., L, L, heads)
        bias = bias.permute(2, 0, 1)[None] if bias.dim() == 3 else bias.permute(0, 3, 1, 2)
        if not capturing_graph() and not self.padding_mask.any():
            return bias
        return bias.masked_fill(self.padding_mask[:, None, None, :], float("-inf"))


def sdpa_with_dense_bias(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: RelativeBias | torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """SDPA with the bias made dense: what the fused implementations run where their kernel cannot run a call, so
    that choosing one never changes results, only speed. Returns (batch, query, heads, head_dim) and no weights."""
    if isinstance(attention_mask, RelativeBias):
        attention_mask = attention_mask.materialize(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
