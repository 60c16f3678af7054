"""Random masking for the denoising-contrast passes of pretraining, with the original's rules and ratios.

Per sample (positions exclude the CLS slot and, for text, the final </s>):
- text: whole-word masking of ceil(ratio x words) words (a word = a BPE token starting with a space and the tokens
  that continue it); the vision-language pass masks int(0.4 x tokens) tokens chosen first among those the text-only
  mask kept; the audio-language pass draws its own whole-word mask at 0.4.
- image: int(0.75 x patches) random patches; the vision-language pass masks int(0.6875 x patches): every patch the
  image-only mask kept plus random ones among those it masked.
- audio: block masking (spans of 5 frames around random centres, drawn for ratio + 0.1, then trimmed or topped up
  at random to exactly int(ratio x frames)): 0.55 for the audio-only pass, 0.45 for the audio-language pass.
Outputs follow the model's conventions: `*_mask_indices` (batch, length) bool with the CLS column first (True =
masked, padding False) and `*_preserve_ids` (batch, kept) int64 ascending kept positions, CLS = 0, padded with -1.

Randomness is per example, from (seed, epoch, example index): the same example gets the same mask in the same epoch
whatever the batch composition, process, DataLoader worker or resume point.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .modeling_onepeace import PATCH_SIZE, audio_frame_counts


# ----------------------------------------------------------------------------------------------------------------------
# Masking rules (one sample, without the CLS slot)
# ----------------------------------------------------------------------------------------------------------------------


def whole_word_mask(word_starts: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Mask ceil(ratio x words) whole words of a token sequence; word_starts[i] = token i begins a word."""
    starts = np.flatnonzero(word_starts)
    if len(starts) == 0:
        raise ValueError("Cannot mask a text without tokens: every caption needs at least one token before </s>.")
    chosen = rng.permutation(starts)[: math.ceil(len(starts) * ratio)]
    mask = np.zeros(len(word_starts), dtype=bool)
    for start in chosen:
        end = start + 1
        while end < len(word_starts) and not word_starts[end]:
            end += 1
        mask[start:end] = True
    return mask


