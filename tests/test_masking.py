"""Masking collator: the original's rules (checked on the reference batches' own masks too), reproducibility."""

import math

import numpy as np
import pytest
import torch

from onepeace_hf import OnePeaceConfig, OnePeaceImageProcessor, OnePeaceProcessor, OnePeaceTokenizer
from onepeace_hf.conversion import config_from_checkpoint, convert_state_dict
from onepeace_hf.losses import AudioTextPretrainingLoss, ImageTextPretrainingLoss
from onepeace_hf.masking import (
    OnePeaceMaskingCollator,
    block_mask,
    complementary_mask,
    preserve_ids_from_mask,
    random_mask,
    whole_word_mask,
)
from onepeace_hf.modeling_onepeace_pretraining import OnePeaceForPretraining
from onepeace_hf.training.data import PairCollator
from onepeace_hf.training.synthetic import synthetic_pairs


# Token ids of "a photo of a dog playing in the snow" (9 one-token words) and "elephant", each with </s> (reference b2).
PHOTO = [10, 1345, 9, 10, 2335, 816, 11, 5, 1958, 2]
ELEPHANT = [18274, 2]
PASSES = {"image_text": ["text", "vl_text", "image", "vl_image"], "audio_text": ["al_text", "audio", "al_audio"]}


@pytest.fixture(scope="module")
def reference_config(original_checkpoint):
    return config_from_checkpoint(original_checkpoint, task="pretraining")


@pytest.fixture(scope="module")
def image_collator():
    return OnePeaceMaskingCollator.for_model(OnePeaceConfig(), stage="image_text", seed=3)


@pytest.fixture(scope="module")
def audio_collator(reference_config):
    return OnePeaceMaskingCollator.for_model(reference_config, stage="audio_text", seed=3)


def check_invariants(batch, masks, stage):
    """What every mask must satisfy, whoever drew it (our collator or the original).

    `batch`: input_ids/attention_mask (+ for audio, `frame_padding`: (batch, T + 1) bool, True = padding)."""
    text_valid = batch["attention_mask"].sum(1) + 1  # CLS + tokens + </s>
    for name in PASSES[stage]:
        mask, keep = masks[f"{name}_mask_indices"], masks[f"{name}_preserve_ids"]
        assert mask.dtype == torch.bool and keep.dtype == torch.int64
        for row in range(mask.shape[0]):
            if name.endswith("text"):
                valid = int(text_valid[row])
                assert not mask[row, valid - 1]  # </s>
            elif name.endswith("audio"):
                valid = int((~batch["frame_padding"][row]).sum())
            else:
                valid = mask.shape[1]
            assert not mask[row, 0]  # CLS
            assert not mask[row, valid:].any()  # padding is never masked ...
            kept = keep[row][keep[row] >= 0]
            assert (kept < valid).all()  # ... nor kept
            assert torch.equal(kept, (~mask[row, :valid]).nonzero().flatten())  # ascending, consistent with the mask
            assert (keep[row][len(kept):] == -1).all()
        assert keep.ne(-1).sum(1).max() == keep.shape[1]  # no all-padding column
    if stage == "image_text":
        # The vl pass masks every patch the image pass kept.
        assert not (~masks["image_mask_indices"][:, 1:] & ~masks["vl_image_mask_indices"][:, 1:]).any()
        for row in range(len(text_valid)):
            text, joint = masks["text_mask_indices"][row], masks["vl_text_mask_indices"][row]
            visible_tokens = int(text_valid[row]) - 2 - int(text.sum())  # without CLS and </s>, minus the masked
            if joint.sum() <= visible_tokens:  # the vl text mask avoids the text mask's tokens while it can
                assert not (text & joint).any()


def reference_batch(expected, batch_name, sample_padding_mask):
    ids = expected[f"pretrain.{batch_name}.src_tokens"]
    return {
        "input_ids": ids, "attention_mask": ids.ne(1).long(), "pixel_values": expected["inputs.src_images"],
        "input_values": expected["inputs.src_audios"], "padding_mask": sample_padding_mask,
    }


