"""Cross-modal retrieval recall (R@k), as the original's retrieval evaluations report it, in both directions.

`bidirectional_retrieval_recall(images, texts, b_to_a=image_index_of_each_text)` covers the COCO / Flickr / AudioCaps
layout where every item of one side has several captions. The same metric is available the `evaluate` way through
`load_retrieval_metric()` (an `evaluate.Metric` module shipped with the package, loadable offline).
"""

from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

import torch


METRIC_MODULE = Path(__file__).parent / "metrics" / "retrieval_recall" / "retrieval_recall.py"


def _as_index_lists(query_to_candidates, num_queries: int, num_candidates: int) -> list[list[int]]:
    if query_to_candidates is None:
        if num_queries != num_candidates:
            raise ValueError(
                f"Without query_to_candidates, query i matches candidate i: the counts must be equal, got "
                f"{num_queries} queries and {num_candidates} candidates."
            )
        return [[i] for i in range(num_queries)]
    if len(query_to_candidates) != num_queries:
        raise ValueError(f"query_to_candidates has {len(query_to_candidates)} entries for {num_queries} queries.")
    lists = []
    for i, targets in enumerate(query_to_candidates):
        if isinstance(targets, torch.Tensor):
            targets = targets.reshape(-1).tolist()
        targets = [int(t) for t in targets] if isinstance(targets, Iterable) else [int(targets)]
        if not targets or min(targets) < 0 or max(targets) >= num_candidates:
            raise ValueError(
                f"Query {i} needs at least one correct candidate in [0, {num_candidates}), got {targets}."
            )
        lists.append(targets)
    return lists