def complementary_mask(masked: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Mask `count` positions, taken in random order first among those `masked` leaves visible, then among the rest.

    The joint passes use it so that they see what the single-modality pass hid: the vl text mask avoids the text
    mask's tokens while it can, and the vl image mask (count >= visible patches) covers every patch the image mask kept.
    """
    order = np.concatenate([rng.permutation(np.flatnonzero(~masked)), rng.permutation(np.flatnonzero(masked))])
    mask = np.zeros(len(masked), dtype=bool)
    mask[order[:count]] = True
    return mask


def random_mask(length: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Mask `count` of `length` positions uniformly at random."""
    mask = np.zeros(length, dtype=bool)
    mask[rng.permutation(length)[:count]] = True
    return mask


def block_mask(length: int, ratio: float, span: int, ratio_adjust: float, rng: np.random.Generator) -> np.ndarray:
    """Spans of `span` frames around int(length x (ratio + adjust) / span) random centres (with replacement, clipped
    at the ends), then random frames unmasked or masked until exactly int(length x ratio) are masked."""
    if length < 1:
        raise ValueError(f"Cannot block-mask {length} frames: the audio clip is too short for the feature encoder.")
    mask = np.zeros(length, dtype=bool)
    # Same float expression as the original, so the number of centres matches it at rounding boundaries.
    centres = rng.integers(0, length, int(length * ((ratio + ratio_adjust) / span)))
    offsets = np.arange(span) - span // 2
    mask[np.clip(centres[:, None] + offsets[None, :], 0, length - 1).ravel()] = True
    target = int(length * ratio)
    masked = int(mask.sum())
    if masked > target:
        mask[rng.choice(np.flatnonzero(mask), masked - target, replace=False)] = False
    elif masked < target:
        mask[rng.choice(np.flatnonzero(~mask), target - masked, replace=False)] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# Batch layout
# ----------------------------------------------------------------------------------------------------------------------


def preserve_ids_from_mask(mask_indices: torch.BoolTensor, lengths: torch.Tensor) -> torch.LongTensor:
    """Kept positions (ascending, -1 padded) of each row's first `lengths[row]` positions of `mask_indices`."""
    kept = [(~row[: int(n)]).nonzero().flatten() for row, n in zip(mask_indices, lengths)]
    preserve_ids = torch.full((len(kept), max(len(k) for k in kept)), -1, dtype=torch.long)
    for row, ids in enumerate(kept):
        preserve_ids[row, : len(ids)] = ids
    return preserve_ids


def to_batch(masks: list[np.ndarray], length: int, trailing: int = 0) -> tuple[torch.BoolTensor, torch.LongTensor]:
    """Per-sample masks (without the CLS slot) -> (mask_indices, preserve_ids) in the model's layout.

    `trailing` unmasked positions (text: the </s>) follow each sample's mask; rows are padded to `length`."""
    mask_indices = torch.zeros(len(masks), length, dtype=torch.bool)
    for row, mask in enumerate(masks):
        mask_indices[row, 1 : 1 + len(mask)] = torch.from_numpy(mask)
    lengths = torch.tensor([1 + len(mask) + trailing for mask in masks])
    return mask_indices, preserve_ids_from_mask(mask_indices, lengths)


def word_start_table(tokenizer) -> np.ndarray:
    """For every token id, whether it begins a word: special tokens and `madeupword`s do, BPE tokens do when they
    start with a space (`Ġ`), as the original's fairseq whole-word mask decides."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    specials = set(tokenizer.all_special_tokens)
    return np.array([t in specials or t.startswith(("Ġ", "madeupword")) for t in tokens], dtype=bool)


# ----------------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------------

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "input_values", "padding_mask")


@dataclass
class OnePeaceMaskingCollator:
    """Batches rows and adds the masks of one pretraining stage, named as `ImageTextPretrainingLoss` /
    `AudioTextPretrainingLoss` take them (so `loss(model, **batch)`).

    stage: "image_text" (text, image, vl passes) or "audio_text" (audio, al passes).
    Rows are either raw pairs, batched by `base_collator` (e.g. `training.data.PairCollator`), or per-example
    processor outputs (`input_ids` ending in </s>, `pixel_values` or `input_values` with an optional `padding_mask`),
    right-padded here like the tokenizer and feature extractor do (pad id 1, waveforms with 0.0).
    Randomness: rows may carry an `example_index` (the trainer adds it; with `set_epoch` this makes masks independent
    of workers, processes and resumes). Without it, examples are numbered by batch: the batch counter is in
    `state_dict()`, and DataLoader workers number their batches as the DataLoader hands them out.
    Defaults: the ratios of the original's pretraining configs.
    """

    word_starts: np.ndarray
    audio_conv_spec: list[list[int]] | None = None
    stage: str = "image_text"
    base_collator: Callable | None = None
    seed: int = 0
    text_mask_ratio: float = 0.15
    image_mask_ratio: float = 0.75
    vl_text_mask_ratio: float = 0.4
    vl_image_mask_ratio: float = 0.6875
    audio_mask_ratio: float = 0.55
    al_text_mask_ratio: float = 0.4
    al_audio_mask_ratio: float = 0.45
    audio_mask_length: int = 5
    audio_mask_ratio_adjust: float = 0.1
    pad_token_id: int = 1
    eos_token_id: int = 2
    epoch: int = 0
    batches_seen: int = 0
    uses_example_index = True

    def __post_init__(self):
        if self.stage not in ("image_text", "audio_text"):
            raise ValueError(f"stage must be 'image_text' or 'audio_text', got {self.stage!r}.")
        if self.stage == "audio_text" and not self.audio_conv_spec:
            raise ValueError("The audio_text stage needs audio_conv_spec (the model config's) to count frames.")
        ratios = {k: v for k, v in vars(self).items() if k.endswith("_mask_ratio")}
        for name, value in ratios.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if self.vl_image_mask_ratio < 1 - self.image_mask_ratio:
            raise ValueError("vl_image_mask_ratio must be >= 1 - image_mask_ratio: the vl pass masks every patch the "
                             "image pass kept.")
        self._calls = 0  # batches numbered by this copy since the last state change (workers each have a copy)

    @classmethod
    def for_model(cls, config, tokenizer=None, **kwargs) -> "OnePeaceMaskingCollator":
        """Collator for a model config (frame counts) and tokenizer (word starts; default: the package's BPE)."""
        if tokenizer is None:
            from .tokenization_onepeace import OnePeaceTokenizer  # noqa: PLC0415

            tokenizer = OnePeaceTokenizer()
        kwargs = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, **kwargs}
        return cls(word_start_table(tokenizer), config.audio_conv_spec, **kwargs)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        self.batches_seen = self._calls = 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batches_seen": self.batches_seen + self._calls}

    def load_state_dict(self, state: dict):
        self.seed, self.epoch, self.batches_seen = state["seed"], state["epoch"], state["batches_seen"]
        self._calls = 0

    def __call__(self, rows: list[dict]) -> dict:
        indices = [row.get("example_index") for row in rows]
        if any(i is None for i in indices):
            worker = torch.utils.data.get_worker_info()
            workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
            # Worker w of W gets the DataLoader's batches w, w + W, ...: this is the batch's number in the epoch.
            batch_number = self.batches_seen + self._calls * workers + worker_id
            indices = [(batch_number, position) for position in range(len(rows))]
        self._calls += 1
        rows = [{k: v for k, v in row.items() if k != "example_index"} for row in rows]
        batch = self.base_collator(rows) if self.base_collator is not None else self.pad(rows)
        return self.add_masks(batch, indices)

    def pad(self, rows: list[dict]) -> dict:
        """Per-example processor outputs -> right-padded batch (text with pad id, waveforms with 0.0)."""
        keys = [key for key in MODEL_INPUTS if key in rows[0]]
        if any(key not in row for row in rows for key in keys):
            raise ValueError(f"Every row needs the same model inputs: the first row has {keys}.")
        columns = {key: [_one_example(row[key], key) for row in rows] for key in keys}
        if "input_ids" not in columns:
            raise ValueError("Rows need input_ids (give base_collator to batch raw text/image/audio rows).")
        ids = columns["input_ids"]
        batch = {"input_ids": _pad(ids, self.pad_token_id)}
        batch["attention_mask"] = _pad(columns.get("attention_mask") or [torch.ones_like(t) for t in ids], 0)
        if "pixel_values" in columns:
            batch["pixel_values"] = torch.stack(columns["pixel_values"])
        if "input_values" in columns:
            waves = columns["input_values"]
            batch["input_values"] = _pad(waves, 0.0)
            sample_masks = columns.get("padding_mask") or [torch.ones_like(t, dtype=torch.long) for t in waves]
            batch["padding_mask"] = _pad(sample_masks, 0)
        return batch

    def add_masks(self, batch: dict, example_indices: list | None = None) -> dict:
        """`batch` (input_ids, attention_mask, and pixel_values or input_values/padding_mask) plus the masks."""
        needed = "pixel_values" if self.stage == "image_text" else "input_values"
        if "input_ids" not in batch or needed not in batch:
            raise ValueError(f"The {self.stage} stage needs input_ids and {needed}; the batch has {sorted(batch)}.")
        batch_size = batch["input_ids"].shape[0]
        example_indices = range(batch_size) if example_indices is None else example_indices
        # The key's length goes first: numpy's SeedSequence pads short keys with zeros, so example index 3 and the
        # fallback key (batch 3, position 0) would otherwise draw the same masks.
        keys = [[self.seed, self.epoch, *np.atleast_1d(i).tolist()] for i in example_indices]
        rngs = [np.random.default_rng([len(key), *key]) for key in keys]
        masks = self._text_masks(batch, rngs)
        if self.stage == "image_text":
            masks.update(self._image_masks(batch, rngs))
        else:
            masks.update(self._audio_masks(batch, rngs))
        return {**batch, **masks}

    def _text_masks(self, batch, rngs) -> dict:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        lengths = attention_mask.sum(1) if attention_mask is not None else input_ids.ne(self.pad_token_id).sum(1)
        if any(input_ids[i, int(n) - 1] != self.eos_token_id for i, n in enumerate(lengths)):
            raise ValueError(f"Every text must end with </s> (id {self.eos_token_id}) before its right padding.")
        tokens = [input_ids[i, : int(n) - 1].numpy() for i, n in enumerate(lengths)]  # without the final </s>
        length = input_ids.shape[1] + 1
        if self.stage == "image_text":
            text = [whole_word_mask(self.word_starts[t], self.text_mask_ratio, rng) for t, rng in zip(tokens, rngs)]
            joint = [complementary_mask(m, int(len(m) * self.vl_text_mask_ratio), rng) for m, rng in zip(text, rngs)]
            passes = (("text", text), ("vl_text", joint))
        else:
            joint = [whole_word_mask(self.word_starts[t], self.al_text_mask_ratio, rng) for t, rng in zip(tokens, rngs)]
            passes = (("al_text", joint),)
        out = {}
        for name, masks in passes:
            out[f"{name}_mask_indices"], out[f"{name}_preserve_ids"] = to_batch(masks, length, trailing=1)
        return out

    def _image_masks(self, batch, rngs) -> dict:
        height, width = batch["pixel_values"].shape[-2:]
        patches = (height // PATCH_SIZE) * (width // PATCH_SIZE)
        single = [random_mask(patches, int(patches * self.image_mask_ratio), rng) for rng in rngs]
        joint_count = int(patches * self.vl_image_mask_ratio)
        joint = [complementary_mask(m, joint_count, rng) for m, rng in zip(single, rngs)]
        out = {}
        for name, masks in (("image", single), ("vl_image", joint)):
            out[f"{name}_mask_indices"], out[f"{name}_preserve_ids"] = to_batch(masks, patches + 1)
        return out

    def _audio_masks(self, batch, rngs) -> dict:
        input_values, padding_mask = batch["input_values"], batch.get("padding_mask")
        if padding_mask is None:
            padding_mask = torch.ones(input_values.shape, dtype=torch.long)
        samples = padding_mask.sum(1)
        frames = audio_frame_counts(samples, self.audio_conv_spec).tolist()
        length = int(audio_frame_counts(torch.tensor(input_values.shape[1]), self.audio_conv_spec)) + 1
        out = {}
        for name, ratio in (("audio", self.audio_mask_ratio), ("al_audio", self.al_audio_mask_ratio)):
            masks = [block_mask(t, ratio, self.audio_mask_length, self.audio_mask_ratio_adjust, rng)
                     for t, rng in zip(frames, rngs)]
            out[f"{name}_mask_indices"], out[f"{name}_preserve_ids"] = to_batch(masks, length)
        return out


def _one_example(value, key: str) -> torch.Tensor:
    """One example's array; a leading dimension of 1 (a processor called on a single example) is dropped."""
    tensor = torch.as_tensor(value)
    expected_dims = 3 if key == "pixel_values" else 1
    if tensor.dim() == expected_dims + 1 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != expected_dims:
        raise ValueError(f"{key} of one example must have {expected_dims} dimension(s), got {tuple(tensor.shape)}.")
    return tensor


def _pad(tensors: list[torch.Tensor], value) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)


__all__ = [
    "OnePeaceMaskingCollator",
    "block_mask",
    "complementary_mask",
    "preserve_ids_from_mask",
    "random_mask",
    "whole_word_mask",
]
