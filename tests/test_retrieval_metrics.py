"""Retrieval recall on hand-made similarity layouts, its tie policy and chunking, and its `evaluate` module."""

import evaluate
import pytest
import torch

from onepeace_hf.retrieval_metrics import (
    METRIC_MODULE,
    bidirectional_retrieval_recall,
    grouped_pairs_recall,
    load_retrieval_metric,
    retrieval_recall,
)


def score_rows(rows):
    """Queries = identity, candidates = columns of `rows`: the similarity matrix is exactly `rows`."""
    rows = torch.tensor(rows, dtype=torch.float32)
    return torch.eye(rows.shape[0], rows.shape[0]), rows.t().contiguous()


def one_hot(indices, size):
    return torch.nn.functional.one_hot(torch.tensor(indices), size).float()


def sorted_rank_recall(queries, candidates, targets, ks):
    """Independent formulation: sort each row by score, wrong before correct within ties, find the first correct."""
    hits = {k: 0 for k in ks}
    for query, correct in zip(queries, targets):
        scores = (candidates @ query).tolist()
        order = sorted(range(len(scores)), key=lambda c: (-scores[c], c in correct))
        rank = min(order.index(c) for c in correct)
        for k in ks:
            hits[k] += rank < k
    return {f"R@{k}": 100.0 * hits[k] / len(targets) for k in ks}


def test_recall_by_hand():
    # Correct candidate of query i is i; its 0-based ranks are 0, 2, 1, 3.
    queries, candidates = score_rows([
        [0.9, 0.0, 0.0, 0.0],
        [0.8, 0.5, 0.9, 0.0],
        [0.0, 0.9, 0.8, 0.0],
        [0.5, 0.6, 0.7, 0.1],
    ])
    result = retrieval_recall(queries, candidates, ks=(1, 2, 3, 4))
    assert result == {"R@1": 25.0, "R@2": 50.0, "R@3": 75.0, "R@4": 100.0}
    # The same targets given explicitly, as plain ints and as lists.
    assert retrieval_recall(queries, candidates, [0, 1, 2, 3], ks=(2,)) == {"R@2": 50.0}
    assert retrieval_recall(queries, candidates, [[0], [1], [2], [3]], ks=(2,)) == {"R@2": 50.0}


def test_ties_count_against_the_correct_candidate():
    queries, candidates = score_rows([[0.5, 0.5, 0.2]])
    # Candidate 1 ties with the wrong candidate 0: ranked second.
    assert retrieval_recall(queries, candidates, [[1]], ks=(1, 2)) == {"R@1": 0.0, "R@2": 100.0}
    assert retrieval_recall(queries, candidates, [[0]], ks=(1,)) == {"R@1": 0.0}
    # A tie between two correct candidates is no penalty.
    assert retrieval_recall(queries, candidates, [[0, 1]], ks=(1,)) == {"R@1": 100.0}
    # A constant model retrieves nothing at R@1, whatever the order of the candidates.
    assert retrieval_recall(torch.ones(3, 2), torch.ones(3, 2), ks=(1, 3)) == {"R@1": 0.0, "R@3": 100.0}


def test_several_correct_candidates():
    queries, candidates = score_rows([
        [0.9, 0.3, 0.8, 0.1],  # correct {1, 2}: candidate 2 is second
        [0.9, 0.3, 0.8, 0.1],  # correct {0, 3}: candidate 0 is first
        [0.9, 0.3, 0.8, 0.1],  # correct {1, 3}: candidate 1 is third
    ])
    result = retrieval_recall(queries, candidates, [{1, 2}, [0, 3], (1, 3)], ks=(1, 2, 3))
    assert result == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})


def test_several_captions_per_image():
    images = one_hot([0, 1], 3)
    # Captions 0 and 1 belong to image 0, caption 2 to image 1; caption 1 looks like image 1.
    texts = one_hot([0, 1, 1], 3)
    result = bidirectional_retrieval_recall(images, texts, b_to_a=[0, 0, 1], ks=(1,))
    assert set(result) == {"image_to_text_R@1", "text_to_image_R@1", "mean_recall"}
    # Image 0 finds caption 0; image 1's caption 2 ties with caption 1, which is not its own, so comes second.
    assert result["image_to_text_R@1"] == 50.0
    # Captions 0 and 2 find their image, caption 1 does not.
    assert result["text_to_image_R@1"] == pytest.approx(200 / 3)
    assert result["mean_recall"] == pytest.approx((50.0 + 200 / 3) / 2)
    named = bidirectional_retrieval_recall(images, texts, a_name="audio", b_name="caption", b_to_a=[0, 0, 1], ks=(1,))
    assert named["audio_to_caption_R@1"] == 50.0 and named["caption_to_audio_R@1"] == pytest.approx(200 / 3)


