"""Triton kernels of the `onepeace_triton` attention: the relative-position bias read from its bucket table in-kernel.

Flash-attention style (online softmax forward; backward recomputes the probabilities from the saved log-sum-exp,
one kernel for dK/dV and one for dQ, so no atomics on the inputs' gradients). The bias is `table[buckets[q, k], h]`,
gathered inside every tile; padded keys get -inf from the per-key padding mask.

The bias table's gradient is where this differs from FlexAttention, which adds every (batch, head, query, key)
score gradient straight into the small table with atomics, many of them on the same few addresses. Here the dK/dV
kernel adds each tile's score gradients into a dense float32 (heads, L, L) buffer that the batch shares (or, with
per-sample bucket indices, writes them into (batch, heads, L, L)), and one `index_add_` then folds it into the
table. That costs heads x L x L floats for the call's backward, not batch x heads x L x L.

Imported on first use (it needs Triton); under `TRITON_INTERPRET=1` the kernels run on CPU tensors (tests).
"""

import dataclasses

import torch
import triton
import triton.language as tl


LOG2E = 1.4426950408889634  # the kernels use exp2: scores are kept in base-2 units


@triton.jit
def _load_rows(base, rows, stride_row, offs_d, length, head_dim):
    """A (rows, BLOCK_D) tile of one (batch, head)'s (L, head_dim) matrix, zero outside it."""
    return tl.load(base + rows[:, None] * stride_row + offs_d[None, :],
                   mask=(rows[:, None] < length) & (offs_d[None, :] < head_dim), other=0.0)


@triton.jit
def _store_rows(base, tile, rows, stride_row, offs_d, length, head_dim):
    tl.store(base + rows[:, None] * stride_row + offs_d[None, :], tile.to(base.dtype.element_ty),
             mask=(rows[:, None] < length) & (offs_d[None, :] < head_dim))


@triton.jit
def _biased_scores(q, k, table_row, bucket_rows, padding, offs_m, offs_n, length, qk_scale,
                   DOT_PRECISION: tl.constexpr):
    """Base-2 scores of one (query block, key block) tile: q.k * scale + bias, -inf on padded or missing keys.

    bucket_rows: this sample's (L, L) bucket indices; padding: this sample's (L,) padding flags.
    """
    in_range = (offs_m[:, None] < length) & (offs_n[None, :] < length)
    buckets = tl.load(bucket_rows + offs_m[:, None] * length + offs_n[None, :], mask=in_range, other=0)
    bias = tl.load(table_row + buckets).to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias * 1.4426950408889634
    keep = tl.load(padding + offs_n, mask=offs_n < length, other=1) == 0
    return tl.where(keep[None, :], scores, float("-inf"))


@triton.jit
def _forward_kernel(
    Q, K, V, Out, LSE, TableT, Buckets, Padding,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_bucket_b, stride_table_h,
    heads, length, head_dim, qk_scale,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch_head = tl.program_id(0)  # axis 0: up to 2**31 - 1 programs (axis 1 stops at 65535)
    batch, head = batch_head // heads, batch_head % heads
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K, V = K + batch * stride_kb + head * stride_kh, V + batch * stride_vb + head * stride_vh
    Buckets, Padding = Buckets + batch * stride_bucket_b, Padding + batch * length
    table_row = TableT + head * stride_table_h
    q = _load_rows(Q + batch * stride_qb + head * stride_qh, offs_m, stride_qm, offs_d, length, head_dim)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kn, offs_d, length, head_dim)
        v = _load_rows(V, offs_n, stride_vn, offs_d, length, head_dim)
        scores = _biased_scores(q, k, table_row, Buckets, Padding, offs_m, offs_n, length, qk_scale,
                                DOT_PRECISION)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key seen yet: keep exp2 finite
        probs = tl.exp2(scores - safe_max[:, None])
        correction = tl.exp2(row_max - safe_max)
        row_sum = row_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    _store_rows(Out + batch * stride_ob + head * stride_oh, acc / row_sum[:, None], offs_m, stride_om, offs_d, length,
                head_dim)
    tl.store(LSE + batch_head * length + offs_m, row_max + tl.log2(row_sum), mask=offs_m < length)


