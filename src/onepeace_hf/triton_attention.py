"""`attn_implementation="onepeace_triton"`: our own Triton kernel for the relative-position-biased attention.

The alternative to `onepeace_flex` for training on GPU. FlexAttention accumulates the bias table's gradient with one
atomic add per (batch, head, query, key) into a table of a few hundred rows; `triton_kernels.py` sums the score
gradients over the batch in a dense (heads, L, L) buffer and folds that into the table once. Which of the two is
faster is a GPU measurement (`benchmarks/attention.py`). Without a CUDA tensor (and outside Triton's interpreter,
`TRITON_INTERPRET=1`) or with attention dropout, the call goes to SDPA with the dense bias: same results, as for
`onepeace_flex`.
"""

import os

import torch
from transformers import AttentionInterface

from .attention import RelativeBias, sdpa_with_dense_bias


TRITON_ATTENTION = "onepeace_triton"


def triton_supported(query: torch.Tensor, dropout: float) -> bool:
    """Whether the Triton kernel runs this call: a CUDA tensor (or Triton's CPU interpreter) and no dropout."""
    return dropout == 0.0 and (query.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def onepeace_triton_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: RelativeBias | torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the ONE-PEACE relative bias; returns (batch, query, heads, head_dim) and no weights.

    The bias is computed in float32 from the table as stored (eager and sdpa round it to the compute dtype first).
    """
    bias = attention_mask
    if not isinstance(bias, RelativeBias) or not triton_supported(query, dropout):
        return sdpa_with_dense_bias(module, query, key, value, attention_mask, scaling, dropout)

    from .triton_kernels import BucketBiasAttention  # needs Triton: imported on first use

    # The padding mask always goes in: reading it costs one byte per key and tile, while asking whether anything is
    # padded would make every layer wait for the GPU.
    output = BucketBiasAttention.apply(query, key, value, bias.table, bias.buckets, bias.padding_mask, scaling)
    return output, None


AttentionInterface.register(TRITON_ATTENTION, onepeace_triton_attention_forward)
