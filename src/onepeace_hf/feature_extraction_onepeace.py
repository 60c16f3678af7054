"""Feature extractor for ONE-PEACE: raw 16 kHz waveforms, normalized per clip, cropped/tiled, padded."""

import math
import numbers
import os

import numpy as np
import torch
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import PaddingStrategy, TensorType, logging

from .remote_code import SavesWithoutDanglingAutoMap


logger = logging.get_logger(__name__)


class OnePeaceFeatureExtractor(SavesWithoutDanglingAutoMap, SequenceFeatureExtractor):
    """
    Turns raw audio into ONE-PEACE `input_values` (batch, samples) float32 and `padding_mask` (batch, samples) int64,
    1 for real samples and 0 for padding (the model derives its per-frame mask from it).

    Each clip goes through the steps of the original (`librosa.load(path, sr=16000)` then the dataset code):

    1. to float32: integer PCM is scaled to [-1, 1] (int16 / 32768, uint8 (x - 128) / 128, ...); Python lists are
       read as floats;
    2. mono: a 2-D clip is averaged over its channel axis, taken to be the shorter one, so both (samples, channels)
       (soundfile) and (channels, samples) (librosa, torchaudio) work; a square clip counts as (channels, samples);
    3. resampling to `sampling_rate` (16 kHz) with soxr "HQ" if the clip's rate differs, length fixed to
       ceil(n * new_rate / old_rate) as librosa does;
    4. whole-clip normalization `(w - mean) / sqrt(var + 1e-5)` (`F.layer_norm(w, w.shape)`; in float64 for samples
       so large that float32 statistics overflow);
    5. crop to the first `max_samples` (15 s), and a clip shorter than `min_samples` (1 s) is tiled up to it;
    6. right padding of the batch with `padding_value` (0.0).

    A single array or tensor is one clip (1-D mono or 2-D multichannel); a batch is a list of clips. A 2-D array with
    the channels first, which other transformers audio processors read as a batch, gets a warning. A clip may also be
    an audio file's path, decoded with soundfile at the file's own rate block by block (steps 1 to 3 per block, with
    the same result), as images may be paths, or a `datasets` audio dict: {"array", "sampling_rate"} (decoded) or
    {"path"} (`Audio(decode=False)`).
    """

    model_input_names = ["input_values", "padding_mask"]

    def __init__(
        self,
        feature_size: int = 1,
        sampling_rate: int = 16000,
        padding_value: float = 0.0,
        do_normalize: bool = True,
        max_samples: int = 240000,
        min_samples: int = 16000,
        **kwargs,
    ):
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.do_normalize = do_normalize
        self.max_samples = max_samples
        self.min_samples = min_samples

    def __call__(
        self,
        audio,
        sampling_rate: int | None = None,
        padding: bool | str | PaddingStrategy = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | TensorType | None = None,
        do_normalize: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Prepare one clip or a list of clips (NumPy arrays, torch tensors, lists of floats, or file paths).

        `sampling_rate` (the rate of the given arrays) is required unless every clip is a file path (a file has its
        own rate): the clips are resampled to `self.sampling_rate` when it differs. `padding`, `max_length` and
        `pad_to_multiple_of` work as in `SequenceFeatureExtractor.pad`; `do_normalize` overrides the extractor's own
        setting for this call.
        Other keyword arguments a processor may forward (`truncation`, `return_attention_mask`) are ignored: the
        15 s crop is part of the model's preprocessing and the padding mask is always returned.
        """
        # A list of numbers is one clip; any other list is a batch.
        is_batch = isinstance(audio, (list, tuple)) and len(audio) > 0 and not isinstance(audio[0], numbers.Number)
        clips = audio if is_batch else [audio]
        if sampling_rate is None and not all(_carries_its_rate(clip) for clip in clips):
            raise ValueError(
                f"`sampling_rate` is required: pass the sampling rate of the given audio (ONE-PEACE expects "
                f"{self.sampling_rate} Hz; other rates are resampled to it)."
            )
        if sampling_rate is not None and (
            isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Real) or sampling_rate <= 0
        ):
            raise ValueError(f"`sampling_rate` must be a positive number of Hz, got {sampling_rate!r}.")

        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        clips = [self._prepare_clip(clip, sampling_rate, do_normalize) for clip in clips]
        if padding in (False, "do_not_pad") and len({len(clip) for clip in clips}) > 1:
            raise ValueError("Clips of different lengths can only be batched with padding (e.g. `padding=True`).")
        longest = max(len(clip) for clip in clips)
        if padding in ("max_length", PaddingStrategy.MAX_LENGTH) and max_length is not None and longest > max_length:
            raise ValueError(
                f"padding='max_length' with max_length={max_length} samples, but a clip has {longest} samples "
                f"({longest / self.sampling_rate:.2f} s at {self.sampling_rate} Hz): clips are not cut to max_length "
                f"(the extractor crops them at {self.max_samples} samples); pass a larger max_length or padding=True."
            )

        padded = self.pad(
            {"input_values": clips},
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            return_attention_mask=True,
            return_tensors="np",
        )
        features = {
            "input_values": padded["input_values"].astype(np.float32),
            "padding_mask": padded["attention_mask"].astype(np.int64),
        }
        return BatchFeature(features, tensor_type=return_tensors)

    def mono_at_model_rate(self, clip, sampling_rate=None) -> np.ndarray:
        """Steps 1 to 3 of the class docstring for one clip (an array at `sampling_rate`, or a file path): float32,
        mono, resampled to `self.sampling_rate`."""
        if isinstance(clip, dict):
            clip, sampling_rate = _unpacked(clip, sampling_rate)
        if isinstance(clip, (str, os.PathLike)):
            return _mono_file_at_rate(clip, self.sampling_rate)
        waveform = _to_float32(clip)
        if waveform.size == 0:
            raise ValueError(f"Got an empty audio clip (shape {waveform.shape}).")
        if not np.isfinite(waveform).all():
            raise ValueError(
                f"Audio clip contains {np.isnan(waveform).sum()} NaN and {np.isinf(waveform).sum()} infinite values."
            )

        if waveform.ndim == 2:
            channels_first = waveform if waveform.shape[0] <= waveform.shape[1] else waveform.T
            # (clips, samples) is a batch to transformers' other audio processors (np.stack of equal-length clips).
            if channels_first is waveform or channels_first.shape[0] > 2:
                logger.warning_once(
                    f"An audio array of shape {waveform.shape} is taken as ONE clip with {channels_first.shape[0]} "
                    "channels, mixed down. For a batch of clips pass a list of 1-D arrays."
                )
            waveform = channels_first.mean(axis=0)
        elif waveform.ndim != 1:
            raise ValueError(f"An audio clip must be 1-D (mono) or 2-D (multichannel), got shape {waveform.shape}.")

        if sampling_rate != self.sampling_rate:
            resampled = _soxr().resample(waveform, sampling_rate, self.sampling_rate, quality="HQ")
            waveform = _fixed_length(resampled, len(waveform), sampling_rate, self.sampling_rate)
        return waveform

    def _prepare_clip(self, clip, sampling_rate, do_normalize: bool) -> np.ndarray:
        """Steps 1 to 5 of the class docstring for one clip."""
        waveform = self.mono_at_model_rate(clip, sampling_rate)
        if do_normalize:
            waveform = _normalized(waveform)

        waveform = waveform[: self.max_samples]
        if len(waveform) < self.min_samples:
            waveform = np.tile(waveform, math.ceil(self.min_samples / len(waveform)))[: self.min_samples]
        return np.ascontiguousarray(waveform, dtype=np.float32)


def _carries_its_rate(clip) -> bool:
    """A file path or a `datasets` audio dict: no `sampling_rate` argument is needed for it."""
    return isinstance(clip, (str, os.PathLike, dict))


def _unpacked(clip: dict, sampling_rate):
    """(samples or path, rate) of a `datasets` audio dict; a `sampling_rate` argument must agree with the dict's."""
    if clip.get("array") is not None and clip.get("sampling_rate") is not None:
        own = clip["sampling_rate"]
        if sampling_rate is not None and sampling_rate != own:
            raise ValueError(f"`sampling_rate={sampling_rate}` contradicts the audio dict's sampling_rate {own}.")
        return clip["array"], own
    if clip.get("path") is not None:
        return clip["path"], sampling_rate
    raise ValueError(
        "An audio dict needs 'array' and 'sampling_rate' (as `datasets` decodes audio) or 'path' "
        f"(`Audio(decode=False)`); got the keys {sorted(clip)}."
    )


def _normalized(waveform: np.ndarray) -> np.ndarray:
    """`F.layer_norm` over the whole clip, in float32 as the original; float32 statistics overflow for samples
    beyond about 1e19 (the variance exceeds 3.4e38 and every value turns NaN), so such clips are normalized in
    float64 instead."""
    normalized = torch.nn.functional.layer_norm(torch.from_numpy(waveform), waveform.shape, eps=1e-5).numpy()
    if np.isfinite(normalized).all():
        return normalized
    wide = waveform.astype(np.float64)
    return ((wide - wide.mean()) / np.sqrt(wide.var() + 1e-5)).astype(np.float32)


def _fixed_length(resampled: np.ndarray, length: int, rate: float, target_rate: int) -> np.ndarray:
    """The resampled clip cut or zero-padded to ceil(length * target_rate / rate) samples, as librosa does."""
    target_length = math.ceil(length * (target_rate / rate))
    if len(resampled) >= target_length:
        return resampled[:target_length]
    return np.pad(resampled, (0, target_length - len(resampled)))


# Frames decoded at a time: 2 MB of 48 kHz stereo float32 (5.5 s), a small part of what an hour at 16 kHz takes.
_FILE_BLOCK_FRAMES = 2**18


def _mono_file_at_rate(path, target_rate: int) -> np.ndarray:
    """
    Steps 1 to 3 for an audio file, decoded by soundfile block by block, each block mixed down and fed to soxr's
    stream resampler: the recording never sits in memory at its own rate and channel count (an hour of 48 kHz stereo
    is 1.4 GB of float32, six times its 16 kHz mono form). The result is bit-identical to the same steps on the whole
    decoded file: soxr's stream gives its one-shot output, and the mixdown is per frame.

    soundfile (and soxr) are imported only here, so that the remote-code copy of this file loads without them.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Audio file {path} does not exist.")
    try:
        import soundfile  # noqa: PLC0415
    except ImportError as error:
        raise ImportError("Reading audio files needs soundfile: `pip install soundfile`, or pass arrays.") from error
    try:
        audio_file = soundfile.SoundFile(path)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"Cannot open audio file {path}: {str(error).strip()} (formats soundfile reads: "
            f"{', '.join(sorted(soundfile.available_formats()))})."
        ) from None

    with audio_file:
        rate = audio_file.samplerate
        stream = None
        if rate != target_rate:
            stream = _soxr().ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ")
        pieces, frames = [], 0
        try:
            for block in audio_file.blocks(blocksize=_FILE_BLOCK_FRAMES, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    first = frames + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                    raise ValueError(f"Audio file {path} holds NaN or infinite samples (the first at frame {first}).")
                mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0].copy()
                frames += len(mono)
                pieces.append(stream.resample_chunk(mono) if stream else mono)
        except (soundfile.LibsndfileError, RuntimeError) as error:
            raise ValueError(
                f"Audio file {path} is damaged or truncated: decoding stopped after {frames} of "
                f"{audio_file.frames} frames ({str(error).strip()})."
            ) from None
    if frames == 0:
        raise ValueError(f"Audio file {path} holds no samples.")
    if stream is not None:
        pieces.append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    waveform = np.concatenate(pieces)
    pieces.clear()
    return waveform if stream is None else _fixed_length(waveform, frames, rate, target_rate)


def _soxr():
    """soxr, needed only to resample: the remote-code copy of this file must load (and read 16 kHz audio) without it."""
    try:
        import soxr  # noqa: PLC0415
    except ImportError as error:
        raise ImportError("Resampling audio needs soxr: `pip install soxr`, or give 16 kHz audio.") from error
    return soxr


def _to_float32(clip) -> np.ndarray:
    """Convert a clip to a float32 array, scaling integer PCM to [-1, 1] as soundfile does when decoding."""
    if isinstance(clip, torch.Tensor):
        clip = clip.detach().cpu()
        clip = (clip.float() if clip.is_floating_point() else clip).numpy()  # NumPy has no bfloat16
    elif isinstance(clip, (list, tuple)):
        return np.asarray(clip, dtype=np.float32)
    clip = np.asarray(clip)
    if np.issubdtype(clip.dtype, np.floating):
        return clip.astype(np.float32)
    if np.issubdtype(clip.dtype, np.signedinteger):
        return (clip / 2.0 ** (8 * clip.dtype.itemsize - 1)).astype(np.float32)
    if np.issubdtype(clip.dtype, np.unsignedinteger):
        half = 2.0 ** (8 * clip.dtype.itemsize - 1)
        return ((clip - half) / half).astype(np.float32)
    raise TypeError(f"Audio must hold integer or floating point samples, got dtype {clip.dtype}.")


__all__ = ["OnePeaceFeatureExtractor"]
