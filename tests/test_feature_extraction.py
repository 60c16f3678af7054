"""OnePeaceFeatureExtractor against the reference `inputs.src_audios` / `inputs.audio_padding_masks`."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from onepeace_hf.audio_utils import load_audio
from onepeace_hf.feature_extraction_onepeace import OnePeaceFeatureExtractor


REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
ATOL = 1e-6


@pytest.fixture(scope="module")
def reference():
    return load_file(REFERENCE / "expected_tiny_pretrain.safetensors")


@pytest.fixture(scope="module")
def clips():
    cow, cow_rate = load_audio(REFERENCE / "assets" / "cow.flac")
    dog, dog_rate = load_audio(REFERENCE / "assets" / "dog.flac")
    assert cow_rate == dog_rate == 16000
    return cow, dog[:12000]


@pytest.fixture(scope="module")
def extractor():
    return OnePeaceFeatureExtractor()


def sine(frequency, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_frequency(waveform, rate):
    spectrum = np.abs(np.fft.rfft(waveform))
    return np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()]


def normalized(waveform):
    """Independent float64 version of the whole-clip normalization."""
    w = np.asarray(waveform, dtype=np.float64)
    return (w - w.mean()) / np.sqrt(w.var() + 1e-5)


def test_load_audio(clips):
    cow, dog = clips
    assert cow.dtype == np.float32 and cow.shape == (80000,)
    assert dog.shape == (12000,)


def test_matches_reference(extractor, clips, reference):
    batch = extractor(list(clips), sampling_rate=16000, return_tensors="pt")
    assert set(batch) == {"input_values", "padding_mask"}
    values, mask = batch["input_values"], batch["padding_mask"]
    expected = reference["inputs.src_audios"]
    assert values.shape == expected.shape == (2, 80000) and values.dtype == torch.float32
    assert (values - expected).abs().max().item() <= ATOL
    assert mask.dtype == torch.int64
    assert mask[0].eq(1).all() and mask[1, :16000].eq(1).all() and mask[1, 16000:].eq(0).all()
    assert values[1, 16000:].eq(0).all()


def test_padding_mask_gives_reference_frame_mask(extractor, clips, reference):
    """The per-frame mask the model derives from `padding_mask` (README's conv formula) is the reference one."""
    mask = extractor(list(clips), sampling_rate=16000, return_tensors="pt")["padding_mask"]
    expected = reference["inputs.audio_padding_masks"]
    for row, expected_row in zip(mask, expected):
        frames = int(row.sum())
        for kernel, stride in [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)]:
            frames = (frames - kernel) // stride + 1
        frame_padding = torch.arange(expected.shape[1]) >= frames + 1  # + CLS
        assert torch.equal(frame_padding, expected_row)


def test_sampling_rate_is_required(extractor, clips):
    with pytest.raises(ValueError, match="16000"):
        extractor(clips[0])


@pytest.mark.parametrize(
    "clip",
    [np.zeros(0, np.float32), np.zeros((2, 0), np.float32), []],
    ids=["empty", "empty-stereo", "empty-list"],
)
def test_empty_audio(extractor, clip):
    with pytest.raises(ValueError, match="empty"):
        extractor(clip, sampling_rate=16000)


@pytest.mark.parametrize("bad", [np.nan, np.inf, "all-nan"])
def test_non_finite_audio(extractor, clips, bad):
    clip = clips[0].copy()
    if bad == "all-nan":
        clip[:] = np.nan
    else:
        clip[100] = bad
    with pytest.raises(ValueError, match="NaN"):
        extractor([clips[1], clip], sampling_rate=16000)