@triton.jit
def _backward_key_value_kernel(
    Q, K, V, DOut, LSE, Delta, DK, DV, DBias, TableT, Buckets, Padding,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_bucket_b, stride_table_h, stride_dbias_b,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    heads, length, head_dim, qk_scale, scale,
    DOT_PRECISION: tl.constexpr, BIAS_GRAD: tl.constexpr, SHARED_BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK and dV of one key block (looping over the query blocks); the tiles' score gradients go to DBias."""
    batch_head = tl.program_id(0)
    batch, head = batch_head // heads, batch_head % heads
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q, DOut = Q + batch * stride_qb + head * stride_qh, DOut + batch * stride_ob + head * stride_oh
    LSE, Delta = LSE + batch_head * length, Delta + batch_head * length
    Buckets, Padding = Buckets + batch * stride_bucket_b, Padding + batch * length
    table_row = TableT + head * stride_table_h
    DBias = DBias + batch * stride_dbias_b + head * length * length
    k = _load_rows(K + batch * stride_kb + head * stride_kh, offs_n, stride_kn, offs_d, length, head_dim)
    v = _load_rows(V + batch * stride_vb + head * stride_vh, offs_n, stride_vn, offs_d, length, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, length, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < length
        q = _load_rows(Q, offs_m, stride_qm, offs_d, length, head_dim)
        dout = _load_rows(DOut, offs_m, stride_om, offs_d, length, head_dim)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(Delta + offs_m, mask=m_ok, other=0.0)
        scores = _biased_scores(q, k, table_row, Buckets, Padding, offs_m, offs_n, length, qk_scale,
                                DOT_PRECISION)
        probs = tl.where(m_ok[:, None], tl.exp2(scores - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(probs.to(dout.dtype)), dout, input_precision=DOT_PRECISION)
        dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
        dscores = probs * (dprobs - delta[:, None])  # gradient of (scale * q.k + bias)
        dk += tl.dot(tl.trans(dscores.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if BIAS_GRAD:
            dbias_ptrs = DBias + offs_m[:, None] * length + offs_n[None, :]
            tile_ok = m_ok[:, None] & (offs_n[None, :] < length)
            if SHARED_BIAS_GRAD:  # one (heads, L, L) buffer for the whole batch
                tl.atomic_add(dbias_ptrs, dscores, mask=tile_ok)
            else:
                tl.store(dbias_ptrs, dscores, mask=tile_ok)
    _store_rows(DK + batch * stride_dkb + head * stride_dkh, dk * scale, offs_n, stride_dkn, offs_d, length, head_dim)
    _store_rows(DV + batch * stride_dvb + head * stride_dvh, dv, offs_n, stride_dvn, offs_d, length, head_dim)


@triton.jit
def _backward_query_kernel(
    Q, K, V, DOut, LSE, Delta, DQ, TableT, Buckets, Padding,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_bucket_b, stride_table_h, stride_dqb, stride_dqh, stride_dqm,
    heads, length, head_dim, qk_scale, scale,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block, looping over the key blocks."""
    batch_head = tl.program_id(0)
    batch, head = batch_head // heads, batch_head % heads
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < length
    K, V = K + batch * stride_kb + head * stride_kh, V + batch * stride_vb + head * stride_vh
    Buckets, Padding = Buckets + batch * stride_bucket_b, Padding + batch * length
    table_row = TableT + head * stride_table_h
    q = _load_rows(Q + batch * stride_qb + head * stride_qh, offs_m, stride_qm, offs_d, length, head_dim)
    dout = _load_rows(DOut + batch * stride_ob + head * stride_oh, offs_m, stride_om, offs_d, length, head_dim)
    lse = tl.load(LSE + batch_head * length + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + batch_head * length + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kn, offs_d, length, head_dim)
        v = _load_rows(V, offs_n, stride_vn, offs_d, length, head_dim)
        scores = _biased_scores(q, k, table_row, Buckets, Padding, offs_m, offs_n, length, qk_scale,
                                DOT_PRECISION)
        probs = tl.where(m_ok[:, None], tl.exp2(scores - lse[:, None]), 0.0)
        dscores = probs * (tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
        dq += tl.dot(dscores.to(k.dtype), k, input_precision=DOT_PRECISION)
    _store_rows(DQ + batch * stride_dqb + head * stride_dqh, dq * scale, offs_m, stride_dqm, offs_d, length, head_dim)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one kernel: block_m queries x block_n keys per tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Per kernel and input precision, for sm_90 (H100/H200). Picked from what the kernels compile to there with Triton 3.6
# and 3.9 (`benchmarks/triton_configs.py resources`), not yet from GPU timings (`triton_configs.py time`): in bf16,
# tiles that need no register spills, the backward's at the shapes of Triton's fused-attention tutorial (key blocks of
# 128 for dK/dV, query blocks of 128 for dQ). float32 dot products are exact (no TF32) and hold more in registers:
# smaller tiles (dK/dV still spills with Triton 3.9). On sm_80 the bf16 dK/dV and dQ kernels spill a little.
LAUNCH_CONFIGS = {
    "half": {"forward": LaunchConfig(64, 64, 8, 2), "key_value": LaunchConfig(32, 128, 8, 2),
             "query": LaunchConfig(128, 32, 8, 2)},
    "float32": {"forward": LaunchConfig(32, 64, 8, 2), "key_value": LaunchConfig(32, 32, 8, 2),
                "query": LaunchConfig(32, 64, 8, 2)},
}
# Under the interpreter (CPU tests): small tiles keep the tests quick; unequal ones check that no kernel assumes
# block_m == block_n.
INTERPRETER_CONFIGS = {"forward": LaunchConfig(16, 16, 1, 1), "key_value": LaunchConfig(16, 32, 1, 1),
                       "query": LaunchConfig(32, 16, 1, 1)}


def config_precision(dtype: torch.dtype) -> str:
    """The key of LAUNCH_CONFIGS for inputs of this dtype."""
    return "float32" if dtype == torch.float32 else "half"


def launch_config(kernel: str, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    if device.type != "cuda":
        return INTERPRETER_CONFIGS[kernel]
    return LAUNCH_CONFIGS[config_precision(dtype)][kernel]


def _launch_options(config: LaunchConfig, head_dim: int) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                num_warps=config.num_warps, num_stages=config.num_stages)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 matmuls as precise as torch's (no TF32 unless `torch.set_float32_matmul_precision` allows it)."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def _bhl(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides of a (batch, heads, L, head_dim) tensor whose last dimension is contiguous."""
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


class BucketBiasAttention(torch.autograd.Function):
    """softmax(q k^T * scale + table[buckets], -inf on padded keys) v, with gradients for q, k, v and the table.

    query, key, value: (batch, heads, L, head_dim), any strides. table: (num_buckets, heads). buckets: (L, L) or
    (batch, L, L) indices into the table. padding_mask: (batch, L) bool, True = padded key. Returns
    (batch, L, heads, head_dim), the layout the output projection takes.
    """

    @staticmethod
    def forward(ctx, query, key, value, table, buckets, padding_mask, scale):
        query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
        batch, heads, length, head_dim = query.shape
        score_buffer = (batch if buckets.dim() == 3 else 1) * heads * length * length  # the backward's bias gradient
        if max(query.numel(), key.numel(), value.numel(), score_buffer) >= 2**31:
            raise ValueError("onepeace_triton indexes with 32-bit offsets: split this batch (or use onepeace_flex)")
        config = launch_config("forward", query.dtype, query.device)
        index_dtype = torch.int16 if table.shape[0] <= torch.iinfo(torch.int16).max else torch.int32
        buckets = buckets.to(index_dtype).contiguous()  # int16: half the bytes a bf16 dense bias tile would take
        table_t = table.t().contiguous()  # (heads, num_buckets): one head's table is one cached row
        padding = padding_mask.to(torch.int8).contiguous()
        out = query.new_empty(batch, length, heads, head_dim)
        lse = torch.empty(batch * heads, length, device=query.device, dtype=torch.float32)
        _forward_kernel[(batch * heads, triton.cdiv(length, config.block_m))](
            query, key, value, out, lse, table_t, buckets, padding,
            *_bhl(query), *_bhl(key), *_bhl(value), *_bhl(out.transpose(1, 2)),
            length * length if buckets.dim() == 3 else 0, table_t.stride(0),
            heads, length, head_dim, scale * LOG2E,
            DOT_PRECISION=_dot_precision(query.dtype), **_launch_options(config, head_dim),
        )
        ctx.save_for_backward(query, key, value, out, lse, table_t, buckets, padding)
        ctx.scale, ctx.table_shape = scale, table.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, table_t, buckets, padding = ctx.saved_tensors
        batch, heads, length, head_dim = query.shape
        grad_out = grad_out.contiguous()  # (batch, L, heads, head_dim), as out
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i (one float per query row), laid out as lse: the kernels index it
        # as contiguous, which a reshape of a single sample's transposed rows is not (it returns a strided view).
        delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous().view(batch * heads, length)
        dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (query, key, value))
        per_sample = buckets.dim() == 3
        bias_grad = ctx.needs_input_grad[3]
        dbias_shape = (batch if per_sample else 1, heads, length, length) if bias_grad else (1,)
        dbias = torch.zeros(dbias_shape, device=query.device, dtype=torch.float32)
        shared = (*_bhl(query), *_bhl(key), *_bhl(value), *_bhl(grad_out.transpose(1, 2)),
                  length * length if per_sample else 0, table_t.stride(0))
        precision = _dot_precision(query.dtype)
        key_value = launch_config("key_value", query.dtype, query.device)
        _backward_key_value_kernel[(batch * heads, triton.cdiv(length, key_value.block_n))](
            query, key, value, grad_out, lse, delta, dk, dv, dbias, table_t, buckets, padding,
            *shared, heads * length * length if per_sample else 0, *_bhl(dk), *_bhl(dv),
            heads, length, head_dim, ctx.scale * LOG2E, ctx.scale,
            BIAS_GRAD=bias_grad, SHARED_BIAS_GRAD=not per_sample, DOT_PRECISION=precision,
            **_launch_options(key_value, head_dim),
        )
        query_config = launch_config("query", query.dtype, query.device)
        _backward_query_kernel[(batch * heads, triton.cdiv(length, query_config.block_m))](
            query, key, value, grad_out, lse, delta, dq, table_t, buckets, padding,
            *shared, *_bhl(dq), heads, length, head_dim, ctx.scale * LOG2E, ctx.scale, DOT_PRECISION=precision,
            **_launch_options(query_config, head_dim),
        )
        dtable = None
        if bias_grad:
            per_pair = dbias.permute(0, 2, 3, 1).reshape(-1, heads)  # ((batch x) L x L, heads), the buckets' order
            dtable = per_pair.new_zeros(ctx.table_shape).index_add_(0, buckets.reshape(-1).long(), per_pair)
            dtable = dtable.to(table_t.dtype)
        return dq, dk, dv, dtable, None, None, None
