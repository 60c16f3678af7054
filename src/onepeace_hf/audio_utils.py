"""Audio file loading for ONE-PEACE, with soundfile only (no librosa/torchaudio)."""

import os

import numpy as np
import soundfile


def load_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """
    Decode an audio file to float32 in [-1, 1] and return `(waveform, sampling_rate)`.

    The waveform is (samples,) for mono and (samples, channels) otherwise, as soundfile gives it; no resampling or
    mixdown happens here, so pass the result with its rate to `OnePeaceFeatureExtractor`, which does both the way the
    original (`librosa.load(path, sr=16000)`) did.
    """
    waveform, sampling_rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=False)
    return waveform, sampling_rate


__all__ = ["load_audio"]
