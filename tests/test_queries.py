"""Combined queries: hand-checked combinations of unit vectors and rankings."""

import math

import numpy as np
import pytest
import torch

import onepeace_hf
from onepeace_hf import combine_embeddings, rank_candidates


E1 = torch.tensor([1.0, 0.0, 0.0])
E2 = torch.tensor([0.0, 1.0, 0.0])
E3 = torch.tensor([0.0, 0.0, 1.0])


def test_exported_from_the_package():
    assert onepeace_hf.combine_embeddings is combine_embeddings
    assert onepeace_hf.rank_candidates is rank_candidates


def test_equal_mix_of_orthogonal_unit_vectors():
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(combine_embeddings(E1, E2), torch.tensor([r, r, 0.0]))
    torch.testing.assert_close(combine_embeddings(E1, E2, E3), torch.full((3,), 1 / math.sqrt(3)))


def test_weights_and_prior_normalization():
    # 3 * e1 + 1 * e2 has norm sqrt(10); the lengths of the inputs do not matter, only their directions.
    expected = torch.tensor([3.0, 1.0, 0.0]) / math.sqrt(10)
    torch.testing.assert_close(combine_embeddings(E1, E2, weights=[3, 1]), expected)
    torch.testing.assert_close(combine_embeddings(5 * E1, 0.2 * E2, weights=(3.0, 1.0)), expected)
    torch.testing.assert_close(combine_embeddings(E1, E2, weights=torch.tensor([3.0, 1.0])), expected)
    # A negative weight moves away: e1 - e2.
    away = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)
    torch.testing.assert_close(combine_embeddings(E1, E2, weights=[1, -1]), away)
    # One embedding is just normalized.
    torch.testing.assert_close(combine_embeddings(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))


def test_batches_combine_row_by_row():
    a = torch.stack([E1, 2 * E2])
    b = torch.stack([E2, E3])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(combine_embeddings(a, b), torch.tensor([[r, r, 0.0], [0.0, r, r]]))


def test_arrays_and_low_precision_inputs():
    out = combine_embeddings(np.array([1.0, 0.0]), np.array([0, 1]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2))
    half = combine_embeddings(E1.bfloat16(), E2.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))


def test_a_combined_query_is_unit_length_and_between_its_parts():
    torch.manual_seed(0)
    image, text = torch.randn(2, 8), torch.randn(2, 8)
    query = combine_embeddings(image, text, weights=[0.7, 0.3])
    torch.testing.assert_close(query.norm(dim=-1), torch.ones(2))
    # Closer to the heavier part: cosine with the image beats cosine with the text.
    cos_image = (query * image).sum(-1) / image.norm(dim=-1)
    cos_text = (query * text).sum(-1) / text.norm(dim=-1)
    assert (cos_image > cos_text).all()


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((), {}, "at least one embedding"),
        ((E1, torch.zeros(2)), {}, "same shape"),
        ((E1, E2), {"weights": [1.0]}, "1 weights for 2 embeddings"),
        ((E1, E2), {"weights": [1.0, 2.0, 3.0]}, "3 weights for 2 embeddings"),
        ((E1, E2), {"weights": [1.0, float("nan")]}, "finite"),
        ((E1, -E1), {}, "cancel out"),
        ((E1, torch.zeros(3)), {}, "zero vector"),
        ((E1, torch.tensor([float("inf"), 0.0, 0.0])), {}, "NaN or infinite"),
        ((torch.zeros(2, 3, 4),), {}, "(dim,) or (batch, dim)"),
    ],
)
def test_combine_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        combine_embeddings(*args, **kwargs)


def test_combine_rejects_non_real_inputs():
    with pytest.raises(TypeError, match="real numbers"):
        combine_embeddings(torch.tensor([True, False]))


def candidate_matrix():
    r = 1 / math.sqrt(2)
    # 0: e1, 1: e2, 2: (e1 + e2) / sqrt2 scaled by 10 (length must not matter), 3: -e1, 4: e3
    return torch.stack([E1, E2, 10 * torch.tensor([r, r, 0.0]), -E1, E3])


def test_rank_a_combined_query():
    r = 1 / math.sqrt(2)
    ranking = rank_candidates(combine_embeddings(E1, E2), candidate_matrix())
    # cos = 1 for the mix; 1/sqrt2 for e1 and e2 (a tie: kept in candidate order); 0 for e3; -1/sqrt2 for -e1.
    assert ranking.indices.tolist() == [2, 0, 1, 4, 3]
    torch.testing.assert_close(ranking.scores, torch.tensor([1.0, r, r, 0.0, -r]))
    indices, scores = rank_candidates(combine_embeddings(E1, E2), candidate_matrix(), top_k=2)
    assert indices.tolist() == [2, 0]
    torch.testing.assert_close(scores, torch.tensor([1.0, r]))
    assert indices.dtype == torch.long


def test_rank_several_queries_and_clamp_top_k():
    queries = torch.stack([E3, -E1])
    ranking = rank_candidates(queries, candidate_matrix(), top_k=10)
    assert ranking.indices.shape == (2, 5)
    assert ranking.indices[:, 0].tolist() == [4, 3]
    torch.testing.assert_close(ranking.scores[:, 0], torch.ones(2))
    # Unnormalized queries give the same ranking.
    torch.testing.assert_close(rank_candidates(7 * queries, candidate_matrix()).scores, ranking.scores)


@pytest.mark.parametrize(
    "query, candidates, top_k, message",
    [
        (E1, torch.zeros(0, 3), None, "non-empty"),
        (E1, E1, None, "non-empty"),
        (torch.zeros(2), candidate_matrix(), None, "dimension 2 but candidates have 3"),
        (E1, candidate_matrix(), 0, "positive integer"),
        (E1, candidate_matrix(), 1.5, "positive integer"),
        (torch.zeros(3), candidate_matrix(), None, "zero vector"),
        (torch.zeros(1, 1, 3), candidate_matrix(), None, "query must be"),
    ],
)
def test_rank_errors(query, candidates, top_k, message):
    with pytest.raises(ValueError, match=message):
        rank_candidates(query, candidates, top_k=top_k)
