"""Processor for ONE-PEACE: one call prepares text, images and audio for the model."""

import numbers

import numpy as np

from transformers.processing_utils import AudioKwargs, ProcessingKwargs, ProcessorMixin

from .feature_extraction_onepeace import OnePeaceFeatureExtractor, _carries_its_rate
from .image_processing_onepeace import OnePeaceImageProcessor
from .remote_code import SavesWithoutDanglingAutoMap
from .tokenization_onepeace import OnePeaceTokenizer


class OnePeaceAudioKwargs(AudioKwargs, total=False):
    do_normalize: bool


class OnePeaceProcessorKwargs(ProcessingKwargs, total=False):
    audio_kwargs: OnePeaceAudioKwargs
    # `_defaults` on the kwargs class works on every transformers 5.x (5.17 ignores processor-level defaults).
    _defaults = {"text_kwargs": {"padding": True, "truncation": True}}


class OnePeaceProcessor(SavesWithoutDanglingAutoMap, ProcessorMixin):
    """
    Wraps [`OnePeaceTokenizer`], [`OnePeaceImageProcessor`] and [`OnePeaceFeatureExtractor`].

    `processor(text=..., images=..., audio=..., sampling_rate=..., return_tensors="pt")` returns the model's keyword
    arguments for the modalities given: `input_ids` and `attention_mask` (text), `pixel_values` (images),
    `input_values` and `padding_mask` (audio). Texts are padded to the longest and truncated to the tokenizer's
    `model_max_length` (71: 70 BPE tokens + `</s>`, the original's limit) unless told otherwise. With text and audio
    in one call, `padding`, `max_length`, `truncation` and `pad_to_multiple_of` apply to the text; give the audio's
    in `audio_kwargs={...}` (its lengths are samples).
    """

    valid_processor_kwargs = OnePeaceProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, feature_extractor=None, **kwargs):
        # Every part has working defaults, so `OnePeaceProcessor()` alone is ready to use.
        super().__init__(
            image_processor if image_processor is not None else OnePeaceImageProcessor(),
            tokenizer if tokenizer is not None else OnePeaceTokenizer(),
            feature_extractor if feature_extractor is not None else OnePeaceFeatureExtractor(),
            **kwargs,
        )

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Audio may also be file paths or `datasets` audio dicts: each is decoded and resampled at its own rate here,
        by the feature extractor's own steps (transformers would decode paths itself, with torchcodec where
        installed, and then hand over arrays without their rate). Python lists of samples are clips as for the
        feature extractor."""
        for name, value in (("text", text), ("images", images), ("audio", audio)):
            if isinstance(value, (list, tuple)) and not value:
                raise ValueError(f"`{name}` is an empty list: give at least one item, or leave `{name}` out.")
        if isinstance(text, tuple):
            text = list(text)
        audio = _lists_as_arrays(audio)
        if text is not None and audio is not None:
            kwargs = _text_length_options_to_text(kwargs)
        if audio is not None and _clips_with_their_rate(audio):
            if kwargs.get("sampling_rate") is not None:
                raise ValueError("`sampling_rate` is the rate of audio arrays; audio files and dicts carry their own.")
            extractor = self.feature_extractor
            audio = [extractor.mono_at_model_rate(clip) for clip in _clips_with_their_rate(audio)]
            kwargs["sampling_rate"] = extractor.sampling_rate
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the three parts with their own classes, so this works without the Auto-class registration."""
        return [
            OnePeaceImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            OnePeaceTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs),
            OnePeaceFeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs),
        ]


# Options transformers hands to every part that takes them, but which count tokens for text and samples for audio.
_LENGTH_OPTIONS = ("padding", "max_length", "truncation", "pad_to_multiple_of")


def _text_length_options_to_text(kwargs: dict) -> dict:
    """With text and audio in one call, top-level length options are the text's (`max_length=71` means tokens, not
    71 samples); audio ones go in `audio_kwargs`."""
    given = {name: kwargs[name] for name in _LENGTH_OPTIONS if name in kwargs}
    if not given:
        return kwargs
    rest = {name: value for name, value in kwargs.items() if name not in given}
    rest["text_kwargs"] = {**given, **kwargs.get("text_kwargs", {})}
    return rest


def _lists_as_arrays(audio):
    """A list of numbers (one clip), or a list of such lists, as float32 arrays: transformers' audio checks refuse
    Python lists of integers."""
    if not isinstance(audio, (list, tuple)) or not audio:
        return audio
    if isinstance(audio[0], numbers.Number):
        return np.asarray(audio, dtype=np.float32)
    return [np.asarray(clip, dtype=np.float32) if isinstance(clip, (list, tuple)) else clip for clip in audio]


def _clips_with_their_rate(audio) -> list | None:
    """The clips, when `audio` is one audio file path or `datasets` audio dict, or a list of them (mixing them with
    arrays is refused)."""
    clips = list(audio) if isinstance(audio, (list, tuple)) else [audio]
    own_rate = [_carries_its_rate(clip) for clip in clips]
    if any(own_rate) and not all(own_rate):
        raise ValueError("Give audio as file paths or dicts, or as arrays (with `sampling_rate`), not both in one "
                         "call.")
    return clips if clips and all(own_rate) else None


__all__ = ["OnePeaceProcessor"]