@pytest.mark.parametrize("batch_name", ["b1", "b2"])
@pytest.mark.parametrize("stage", ["image_text", "audio_text"])
def test_masks_match_the_reference_layout(expected, sample_padding_mask, reference_config, batch_name, stage):
    collator = OnePeaceMaskingCollator.for_model(reference_config, stage=stage)
    batch = reference_batch(expected, batch_name, sample_padding_mask)
    if stage == "image_text":
        batch.pop("input_values"), batch.pop("padding_mask")
    else:
        batch.pop("pixel_values")
    ours = collator.add_masks(batch)
    prefix = f"pretrain.{batch_name}."
    reference = {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix) and k.count(".") == 2}
    names = [k for k in ours if k.endswith(("_mask_indices", "_preserve_ids"))]
    assert sorted(names) == sorted(f"{p}_{kind}" for p in PASSES[stage] for kind in ("mask_indices", "preserve_ids"))
    for name in names:
        # Same shapes and per-row counts as the original's masks (the positions are random).
        assert ours[name].shape == reference[name].shape, name
        count = (lambda t: t.sum(1)) if ours[name].dtype == torch.bool else (lambda t: t.ne(-1).sum(1))
        assert torch.equal(count(ours[name]), count(reference[name])), name
    batch["frame_padding"] = expected["inputs.audio_padding_masks"]
    check_invariants(batch, ours, stage)
    check_invariants(batch, reference, stage)


def test_counts_by_hand_on_per_example_rows(image_collator, audio_collator):
    # Rows of different lengths, as a processor returns them one by one: padded here.
    image_rows = [
        {"input_ids": PHOTO, "pixel_values": torch.zeros(3, 256, 256)},
        {"input_ids": torch.tensor([ELEPHANT]), "pixel_values": torch.zeros(1, 3, 256, 256)},  # leading batch dim
    ]
    batch = image_collator(image_rows)
    assert batch["input_ids"].tolist() == [PHOTO, ELEPHANT + [1] * 8]
    assert batch["attention_mask"].tolist() == [[1] * 10, [1, 1] + [0] * 8]
    # 9 words: ceil(9 x 0.15) = 2 masked, vl int(9 x 0.4) = 3; one word: ceil(0.15) = 1, vl int(0.4) = 0.
    assert batch["text_mask_indices"].sum(1).tolist() == [2, 1]
    assert batch["vl_text_mask_indices"].sum(1).tolist() == [3, 0]
    # 256 patches: int(256 x 0.75) = 192 masked, vl int(256 x 0.6875) = 176.
    assert batch["image_mask_indices"].sum(1).tolist() == [192, 192]
    assert batch["vl_image_mask_indices"].sum(1).tolist() == [176, 176]
    assert batch["image_preserve_ids"].shape == (2, 65) and batch["vl_image_preserve_ids"].shape == (2, 81)
    check_invariants(batch, batch, "image_text")

    # Reference conv stack (strides 5, 2, 2, 2, 2, 2, 2): 80000 samples -> 249 frames, 16000 -> 49.
    audio_rows = [
        {"input_ids": ELEPHANT, "input_values": torch.randn(16000)},
        {"input_ids": PHOTO, "input_values": np.zeros(80000, dtype=np.float32)},
    ]
    batch = audio_collator(audio_rows)
    assert batch["input_values"].shape == (2, 80000) and batch["input_values"][0, 16000:].eq(0).all()
    assert batch["padding_mask"].sum(1).tolist() == [16000, 80000]
    # int(49 x 0.55) = 26, int(249 x 0.55) = 136; int(49 x 0.45) = 22, int(249 x 0.45) = 112; al text as above at 0.4.
    assert batch["audio_mask_indices"].sum(1).tolist() == [26, 136]
    assert batch["al_audio_mask_indices"].sum(1).tolist() == [22, 112]
    assert batch["al_text_mask_indices"].sum(1).tolist() == [1, 4]  # ceil(1 x 0.4), ceil(9 x 0.4)
    assert batch["audio_mask_indices"].shape == (2, 250)
    frame_padding = torch.ones(2, 250, dtype=torch.bool)
    frame_padding[0, :50], frame_padding[1, :] = False, False
    check_invariants({**batch, "frame_padding": frame_padding}, batch, "audio_text")


