"""From `datasets` rows to model batches: raw text / image / audio columns through the ONE-PEACE processor."""

import io
import os
from dataclasses import dataclass

import numpy as np
import soundfile
from PIL import Image

from ..audio_utils import load_audio
from ..image_utils import load_image


def as_image(value) -> Image.Image:
    """A `datasets` Image value (PIL; {"bytes", "path"} with decode=False), a path (read as displayed,
    `load_image`), or an (H, W, 3) uint8 array -> PIL image, in its own mode: the image processor converts it to RGB
    (16-bit greyscale scaled, not clipped)."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):  # datasets.Image(decode=False)
        value = load_image(io.BytesIO(value["bytes"])) if value.get("bytes") else value["path"]
    if isinstance(value, (str, os.PathLike)):
        value = load_image(value)
    elif isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    if not isinstance(value, Image.Image):
        raise ValueError(f"Cannot read an image from {type(value).__name__}; give a PIL image, a path or an array.")
    return value


def as_audio(value) -> tuple[np.ndarray, int]:
    """A `datasets` Audio value ({"array", "sampling_rate"}; {"bytes", "path"} with decode=False; or a decoder with
    `get_all_samples()`) or a path ->
    (float32 waveform, sampling rate); the feature extractor does mixdown and resampling."""
    if isinstance(value, (str, os.PathLike)):
        return load_audio(value)
    if hasattr(value, "get_all_samples"):  # datasets >= 4 decodes audio lazily with torchcodec
        samples = value.get_all_samples()
        return samples.data.T.numpy().astype(np.float32), int(samples.sample_rate)
    if isinstance(value, dict) and value.get("array") is None and (value.get("bytes") or value.get("path")):
        # datasets.Audio(decode=False): encoded bytes or a file path, decoded with soundfile.
        if not value.get("bytes"):
            return load_audio(value["path"])
        waveform, rate = soundfile.read(io.BytesIO(value["bytes"]), dtype="float32", always_2d=False)
        return waveform, rate
    if isinstance(value, dict) and "array" in value and "sampling_rate" in value:
        return np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    raise ValueError(f"Cannot read audio from {type(value).__name__}; give a datasets Audio value or a path.")


def _file_path(value) -> str | os.PathLike | None:
    """The audio file a value only names (a path; `datasets.Audio(decode=False)` without bytes), else None."""
    if isinstance(value, (str, os.PathLike)):
        return value
    if isinstance(value, dict) and value.get("array") is None and not value.get("bytes") and value.get("path"):
        return value["path"]
    return None


def audio_inputs(processor, values: list) -> dict:
    """`input_values` / `padding_mask` of one batch of audio values (see `as_audio`), at any sampling rates.

    Files are handed to the feature extractor as paths: it decodes, mixes down and resamples them block by block,
    so an hour-long recording never sits in memory at its own rate and channel count."""
    paths = [_file_path(value) for value in values]
    clips = [path if path is not None else as_audio(value) for path, value in zip(paths, values)]
    rates = {clip[1] for clip in clips if isinstance(clip, tuple)}
    if len(rates) == 1 and all(path is None for path in paths):
        return dict(processor(audio=[w for w, _ in clips], sampling_rate=rates.pop(), return_tensors="pt"))
    # Files or mixed rates: every clip is resampled and normalized on its own anyway, so preparing them one by one
    # and padding afterwards gives what one call at a common rate would.
    extractor = getattr(processor, "feature_extractor", processor)  # a processor, or the feature extractor itself

    def prepared_clip(clip) -> np.ndarray:
        batch = extractor(clip[0], sampling_rate=clip[1]) if isinstance(clip, tuple) else extractor(clip)
        return batch["input_values"][0]

    prepared = [prepared_clip(clip) for clip in clips]
    padded = extractor.pad({"input_values": prepared}, padding=True, return_attention_mask=True, return_tensors="pt")
    return {"input_values": padded["input_values"].float(), "padding_mask": padded["attention_mask"].long()}


@dataclass
class PairCollator:
    """Collates (text, image) or (text, audio) rows into `input_ids`/`attention_mask` plus `pixel_values` or
    `input_values`/`padding_mask`, ready for [`RetrievalContrastiveLoss`] or the masking collator."""

    processor: object
    text_column: str = "text"
    image_column: str | None = None
    audio_column: str | None = None

    def __post_init__(self):
        if (self.image_column is None) == (self.audio_column is None):
            raise ValueError("Give exactly one of image_column and audio_column.")

    def __call__(self, rows: list[dict]) -> dict:
        texts = [row[self.text_column] for row in rows]
        if self.image_column is not None:
            images = [as_image(row[self.image_column]) for row in rows]
            return dict(self.processor(text=texts, images=images, return_tensors="pt"))
        audio = audio_inputs(self.processor, [row[self.audio_column] for row in rows])
        return {**self.processor(text=texts, return_tensors="pt"), **audio}