def test_pairs_by_default():
    images = one_hot([0, 1, 2], 3)
    texts = one_hot([0, 2, 2], 3)
    result = bidirectional_retrieval_recall(images, texts, ks=(1, 2))
    # Image 0 finds text 0. Image 1 scores 0 with every text: its text 1 ties with two wrong ones, so is third.
    # Image 2's text 2 ties with the wrong text 1, so is second.
    assert result["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert result["image_to_text_R@2"] == pytest.approx(200 / 3)
    # Texts 0 and 2 find their image; text 1 looks like image 2, and its image 1 ties with image 0: third.
    assert result["text_to_image_R@1"] == pytest.approx(200 / 3)
    assert result["text_to_image_R@2"] == pytest.approx(200 / 3)


def test_identical_captions_are_interchangeable_answers():
    # Pairs 0 and 1 share the caption "6", so their text embeddings are identical; pair 2 has its own caption.
    images = one_hot([0, 1, 2], 3)
    texts = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # One right answer each: image 0's own caption ties with the identical wrong one, so counts as second; likewise
    # image 1, and each "6" caption ties between images 0 and 1.
    strict = bidirectional_retrieval_recall(images, texts, ks=(1,))
    assert strict["image_to_text_R@1"] == strict["text_to_image_R@1"] == pytest.approx(100 / 3)
    grouped = grouped_pairs_recall(images, texts, ["6", "6", "a seven"], ks=(1,))
    assert grouped == {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100.0, "mean_recall": 100.0}


def test_class_groups_count_any_item_of_the_class():
    # Two classes, two pairs each; image 1 looks like the caption of pair 2 (other class), caption 3 like image 1.
    images = one_hot([0, 3, 2, 3], 4)
    texts = one_hot([1, 0, 2, 1], 4)
    labels = [7, 7, 4, 4]
    result = grouped_pairs_recall(images, texts, labels, a_name="audio", b_name="caption", ks=(1, 2))
    # Image 0 finds caption 1 (class 7): right. Image 1 scores 0 with every caption: all tie, and ties count against
    # it, so its class's captions 0 and 1 come after captions 2 and 3: third. Image 2 finds caption 2: right. Image 3
    # scores like image 1: third.
    assert result["audio_to_caption_R@1"] == 50.0 and result["audio_to_caption_R@2"] == 50.0
    # Caption 0 (dim 1) matches nothing: ties, third. Caption 1 (dim 0) finds image 0: right. Caption 2 finds image 2:
    # right. Caption 3 (dim 1) matches nothing: ties, its class's images 2 and 3 after images 0 and 1: third.
    assert result["caption_to_audio_R@1"] == 50.0 and result["caption_to_audio_R@2"] == 50.0
    with pytest.raises(ValueError, match="one group per pair: got 4 audio items, 4 caption items and 3 groups"):
        grouped_pairs_recall(images, texts, labels[:3], a_name="audio", b_name="caption")


@pytest.mark.parametrize("integer_scores", [False, True], ids=["continuous", "many_ties"])
def test_matches_a_sort_based_count_and_does_not_depend_on_chunking(integer_scores):
    generator = torch.Generator().manual_seed(0)
    queries, candidates = torch.randn(23, 6, generator=generator), torch.randn(17, 6, generator=generator)
    if integer_scores:
        queries, candidates = queries.sign(), candidates.sign()
    targets = [torch.randperm(17, generator=generator)[: 1 + i % 3].tolist() for i in range(23)]
    ks = (1, 2, 5, 10)
    expected = sorted_rank_recall(queries, candidates, targets, ks)
    for chunk_size in (1, 5, 23, 1024):
        assert retrieval_recall(queries, candidates, targets, ks, chunk_size=chunk_size) == pytest.approx(expected)


def test_half_precision_embeddings():
    queries, candidates = score_rows([[0.9, 0.0], [0.8, 0.5]])
    result = retrieval_recall(queries.bfloat16(), candidates.bfloat16(), ks=(1,))
    assert result == {"R@1": 50.0}


def test_evaluate_module_matches_the_function():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(5, 8, generator=generator), torch.randn(10, 8, generator=generator)
    owner = [i // 2 for i in range(10)]
    expected = bidirectional_retrieval_recall(images, texts, b_to_a=owner)
    metric = load_retrieval_metric()
    metric.add_batch(embeds=texts[:4], paired_index=owner[:4])  # evaluate's incremental interface
    metric.add_batch(embeds=texts[4:], paired_index=owner[4:])
    assert metric.compute(reference_embeds=images) == pytest.approx(expected)
    # Loaded by evaluate itself from the shipped folder, with other names and ks.
    metric = evaluate.load(str(METRIC_MODULE.parent))
    result = metric.compute(
        embeds=texts, paired_index=owner, reference_embeds=images, reference_name="audio", name="caption", ks=(1, 3)
    )
    assert result == pytest.approx({
        key.replace("image", "audio").replace("text", "caption"): value
        for key, value in bidirectional_retrieval_recall(images, texts, b_to_a=owner, ks=(1, 3)).items()
    })


def test_bad_input():
    with pytest.raises(ValueError, match="counts must be equal"):
        retrieval_recall(torch.eye(2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="same dim"):
        retrieval_recall(torch.eye(2), torch.eye(3))
    with pytest.raises(ValueError, match="same dim"):
        retrieval_recall(torch.ones(2), torch.eye(2))
    with pytest.raises(ValueError, match=r"Query 1 needs at least one correct candidate in \[0, 2\)"):
        retrieval_recall(torch.eye(2), torch.eye(2), [[0], [5]])
    with pytest.raises(ValueError, match="Query 0 needs"):
        retrieval_recall(torch.eye(2), torch.eye(2), [[], [1]])
    with pytest.raises(ValueError, match="2 entries for 3 queries"):
        retrieval_recall(torch.eye(3), torch.eye(3), [[0], [1]])
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_recall(torch.eye(2), torch.eye(2), ks=(0,))
    with pytest.raises(ValueError, match="at least one query"):
        retrieval_recall(torch.ones(0, 2), torch.eye(2), [])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(torch.full((2, 2), float("nan")), torch.eye(2))
    with pytest.raises(ValueError, match="not an index of the 2 image items"):
        bidirectional_retrieval_recall(torch.eye(2), torch.eye(2), b_to_a=[0, 2])
    with pytest.raises(ValueError, match=r"image items \[1\] have no text item"):
        bidirectional_retrieval_recall(torch.eye(2), torch.eye(2), b_to_a=[0, 0])
    with pytest.raises(ValueError, match="1 entries for 2 text items"):
        bidirectional_retrieval_recall(torch.eye(2), torch.eye(2), b_to_a=[0])