def test_whole_word_mask_groups_bpe_pieces():
    tokenizer = OnePeaceTokenizer()
    ids = tokenizer("a photograph antidisestablishmentarianism")["input_ids"]
    # By hand: the last word is split into 5 BPE pieces, only the first of them carries the leading space.
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "Ġa", "Ġphotograph", "Ġant", "idis", "establishment", "arian", "ism", "</s>"
    ]
    collator = OnePeaceMaskingCollator.for_model(OnePeaceConfig())
    starts = collator.word_starts[ids[:-1]]
    assert starts.tolist() == [True, True, True, False, False, False, False]
    assert collator.word_starts[[0, 1, 2, 3]].all()  # <s>, <pad>, </s>, <unk>: special symbols begin words
    words = {(0,), (1,), (2, 3, 4, 5, 6)}
    seen = set()
    for seed in range(20):
        mask = whole_word_mask(starts, 0.5, np.random.default_rng(seed))  # ceil(3 x 0.5) = 2 whole words
        chosen = {word for word in words if mask[list(word)].all()}
        assert len(chosen) == 2 and mask.sum() == sum(len(w) for w in chosen)  # never half a word
        seen.add(frozenset(chosen))
    assert len(seen) == 3  # all three choices of 2 words out of 3 occur
    with pytest.raises(ValueError, match="without tokens"):
        whole_word_mask(np.zeros(0, dtype=bool), 0.15, np.random.default_rng(0))


def test_single_rules_by_hand():
    rng = np.random.default_rng(0)
    first = np.array([True, False, False, True, False])
    assert complementary_mask(first, 3, rng).tolist() == [False, True, True, False, True]
    joint = complementary_mask(first, 4, rng)
    assert joint[~first].all() and joint.sum() == 4
    assert random_mask(10, 7, rng).sum() == 7
    for length, ratio, masked in ((7, 0.45, 3), (7, 0.55, 3), (49, 0.55, 26), (249, 0.45, 112), (249, 0.55, 136)):
        for seed in range(3):
            assert block_mask(length, ratio, 5, 0.1, np.random.default_rng(seed)).sum() == masked
    with pytest.raises(ValueError, match="too short"):
        block_mask(0, 0.55, 5, 0.1, rng)


def test_preserve_ids_from_mask_by_hand():
    mask = torch.tensor([[False, True, False, True, False], [False, False, True, False, False]])
    assert preserve_ids_from_mask(mask, torch.tensor([5, 3])).tolist() == [[0, 2, 4], [0, 1, -1]]


def test_reproducible_per_example_and_epoch(image_collator):
    ids = torch.tensor([PHOTO, PHOTO])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.zeros(2, 3, 64, 64)}
    a = image_collator.add_masks(batch, [3, 5])
    b = image_collator.add_masks({k: v.flip(0) for k, v in batch.items()}, [5, 3])
    for name in ("image_mask_indices", "vl_image_mask_indices", "text_mask_indices", "vl_text_mask_indices"):
        assert torch.equal(a[name], b[name].flip(0))  # follows the example, not its place in the batch
    assert not torch.equal(a["image_mask_indices"][0], a["image_mask_indices"][1])
    collator = OnePeaceMaskingCollator.for_model(OnePeaceConfig(), seed=3)
    collator.set_epoch(1)
    assert not torch.equal(a["image_mask_indices"], collator.add_masks(batch, [3, 5])["image_mask_indices"])
    other_seed = OnePeaceMaskingCollator.for_model(OnePeaceConfig(), seed=4).add_masks(batch, [3, 5])
    assert not torch.equal(a["image_mask_indices"], other_seed["image_mask_indices"])


def image_rows(count):
    return [{"input_ids": PHOTO, "pixel_values": torch.zeros(3, 64, 64)} for _ in range(count)]


def test_batch_counter_resumes_from_state_dict():
    first = OnePeaceMaskingCollator.for_model(OnePeaceConfig(), seed=1)
    batches = [first(image_rows(2)) for _ in range(3)]
    assert not torch.equal(batches[0]["image_mask_indices"], batches[1]["image_mask_indices"])
    resumed = OnePeaceMaskingCollator.for_model(OnePeaceConfig(), seed=0)
    fresh = OnePeaceMaskingCollator.for_model(OnePeaceConfig(), seed=1)
    fresh(image_rows(2))
    resumed.load_state_dict(fresh.state_dict())
    assert resumed.state_dict() == {"seed": 1, "epoch": 0, "batches_seen": 1}
    for expected_batch in batches[1:]:
        assert torch.equal(resumed(image_rows(2))["image_mask_indices"], expected_batch["image_mask_indices"])
    resumed.set_epoch(1)
    assert resumed.state_dict() == {"seed": 1, "epoch": 1, "batches_seen": 0}