def test_integer_pcm_is_scaled(extractor):
    pcm, rate = soundfile.read(REFERENCE / "assets" / "cow.flac", dtype="int16")
    np.testing.assert_array_equal(pcm.astype(np.float32) / 32768, load_audio(REFERENCE / "assets" / "cow.flac")[0])
    from_int = extractor(pcm, sampling_rate=rate)["input_values"]
    from_float = extractor(pcm.astype(np.float32) / 32768, sampling_rate=rate)["input_values"]
    np.testing.assert_array_equal(from_int, from_float)
    # The normalization hides the scale, so check the conversion itself without it.
    raw = OnePeaceFeatureExtractor(do_normalize=False)
    cases = [
        (pcm, pcm / 32768),
        (pcm.astype(np.int32) * 65536, pcm / 32768),
        ((pcm // 256 + 128).astype(np.uint8), (pcm // 256) / 128),
    ]
    for integers, floats in cases:
        np.testing.assert_array_equal(raw(integers, sampling_rate=rate)["input_values"][0], floats.astype(np.float32))
    # The same switch per call, both ways.
    per_call = extractor(pcm, sampling_rate=rate, do_normalize=False)["input_values"][0]
    np.testing.assert_array_equal(per_call, raw(pcm, sampling_rate=rate)["input_values"][0])
    np.testing.assert_array_equal(raw(pcm, sampling_rate=rate, do_normalize=True)["input_values"], from_int)


def test_stereo_mixdown_is_channel_mean(extractor, clips):
    left, right = clips[0][:40000], clips[0][40000:]
    mono = extractor((left + right) / 2, sampling_rate=16000)["input_values"]
    channels_first = np.stack([left, right])
    for stereo in (channels_first, channels_first.T.copy(), torch.from_numpy(channels_first)):
        np.testing.assert_allclose(extractor(stereo, sampling_rate=16000)["input_values"], mono, atol=ATOL)


def test_an_array_of_channels_first_warns_that_it_is_one_clip(extractor, clips):
    """(N, T) is a batch to most audio processors (np.stack of clips); here a single array is one clip, so its rows
    are mixed. Only (T, channels), soundfile's layout, cannot be a stack of clips."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    logger = transformers_logging.get_logger("onepeace_hf.feature_extraction_onepeace")
    transformers_logging.warning_once.cache_clear()  # another test may have given them already in this process
    two_rows = np.stack([clips[0][:20000], clips[0][20000:40000]])
    with CaptureLogger(logger) as samples_first:
        extractor(two_rows.T.copy(), sampling_rate=16000)
    assert samples_first.out == ""
    with CaptureLogger(logger) as stacked_pair:
        values = extractor(two_rows, sampling_rate=16000)["input_values"]
    assert values.shape[0] == 1 and "ONE clip with 2 channels" in stacked_pair.out
    with CaptureLogger(logger) as batch_like:
        values = extractor(np.stack([clips[0][:20000]] * 7), sampling_rate=16000)["input_values"]
    assert values.shape[0] == 1 and "ONE clip with 7 channels" in batch_like.out and "list of 1-D arrays" in batch_like.out


@pytest.mark.parametrize("rate, frequency, seconds", [(44100, 440.0, 2.0), (8000, 1000.0, 1.5), (22050, 3000.0, 1.0)])
def test_resampling(extractor, rate, frequency, seconds):
    values = extractor(sine(frequency, seconds, rate), sampling_rate=rate)["input_values"][0]
    assert values.shape == (int(seconds * 16000),)
    assert abs(peak_frequency(values, 16000) - frequency) <= 1.0
    assert abs(values.mean()) < 1e-3 and abs(values.std() - 1) < 1e-2


def test_crop_after_whole_clip_normalization(extractor):
    rng = np.random.default_rng(0)
    long_clip = (rng.standard_normal(20 * 16000) * np.linspace(0.1, 2, 20 * 16000)).astype(np.float32)
    values = extractor(long_clip, sampling_rate=16000)["input_values"][0]
    assert values.shape == (240000,)
    np.testing.assert_allclose(values, normalized(long_clip)[:240000], atol=1e-5)


def test_short_clip_is_tiled(extractor):
    short = np.random.default_rng(1).standard_normal(4800).astype(np.float32)  # 0.3 s
    batch = extractor([short], sampling_rate=16000)
    values = batch["input_values"][0]
    assert values.shape == (16000,) and batch["padding_mask"].sum() == 16000
    np.testing.assert_allclose(values, np.tile(normalized(short), 4)[:16000], atol=1e-5)


def test_input_types_agree(extractor, clips):
    dog = clips[1]
    expected = extractor(dog, sampling_rate=16000)["input_values"]
    for same in (torch.from_numpy(dog.copy()), dog.tolist(), dog.astype(np.float64)):
        np.testing.assert_array_equal(extractor(same, sampling_rate=16000)["input_values"], expected)


def test_save_and_load(tmp_path, clips):
    extractor = OnePeaceFeatureExtractor(max_samples=32000)
    extractor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = OnePeaceFeatureExtractor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == extractor.to_dict()
    assert reloaded(clips[0], sampling_rate=16000)["input_values"].shape == (1, 32000)


def write_noise(path, seconds, rate, channels, subtype="PCM_16", seed=0):
    noise = 0.2 * np.random.default_rng(seed).standard_normal((int(seconds * rate), channels))
    soundfile.write(path, noise.astype(np.float32), rate, subtype=subtype)


@pytest.mark.parametrize("rate, channels", [(44100, 2), (16000, 1), (48000, 6)])
def test_files_decoded_block_by_block_give_the_whole_file_result(extractor, tmp_path, monkeypatch, rate, channels):
    import onepeace_hf.feature_extraction_onepeace as module

    monkeypatch.setattr(module, "_FILE_BLOCK_FRAMES", 4099)  # many blocks, none aligned with soxr's own chunks
    write_noise(tmp_path / "clip.wav", 2.3, rate, channels, subtype="FLOAT")
    whole, file_rate = soundfile.read(tmp_path / "clip.wav", dtype="float32")
    mono = whole.mean(axis=1) if whole.ndim == 2 else whole
    expected = extractor(mono, sampling_rate=file_rate)["input_values"]
    np.testing.assert_array_equal(extractor(tmp_path / "clip.wav")["input_values"], expected)


def test_a_long_file_never_sits_in_memory_at_its_own_rate(extractor, tmp_path):
    """Two minutes of 48 kHz stereo is 46 MB as float32 and 7.7 MB at 16 kHz mono; NumPy allocations are traced."""
    import tracemalloc

    write_noise(tmp_path / "long.wav", 120, 48000, 2)
    decoded_bytes = 120 * 48000 * 2 * 4
    tracemalloc.start()
    try:
        values = extractor(tmp_path / "long.wav")["input_values"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert values.shape == (1, 240000)
    assert peak < decoded_bytes / 2, f"peak {peak / 2**20:.1f} MiB"


def test_huge_samples_are_normalized_in_float64(extractor):
    """float32 layer_norm overflows in the variance beyond about 1e19 and returns NaN; the original would too."""
    clip = sine(440.0, 1.0, 16000) * np.float32(1e30)
    values = extractor(clip, sampling_rate=16000)["input_values"][0]
    np.testing.assert_allclose(values, normalized(clip), atol=1e-5)


def test_unreadable_files_are_named_with_what_is_wrong(extractor, tmp_path):
    write_noise(tmp_path / "clip.flac", 3, 16000, 1)
    encoded = (tmp_path / "clip.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(encoded[: len(encoded) // 2])
    with pytest.raises(ValueError, match=r"cut\.flac is damaged or truncated: decoding stopped after \d+ of 48000"):
        extractor(tmp_path / "cut.flac")
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(ValueError, match=r"Cannot open audio file .*notes\.wav: .*formats soundfile reads: .*FLAC"):
        extractor(tmp_path / "notes.wav")
    samples = np.zeros((3000, 2), dtype=np.float32)
    samples[2500, 1] = np.inf
    soundfile.write(tmp_path / "inf.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"inf\.wav holds NaN or infinite samples \(the first at frame 2500\)"):
        extractor(tmp_path / "inf.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=r"empty\.wav holds no samples"):
        extractor(tmp_path / "empty.wav")


def test_max_length_padding_shorter_than_a_clip_is_refused_clearly():
    extractor = OnePeaceFeatureExtractor()
    clips = [np.zeros(20000, dtype=np.float32), np.zeros(30000, dtype=np.float32)]
    for batch in (clips, clips[1:]):  # numpy's own error for two, silently longer than max_length for one
        with pytest.raises(ValueError, match="max_length=25000 samples, but a clip has 30000 samples"):
            extractor(batch, sampling_rate=16000, padding="max_length", max_length=25000)
    padded = extractor(clips, sampling_rate=16000, padding="max_length", max_length=32000)["input_values"]
    assert padded.shape == (2, 32000)
