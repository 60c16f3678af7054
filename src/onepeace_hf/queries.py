"""Combined queries: several embeddings (say, an image and a text) as one search vector, and ranking by it.

ONE-PEACE puts texts, images and audio clips into one embedding space, so a query may mix modalities, as in the
original demo ("this image, but with ..." or "this sound and this picture"): normalize each part, take a weighted
sum, normalize again, and rank candidates by cosine similarity with the result.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Ranking(NamedTuple):
    """Result of [`rank_candidates`]: candidate `indices` (long) and their cosine `scores`, best first."""

    indices: torch.Tensor
    scores: torch.Tensor


def _as_float_tensor(value, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}.")
    # bf16/fp16 embeddings are combined in float32: sums of a few unit vectors lose little, but norms near zero do.
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _normalize(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """L2-normalize the last axis; a zero or non-finite vector has no direction, so it is an error, not NaN or 0."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    norms = torch.linalg.vector_norm(tensor, dim=-1, keepdim=True)
    if (norms == 0).any():
        raise ValueError(f"{name} contains a zero vector, which has no direction to normalize.")
    return tensor / norms


def combine_embeddings(*embeddings, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """
    One query from several embeddings: `normalize(sum_i weights[i] * normalize(embeddings[i]))`.

    embeddings: tensors (or arrays) of one shape, `(dim,)` for one query or `(batch, dim)` for a batch of queries,
        e.g. the outputs of `get_image_features` and `get_text_features`. Each is L2-normalized first, so no
        modality dominates only because its raw embeddings are longer.
    weights: one real number per embedding (default: all 1, an equal mix). A negative weight moves the query away
        from that embedding.

    Returns the L2-normalized combination, same shape as each input, float32 or wider. Raises `ValueError` for no
    embeddings, different shapes, a wrong number of weights, zero or non-finite inputs, or weights that cancel
    the embeddings out (a zero combination has no direction).
    """
    if not embeddings:
        raise ValueError("combine_embeddings needs at least one embedding.")
    tensors = [_as_float_tensor(e, f"embeddings[{i}]") for i, e in enumerate(embeddings)]
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) > 1:
        raise ValueError(f"All embeddings must have the same shape, got {shapes}.")
    if tensors[0].dim() not in (1, 2) or tensors[0].shape[-1] == 0:
        raise ValueError(f"Embeddings must be (dim,) or (batch, dim) with dim > 0, got shape {shapes[0]}.")

    if weights is None:
        weight_values = torch.ones(len(tensors), dtype=torch.float64)
    else:
        weight_values = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if weight_values.numel() != len(tensors):
            raise ValueError(
                f"Got {weight_values.numel()} weights for {len(tensors)} embeddings: give one per embedding."
            )
        if not torch.isfinite(weight_values).all():
            raise ValueError(f"Weights must be finite, got {weight_values.tolist()}.")

    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    combined = sum(
        float(w) * _normalize(t.to(dtype), f"embeddings[{i}]") for i, (w, t) in enumerate(zip(weight_values, tensors))
    )
    norms = torch.linalg.vector_norm(combined, dim=-1, keepdim=True)
    # Exact cancellation leaves rounding noise, not zero: compare with the scale of the weighted parts.
    tolerance = 100 * torch.finfo(dtype).eps * weight_values.abs().sum().item()
    if (norms <= tolerance).any():
        raise ValueError(
            "The weighted embeddings cancel out (their combination is zero), so the query has no direction; "
            "change the weights."
        )
    return combined / norms


def rank_candidates(query, candidates, top_k: int | None = None) -> Ranking:
    """
    Rank `candidates` by cosine similarity with `query`, best first.

    query: `(dim,)` or `(n_queries, dim)`, e.g. from [`combine_embeddings`]. candidates: `(n_candidates, dim)`.
        Both are L2-normalized here, so raw `get_*_features` outputs can be passed.
    top_k: how many to return (default: all); at most `n_candidates` are returned.

    Returns `Ranking(indices, scores)`, each `(k,)` for one query or `(n_queries, k)`; equal scores keep the
    candidates' order (the sort is stable), so results are reproducible.
    """
    query_tensor = _as_float_tensor(query, "query")
    candidate_tensor = _as_float_tensor(candidates, "candidates")
    if query_tensor.dim() not in (1, 2):
        raise ValueError(f"query must be (dim,) or (n_queries, dim), got shape {tuple(query_tensor.shape)}.")
    if candidate_tensor.dim() != 2 or candidate_tensor.shape[0] == 0:
        raise ValueError(
            f"candidates must be a non-empty (n_candidates, dim) matrix, got shape {tuple(candidate_tensor.shape)}."
        )
    if query_tensor.shape[-1] != candidate_tensor.shape[-1]:
        raise ValueError(
            f"query has dimension {query_tensor.shape[-1]} but candidates have {candidate_tensor.shape[-1]}."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}.")

    dtype = torch.promote_types(query_tensor.dtype, candidate_tensor.dtype)
    scores = _normalize(query_tensor.to(dtype), "query") @ _normalize(candidate_tensor.to(dtype), "candidates").T
    sorted_scores, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    k = candidate_tensor.shape[0] if top_k is None else min(top_k, candidate_tensor.shape[0])
    return Ranking(indices=indices[..., :k], scores=sorted_scores[..., :k])


__all__ = ["Ranking", "combine_embeddings", "rank_candidates"]