def retrieval_recall(
    query_embeds: torch.Tensor,
    candidate_embeds: torch.Tensor,
    query_to_candidates: Sequence[int | Iterable[int]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """`{"R@k": percent}`: the share of queries with at least one correct candidate among their k most similar.

    Similarity is the dot product (pass L2-normalized embeddings for cosine). `query_to_candidates[i]` is the correct
    candidate index (or collection of indices) of query i; None means candidate i. Ties are counted pessimistically:
    a correct candidate ranks below every wrong one with the same score, so a constant model scores 0 rather than a
    number that depends on sort order (the original's `topk` breaks ties arbitrarily). Only `chunk_size` rows of the
    similarity matrix exist at a time, so 25k x 5k (COCO) fits in a few MB.
    """
    if query_embeds.dim() != 2 or candidate_embeds.dim() != 2 or query_embeds.shape[1] != candidate_embeds.shape[1]:
        raise ValueError(
            f"Need (queries, dim) and (candidates, dim) embeddings with the same dim, got {tuple(query_embeds.shape)} "
            f"and {tuple(candidate_embeds.shape)}."
        )
    num_queries, num_candidates = query_embeds.shape[0], candidate_embeds.shape[0]
    if num_queries == 0 or num_candidates == 0:
        raise ValueError(f"Need at least one query and one candidate, got {num_queries} and {num_candidates}.")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    targets = _as_index_lists(query_to_candidates, num_queries, num_candidates)
    candidates = candidate_embeds.float()
    if not torch.isfinite(candidates).all() or not torch.isfinite(query_embeds).all():
        raise ValueError("Embeddings contain NaN or infinite values; recall would be meaningless.")
    ranks = []
    for start in range(0, num_queries, chunk_size):
        scores = query_embeds[start : start + chunk_size].to(candidates.device, torch.float32) @ candidates.t()
        correct = torch.zeros_like(scores, dtype=torch.bool)
        rows = [row for row, t in enumerate(targets[start : start + chunk_size]) for _ in t]
        cols = [c for t in targets[start : start + chunk_size] for c in t]
        correct[rows, cols] = True
        best_correct = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
        # 0-based rank of the best correct candidate: all scoring higher, plus the wrong ones tying with it.
        ranks.append(((scores > best_correct) | ((scores == best_correct) & ~correct)).sum(dim=1).cpu())
    ranks = torch.cat(ranks)
    return {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def bidirectional_retrieval_recall(
    a_embeds: torch.Tensor,
    b_embeds: torch.Tensor,
    a_name: str = "image",
    b_name: str = "text",
    b_to_a: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """`{a}_to_{b}_R@k` and `{b}_to_{a}_R@k` for every k, and `mean_recall`, their mean (with ks = 1, 5, 10 the
    original's `r_mean`).

    b_to_a[j]: index of the `a` item that `b` item j belongs to (None: row i of each side is a pair). An `a` query is
    right when any of its `b` items is retrieved; each `b` query has exactly one right `a` item.
    """
    num_a, num_b = a_embeds.shape[0], b_embeds.shape[0]
    if b_to_a is None:
        if num_a != num_b:
            raise ValueError(
                f"Without b_to_a, row i of each side is a pair: the counts must be equal, got {num_a} and {num_b}."
            )
        b_to_a = range(num_b)
    b_to_a = [int(i) for i in b_to_a]
    if len(b_to_a) != num_b:
        raise ValueError(f"b_to_a has {len(b_to_a)} entries for {num_b} {b_name} items.")
    a_to_b: list[list[int]] = [[] for _ in range(num_a)]
    for j, i in enumerate(b_to_a):
        if not 0 <= i < num_a:
            raise ValueError(f"b_to_a[{j}] = {i} is not an index of the {num_a} {a_name} items.")
        a_to_b[i].append(j)
    lonely = [i for i, owned in enumerate(a_to_b) if not owned]
    if lonely:
        raise ValueError(f"{a_name} items {lonely[:10]} have no {b_name} item in b_to_a, so they cannot be retrieved.")
    return _both_directions(a_embeds, b_embeds, a_to_b, b_to_a, a_name, b_name, ks, chunk_size)


def _both_directions(a_embeds, b_embeds, a_to_b, b_to_a, a_name, b_name, ks, chunk_size) -> dict[str, float]:
    forward = retrieval_recall(a_embeds, b_embeds, a_to_b, ks, chunk_size)
    backward = retrieval_recall(b_embeds, a_embeds, b_to_a, ks, chunk_size)
    result = {f"{a_name}_to_{b_name}_{key}": value for key, value in forward.items()}
    result.update({f"{b_name}_to_{a_name}_{key}": value for key, value in backward.items()})
    result["mean_recall"] = sum(result.values()) / len(result)
    return result


def grouped_pairs_recall(
    a_embeds: torch.Tensor,
    b_embeds: torch.Tensor,
    groups: Sequence[Hashable],
    a_name: str = "image",
    b_name: str = "text",
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    a_groups: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """[`bidirectional_retrieval_recall`] over paired rows (row i of each side is a pair) where rows holding the
    same item are interchangeable answers.

    groups[i]: the group of pair i, e.g. its caption (identical captions cannot be told apart: with one right answer
    each, the tie would count as a miss for both) or its class label (class-level retrieval, as on the digits set).
    a_groups[i]: the identity of row i's `a` item when it differs from `groups`, e.g. which image it shows, for sets
    flattened to one caption per row (an image with five captions is five rows; its copies tie, and a tie with the
    right answer would count as a miss). A query is then right when it retrieves an item that some row pairs with
    it: text j answers image i if a row shows image i with a caption of j's group, and the other way round.
    """
    counts = [f"{a_embeds.shape[0]} {a_name} items", f"{b_embeds.shape[0]} {b_name} items", f"{len(groups)} groups"]
    if a_groups is not None:
        counts.append(f"{len(a_groups)} {a_name} groups")
    a_groups = groups if a_groups is None else a_groups
    if not a_embeds.shape[0] == b_embeds.shape[0] == len(groups) == len(a_groups):
        raise ValueError(f"Need one group per pair: got {', '.join(counts[:-1])} and {counts[-1]}.")
    rows_of_a, rows_of_b, b_groups_of_a, a_groups_of_b = {}, {}, {}, {}
    for i, (a_group, b_group) in enumerate(zip(a_groups, groups)):
        rows_of_a.setdefault(a_group, []).append(i)
        rows_of_b.setdefault(b_group, []).append(i)
        b_groups_of_a.setdefault(a_group, set()).add(b_group)
        a_groups_of_b.setdefault(b_group, set()).add(a_group)
    a_to_b = [sorted(j for group in b_groups_of_a[a] for j in rows_of_b[group]) for a in a_groups]
    b_to_a = [sorted(j for group in a_groups_of_b[b] for j in rows_of_a[group]) for b in groups]
    return _both_directions(a_embeds, b_embeds, a_to_b, b_to_a, a_name, b_name, ks, chunk_size)


def load_retrieval_metric(**kwargs):
    """The metric as an `evaluate` module, loaded from the package's own file (no Hub access, works offline)."""
    import evaluate  # noqa: PLC0415 (optional dependency: the `train` extra)

    return evaluate.load(str(METRIC_MODULE), **kwargs)


__all__ = ["bidirectional_retrieval_recall", "grouped_pairs_recall", "load_retrieval_metric", "retrieval_recall"]