@pytest.mark.parametrize("with_index", [True, False])
def test_dataloader_workers_draw_the_same_masks(with_index):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({
        "input_ids": [PHOTO, ELEPHANT, PHOTO, ELEPHANT, PHOTO[:4] + [2], PHOTO[3:]],
        "pixel_values": np.zeros((6, 3, 32, 32), dtype=np.float32).tolist(),
    }).with_format("torch")
    if with_index:
        dataset = dataset.add_column("example_index", list(range(6)))

    def masks(num_workers):
        collator = OnePeaceMaskingCollator.for_model(OnePeaceConfig(), seed=5)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collator, num_workers=num_workers)
        return [torch.cat([b["text_mask_indices"], b["image_mask_indices"]], 1) for b in loader]

    serial, parallel = masks(0), masks(2)
    assert all(torch.equal(s, p) for s, p in zip(serial, parallel, strict=True))
    assert not torch.equal(serial[0], serial[1])  # the same texts and images, but other examples


def test_bad_input():
    with pytest.raises(ValueError, match="stage"):
        OnePeaceMaskingCollator.for_model(OnePeaceConfig(), stage="video_text")
    with pytest.raises(ValueError, match="vl_image_mask_ratio"):
        OnePeaceMaskingCollator.for_model(OnePeaceConfig(), vl_image_mask_ratio=0.1)
    with pytest.raises(ValueError, match="text_mask_ratio must be in"):
        OnePeaceMaskingCollator.for_model(OnePeaceConfig(), text_mask_ratio=1.5)
    collator = OnePeaceMaskingCollator.for_model(OnePeaceConfig())
    with pytest.raises(ValueError, match="must end with </s>"):
        collator([{"input_ids": PHOTO[:-1], "pixel_values": torch.zeros(3, 32, 32)}])
    with pytest.raises(ValueError, match="pixel_values of one example"):
        collator([{"input_ids": PHOTO, "pixel_values": torch.zeros(2, 3, 32, 32)}])
    with pytest.raises(ValueError, match="image_text stage needs input_ids and pixel_values"):
        collator([{"input_ids": PHOTO, "input_values": torch.zeros(16000)}])
    with pytest.raises(ValueError, match="same model inputs"):
        collator([{"input_ids": PHOTO, "attention_mask": [1] * 10}, {"input_ids": PHOTO}])
    with pytest.raises(ValueError, match="Rows need input_ids"):
        collator([{"text": "a dog"}])


@pytest.fixture(scope="module")
def pretraining_model(original_checkpoint, reference_config):
    with torch.device("meta"):
        keys = set(OnePeaceForPretraining(reference_config).state_dict())
    model = OnePeaceForPretraining._from_config(reference_config)
    model.load_state_dict(convert_state_dict(original_checkpoint["model"], reference_config, keys, task="pretraining"))
    return model.eval()


@pytest.mark.parametrize("stage", ["image_text", "audio_text"])
def test_collated_batches_feed_the_pretraining_losses(pretraining_model, stage):
    processor = OnePeaceProcessor(image_processor=OnePeaceImageProcessor(size={"height": 64, "width": 64}))
    modality = "image" if stage == "image_text" else "audio"
    pairs = synthetic_pairs(2, modality, seed=0)
    rows = [{**pairs[i], "text": ["a red square on noise", "the green thing"][i], "example_index": i} for i in range(2)]
    base = PairCollator(processor, **{f"{modality}_column": modality})
    collator = OnePeaceMaskingCollator.for_model(pretraining_model.config, stage=stage, base_collator=base)
    batch = collator(rows)
    criterion = ImageTextPretrainingLoss() if stage == "image_text" else AudioTextPretrainingLoss()
    with torch.no_grad():
        out = criterion(pretraining_model, **batch)
    assert math.isfinite(out["loss"].item())
    assert not out.get("skipped")  # multi-word captions: every denoising term has masked tokens
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))
