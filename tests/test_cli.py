"""The `onepeace-hf` command end to end (in-process, on the tiny random model), its errors, and the pictures."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import tomllib

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open

from onepeace_hf import DEFAULT_MODEL_PATH, OnePeaceModel, OnePeaceProcessor
from onepeace_hf.cli import main
from onepeace_hf.cli.demo import REPO_ROOT, SPLIT, chance_recall
from onepeace_hf.pictures import MATCH, MISS, GridItem, retrieval_grid, similarity_heatmap

from .conftest import tiny_random_config


NAMES = ("zero", "one", "two")


def write_digit_image(path, digit: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 60, (40, 40, 3), dtype=np.uint8))
    ImageDraw.Draw(image).text((14, 10), str(digit), fill=(255, 255, 255))
    image.save(path)


def write_tone(path, frequency: float, seconds: float = 0.6, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, 0.3 * np.sin(2 * np.pi * frequency * t).astype(np.float32), rate)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A digits-style split: 3 digits x 2 images and 2 audio clips (one of each digit at 22.05 kHz)."""
    folder = tmp_path_factory.mktemp("split")
    (folder / "images").mkdir()
    (folder / "audio").mkdir()
    rows = []
    for label, name in enumerate(NAMES):
        for k in range(2):
            item = f"image-{label}{k}"
            write_digit_image(folder / "images" / f"{item}.png", label, seed=10 * label + k)
            rows.append({"id": item, "label": label, "label_name": name, "modality": "image",
                         "file": f"images/{item}.png", "caption": f"the digit {label}"})
            item = f"audio-{label}{k}"
            write_tone(folder / "audio" / f"{item}.wav", 200 + 150 * label + 20 * k, 0.4 + 0.9 * k + 0.2 * label,
                       rate=22050 if k else 16000)
            rows.append({"id": item, "label": label, "label_name": name, "modality": "audio",
                         "file": f"audio/{item}.wav", "caption": f"someone saying {name}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_random_model_dir):
    model = OnePeaceModel.from_pretrained(tiny_random_model_dir).eval()
    return model, OnePeaceProcessor.from_pretrained(tiny_random_model_dir)


def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@torch.no_grad()
def direct(loaded, modality, values):
    """Normalized embeddings computed without the CLI: one clip at a time for audio (no padding across clips)."""
    model, processor = loaded
    if modality == "text":
        features = model.get_text_features(**processor(text=list(values), return_tensors="pt"))
    elif modality == "image":
        images = [Image.open(path).convert("RGB") for path in values]
        features = model.get_image_features(processor(images=images, return_tensors="pt")["pixel_values"])
    else:
        parts = []
        for path in values:
            waveform, rate = soundfile.read(path, dtype="float32")
            parts.append(model.get_audio_features(**processor(audio=[waveform], sampling_rate=rate,
                                                              return_tensors="pt")))
        features = torch.cat(parts)
    return F.normalize(features, dim=-1)


# ---------------------------------------------------------------------------------------------------------- embed


def test_embed_writes_safetensors_with_inputs_and_exact_embeddings(capsys, tmp_path, split, tiny_random_model_dir,
                                                                  loaded):
    images = sorted((split / "images").glob("*.png"))[:3]
    audio = sorted((split / "audio").glob("*.wav"))[:3]  # 16 kHz and 22.05 kHz clips: the latter are resampled
    output = tmp_path / "out" / "embeddings.safetensors"
    code, out, err = run_cli(capsys, "embed", "--model", tiny_random_model_dir, "--text", "a dog", "a cat",
                             "--image", *images, "--audio", *audio, "--batch-size", 2, "-o", output, "-q")
    assert code == 0, err
    assert out.rstrip().endswith(": text 2, image 3, audio 3")
    with safe_open(output, "pt") as stored:
        metadata = stored.metadata()
        assert json.loads(metadata["text"]) == ["a dog", "a cat"]
        assert json.loads(metadata["image"]) == [str(p) for p in images]
        assert metadata["normalized"] == "true"
        for modality, values in (("text", ["a dog", "a cat"]), ("image", images), ("audio", audio)):
            torch.testing.assert_close(stored.get_tensor(modality), direct(loaded, modality, values),
                                       atol=1e-5, rtol=0)


def test_embed_reads_images_as_displayed_and_lets_the_processor_convert_modes(capsys, tmp_path, split,
                                                                             tiny_random_model_dir, loaded):
    upright = Image.open(sorted((split / "images").glob("*.png"))[0]).convert("RGB").crop((0, 0, 40, 24))
    upright.save(tmp_path / "upright.png")
    # A camera stores a portrait sideways and tags it (orientation 6: turn 90 degrees clockwise to display).
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    grey = np.random.default_rng(0).integers(0, 65535, (24, 40), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # 16-bit greyscale: scaled by the processor, not clipped
    files = [tmp_path / name for name in ("upright.png", "sideways.png", "grey16.png")]
    output = tmp_path / "e.npy"
    code, _, err = run_cli(capsys, "embed", "--model", tiny_random_model_dir, "--image", *files, "-o", output)
    assert code == 0, err
    model, processor = loaded
    images = [upright, upright, Image.fromarray(np.round(grey / 257).astype(np.uint8)).convert("RGB")]
    with torch.no_grad():
        expected = model.get_image_features(processor(images=images, return_tensors="pt")["pixel_values"])
    np.testing.assert_allclose(np.load(output), F.normalize(expected, dim=-1).numpy(), atol=1e-5)


def test_embed_npz_npy_and_batching_does_not_change_audio(capsys, tmp_path, split, tiny_random_model_dir):
    audio = sorted((split / "audio").glob("*.wav"))  # clips of different lengths
    list_file = tmp_path / "clips.txt"
    list_file.write_text("\n".join(str(p) for p in audio) + "\n\n")
    assert run_cli(capsys, "embed", "--model", tiny_random_model_dir, "--audio-list", list_file,
                   "--batch-size", 1, "-o", tmp_path / "one.npy")[0] == 0
    assert run_cli(capsys, "embed", "--model", tiny_random_model_dir, "--audio", split / "audio",
                   "--batch-size", 6, "-o", tmp_path / "all.npz")[0] == 0
    single = np.load(tmp_path / "one.npy")
    with np.load(tmp_path / "all.npz") as stored:
        assert stored["audio_inputs"].tolist() == [str(p) for p in audio]  # a folder expands sorted by name
        np.testing.assert_allclose(stored["audio"], single, atol=1e-5)
    assert single.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1, atol=1e-5)


def test_embed_can_leave_out_unreadable_files_and_says_which(capsys, tmp_path, split, bad_files,
                                                              tiny_random_model_dir, loaded):
    images = sorted((split / "images").glob("*.png"))[:2]
    audio = sorted((split / "audio").glob("*.wav"))[:2]
    given_images = [images[0], bad_files / "notes.png", images[1], bad_files / "counts.tif"]
    given_audio = [bad_files / "nan.wav", audio[0], bad_files / "empty.wav", audio[1]]
    output = tmp_path / "e.npz"
    code, out, err = run_cli(capsys, "embed", "--model", tiny_random_model_dir, "--image", *given_images,
                             "--audio", *given_audio, "--batch-size", 2, "-o", output, "-q", "--skip-unreadable")
    assert code == 0, err
    left_out = [given_images[1], given_images[3], given_audio[0], given_audio[2]]
    assert [line.split(": ", 1)[0] for line in err.splitlines()] == ["skipped"] * 4
    assert all(str(path) in err for path in left_out)
    assert out.rstrip().endswith(": image 2, audio 2 (4 unreadable files left out, listed above)")
    with np.load(output) as stored:
        assert stored["image_inputs"].tolist() == [str(p) for p in images]
        assert stored["audio_inputs"].tolist() == [str(p) for p in audio]
        assert sorted(stored["skipped_inputs"].tolist()) == sorted(str(p) for p in left_out)
        np.testing.assert_allclose(stored["image"], direct(loaded, "image", images).numpy(), atol=1e-5)
        np.testing.assert_allclose(stored["audio"], direct(loaded, "audio", audio).numpy(), atol=1e-5)
    code, _, err = run_cli(capsys, "embed", "--model", tiny_random_model_dir, "--image", *given_images,
                           "-o", tmp_path / "e.npy", "--skip-unreadable")
    assert code == 2 and "needs .npz or .safetensors" in err and not (tmp_path / "e.npy").exists()
    code, _, err = run_cli(capsys, "embed", "--model", tiny_random_model_dir, "--image", bad_files / "notes.png",
                           "-o", tmp_path / "none.npz", "--skip-unreadable")
    assert code == 2 and "none of the 1 image files" in err and not (tmp_path / "none.npz").exists()


def test_rank_and_classify_can_leave_out_unreadable_files(capsys, split, bad_files, tiny_random_model_dir):
    images = sorted((split / "images").glob("*.png"))[:2]
    gallery = [images[0], bad_files / "notes.png", images[1]]
    code, out, err = run_cli(capsys, "rank", "--model", tiny_random_model_dir, "--query-text", "a digit",
                             "--image", *gallery, "--top-k", 5, "-q", "--skip-unreadable")
    assert code == 0, err
    assert sorted(name for _, name in parse_ranking(out)[0]) == sorted(str(p) for p in images)
    assert err.startswith(f"skipped: cannot read image {bad_files / 'notes.png'}")
    code, out, err = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--labels", "zero", "one",
                             "--image", *gallery, "-q", "--skip-unreadable")
    assert code == 0, err
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == [str(p) for p in images]
    assert "notes.png" in err


# ----------------------------------------------------------------------------------------------------------- rank


def parse_ranking(out: str) -> list[list[tuple[float, str]]]:
    blocks = []
    for line in out.splitlines():
        if line.startswith("query "):
            blocks.append([])
        elif match := re.match(r"\s+\d+\.\s+(-?[\d.]+)\s+(.+)$", line):
            blocks[-1].append((float(match[1]), match[2]))
    return blocks


def test_rank_combined_audio_text_query_is_the_normalized_sum(capsys, tmp_path, split, tiny_random_model_dir,
                                                             loaded):
    images = sorted((split / "images").glob("*.png"))
    clip = split / "audio" / "audio-21.wav"
    grid = tmp_path / "grid.png"
    code, out, err = run_cli(capsys, "rank", "--model", tiny_random_model_dir, "--query-audio", clip,
                             "--query-text", "in the snow", "--image", split / "images", "--top-k", 4,
                             "--grid", grid, "-q")
    assert code == 0, err
    query = F.normalize(direct(loaded, "audio", [clip]) + direct(loaded, "text", ["in the snow"]), dim=-1)
    scores = (query @ direct(loaded, "image", images).T)[0]
    order = torch.sort(scores, descending=True, stable=True).indices[:4]
    (ranking,) = parse_ranking(out)
    assert [name for _, name in ranking] == [str(images[i]) for i in order]
    np.testing.assert_allclose([score for score, _ in ranking], scores[order].numpy(), atol=2e-4)
    picture = Image.open(grid)
    assert picture.mode == "RGB" and picture.width > 4 * 96 and picture.height > 96

    # Weights 3:1 lean the same query towards the audio clip.
    code, out, _ = run_cli(capsys, "rank", "--model", tiny_random_model_dir, "--query-audio", clip,
                           "--query-text", "in the snow", "--weights", 1, 3, "--image", *images, "-q")
    weighted = F.normalize(3 * direct(loaded, "audio", [clip]) + direct(loaded, "text", ["in the snow"]), dim=-1)
    expected = (weighted @ direct(loaded, "image", images).T)[0].sort(descending=True, stable=True).values[:5]
    np.testing.assert_allclose([score for score, _ in parse_ranking(out)[0]], expected.numpy(), atol=2e-4)


def test_rank_one_query_per_value_and_a_shared_part(capsys, split, tiny_random_model_dir):
    code, out, err = run_cli(capsys, "rank", "--model", tiny_random_model_dir, "--query-text", "zero", "one",
                             "--audio", split / "audio", "--top-k", 2, "-q")
    assert code == 0, err
    blocks = parse_ranking(out)
    assert len(blocks) == 2 and all(len(block) == 2 for block in blocks)
    assert "query 2: text 'one'" in out
    # Two images combined with one text: the text joins both queries.
    images = sorted((split / "images").glob("*.png"))[:2]
    code, out, err = run_cli(capsys, "rank", "--model", tiny_random_model_dir, "--query-image", *images,
                             "--query-text", "bright", "--text", "a", "b", "c", "-q")
    assert code == 0, err
    assert len(parse_ranking(out)) == 2 and f"query 2: text 'bright' + image {images[1]}" in out


# ------------------------------------------------------------------------------------------------------- classify


def test_classify_probabilities_are_softmax_of_scaled_cosine(capsys, split, tiny_random_model_dir, loaded):
    images = sorted((split / "images").glob("*.png"))[:2]
    labels = ["zero", "one", "two"]
    code, out, err = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--image", *images,
                             "--labels", *labels, "--template", "a photo of {}", "-q")
    assert code == 0, err
    model, _ = loaded
    cosine = direct(loaded, "image", images) @ direct(loaded, "text", [f"a photo of {x}" for x in labels]).T
    expected = torch.softmax(model.clamped_logit_scale().detach() * cosine, dim=-1)
    printed = {}
    current = None
    for line in out.splitlines():
        if not line.startswith("  "):
            current = line.rsplit(":", 1)[0]
            printed[current] = {}
        else:
            label, value = line.split()
            printed[current][label] = float(value)
    for path, row in zip(images, expected):
        assert printed[str(path)] == pytest.approx(dict(zip(labels, row.tolist())), abs=1e-4)
        assert out.count(f"{path}: {labels[int(row.argmax())]}") == 1


def test_classify_audio_top_k(capsys, split, tiny_random_model_dir):
    code, out, err = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--audio", split / "audio" /
                             "audio-01.wav", "--labels", "low", "mid", "high", "--top-k", 2, "-q")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and sum(float(line.split()[1]) for line in lines[1:]) < 1


def test_classify_reads_labels_from_list_files_after_the_given_ones(capsys, split, tiny_random_model_dir, tmp_path):
    clip = split / "audio" / "audio-01.wav"
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("mid\n\n  high  \n", encoding="utf-8")  # blank lines skipped, spaces trimmed
    given = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--audio", clip, "--labels", "low", "mid",
                    "high", "-q")
    listed = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--audio", clip, "--labels", "low",
                     "--labels-list", labels_file, "-q")
    assert given[0] == listed[0] == 0, listed[2]
    assert listed[1] == given[1] and len(listed[1].splitlines()) == 4


def test_list_files_with_a_byte_order_mark_or_from_standard_input(capsys, split, tiny_random_model_dir, tmp_path,
                                                                  monkeypatch):
    """Notepad and Excel's "CSV UTF-8" start files with a byte-order mark, which became part of the first label;
    `-` and pipes (`<(ls ...)`) were refused as files that do not exist."""
    import io

    clip = split / "audio" / "audio-01.wav"
    given = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--audio", clip, "--labels", "low", "mid",
                    "-q")
    (tmp_path / "labels.txt").write_bytes("\ufefflow\nmid\n".encode("utf-8"))
    with_mark = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--audio", clip, "--labels-list",
                        tmp_path / "labels.txt", "-q")
    assert with_mark == given
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"low\nmid\n")))
    from_stdin = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--audio", clip, "--labels-list", "-",
                         "-q")
    assert from_stdin == given
    read, write = os.pipe()
    os.write(write, b"low\nmid\n")
    os.close(write)
    try:
        from_pipe = run_cli(capsys, "classify", "--model", tiny_random_model_dir, "--audio", clip, "--labels-list",
                            f"/dev/fd/{read}", "-q")
    finally:
        os.close(read)
    assert from_pipe == given
    code, _, err = run_cli(capsys, "classify", "--audio", clip, "--labels-list", tmp_path, "-q")
    assert code == 2 and f"list file {tmp_path} is a folder" in err


def test_folders_skip_files_pillow_only_identifies_and_outputs_take_upper_case_suffixes(capsys, split,
                                                                                        tiny_random_model_dir,
                                                                                        tmp_path):
    """A camera folder holds videos beside the photos: Pillow identifies MPEG but cannot decode it."""
    import shutil

    photos = tmp_path / "DCIM"
    photos.mkdir()
    picture = sorted((split / "images").glob("*.png"))[0]
    shutil.copy(picture, photos / "IMG_0001.PNG")
    (photos / "MVI_0002.MPG").write_bytes(b"\x00\x00\x01\xba" + bytes(64))  # an MPEG pack header
    (photos / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    code, _, err = run_cli(capsys, "embed", "--model", tiny_random_model_dir, "--image", photos, "-o",
                           tmp_path / "out.NPZ", "-q")
    assert code == 0, err
    saved = np.load(tmp_path / "out.NPZ")
    assert list(saved["image_inputs"]) == [str(photos / "IMG_0001.PNG")]
    assert not (tmp_path / "out.NPZ.npz").exists()


# -------------------------------------------------------------------------------------------------------- convert


def test_convert_subcommand_and_its_error(capsys, tmp_path):
    from .conftest import PRETRAIN_CHECKPOINT

    if not PRETRAIN_CHECKPOINT.exists():
        pytest.skip("reference checkpoint not available")
    code, out, err = run_cli(capsys, "convert", "--checkpoint", PRETRAIN_CHECKPOINT, "--output-dir",
                             tmp_path / "converted", "--dtype", "bf16")
    assert code == 0, err
    assert "verified bit-exact" in out
    assert "%|" not in err and "Loading weights" not in err  # no progress bars when stderr is not a terminal
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["dtype"] == "bfloat16"
    code, _, err = run_cli(capsys, "convert", "--checkpoint", tmp_path / "missing.pt", "--output-dir", tmp_path / "x")
    assert code == 2 and err.startswith("error:") and "Traceback" not in err  # a missing input, as README says


def test_convert_argument_mistakes_are_one_line_errors(capsys, tmp_path):
    from onepeace_hf.cli.convert import shard_size

    from .conftest import PRETRAIN_CHECKPOINT

    assert shard_size("1000000") == 1000000 and shard_size("500MB") == "500MB" and shard_size("2gb") == "2gb"
    for wrong in ("lots", "2GiB", "0", "-5MB", "0MB", "0.0GB"):
        code, _, err = run_cli(capsys, "convert", "--checkpoint", PRETRAIN_CHECKPOINT, "--output-dir", tmp_path / "x",
                               f"--max-shard-size={wrong}")
        assert code == 2 and "expected bytes or a size such as 500MB" in err and "Traceback" not in err, wrong
    assert not (tmp_path / "x").exists()
    (tmp_path / "afile").write_text("")
    code, _, err = run_cli(capsys, "convert", "--checkpoint", PRETRAIN_CHECKPOINT, "--output-dir", tmp_path / "afile")
    assert code == 2 and err.startswith("error:") and "is a file" in err and "Traceback" not in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "convert", "--checkpoint", PRETRAIN_CHECKPOINT, "--output-dir", tmp_path / "used")
    assert code == 2 and "is not empty" in err and "--overwrite" in err
    for wrong in ("-1", "nan", "inf", "loose"):
        code, _, err = run_cli(capsys, "convert", "--checkpoint", PRETRAIN_CHECKPOINT, "--output-dir", tmp_path / "x",
                               f"--atol={wrong}")
        assert code == 2 and "--atol: expected a" in err and "Traceback" not in err, wrong
    mistakes = {
        ("--output-dir", tmp_path / "afile" / "sub"): (2, "afile is a file, not a folder"),
        ("--revision", "dev", "--private"): (2, "--private, --revision: used only with --push-to-hub"),
        ("--expected-outputs", PRETRAIN_CHECKPOINT): (1, "is not a safetensors file of recorded outputs"),
        ("--base-model", "not an id"): (1, "base_model 'not an id' is not a Hub model id"),
    }
    for options, (expected_code, fragment) in mistakes.items():
        if "--output-dir" not in options:
            options += ("--output-dir", tmp_path / "x")
        code, _, err = run_cli(capsys, "convert", "--checkpoint", PRETRAIN_CHECKPOINT, *options)
        assert (code, err.count("\n")) == (expected_code, 1) and fragment in err, (options, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "afile").is_dir()


def test_convert_reports_a_file_it_cannot_write_in_one_line(capsys, tmp_path, monkeypatch):
    """Disk full (or a permission lost midway) while the shards are written: one line, nothing left behind."""
    import onepeace_hf.sharded_safetensors as sharded_safetensors

    from .conftest import PRETRAIN_CHECKPOINT

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded_safetensors, "save_file", disk_full)
    code, _, err = run_cli(capsys, "convert", "--checkpoint", PRETRAIN_CHECKPOINT, "--output-dir", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1 and "could not read or write a file" in err and "No space left" in err
    assert list(tmp_path.iterdir()) == []


def stderr_on_a_terminal(*argv) -> str:
    """Run the CLI in a subprocess whose stderr is a pseudo-terminal (where progress bars do show) and return it."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing 0 wide
    process = subprocess.run([sys.executable, "-m", "onepeace_hf.cli", *map(str, argv)], stdout=subprocess.DEVNULL,
                             stderr=terminal, timeout=300, check=False)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal side is closed and everything has been read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_convert_quiet_hides_every_progress_bar_on_a_terminal(tmp_path):
    from .conftest import PRETRAIN_CHECKPOINT

    if not PRETRAIN_CHECKPOINT.exists():
        pytest.skip("reference checkpoint not available")
    convert = ("convert", "--checkpoint", PRETRAIN_CHECKPOINT, "--no-model-card")
    shown = stderr_on_a_terminal(*convert, "--output-dir", tmp_path / "shown")
    assert "Loading weights" in shown and "Writing shards" in shown  # bars show on a terminal without --quiet
    assert "%|" not in stderr_on_a_terminal(*convert, "--output-dir", tmp_path / "quiet", "--quiet")


# ----------------------------------------------------------------------------------------------------------- demo


def test_demo_on_a_small_split(capsys, tmp_path, split, tiny_random_model_dir):
    output = tmp_path / "demo"
    code, out, err = run_cli(capsys, "demo", "--model", tiny_random_model_dir, "--data", split,
                             "--output-dir", output, "--top-k", 3, "-q")
    assert code == 0, err
    for direction in ("text -> image", "text -> audio", "audio -> image"):
        assert re.search(rf"{direction}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+6\b", out), direction
    assert "emergent" in out
    for name in ("retrieval_grid.png", "heatmap_text_image.png", "heatmap_audio_image.png"):
        picture = Image.open(output / name)
        assert picture.mode == "RGB" and picture.width > 200 and len(picture.getcolors(1 << 20)) > 20


def test_chance_recall_is_exact():
    # 2 of 4 candidates match: a random top-1 hits half the time, a random top-3 always.
    assert chance_recall([0], [0, 0, 1, 1], 1) == pytest.approx(50.0)
    assert chance_recall([0], [0, 0, 1, 1], 3) == pytest.approx(100.0)
    assert chance_recall([0, 1], [0, 1, 1, 1], 1) == pytest.approx(50.0)  # (1/4 + 3/4) / 2


@pytest.mark.skipif(not (DEFAULT_MODEL_PATH / "config.json").exists()
                    or not (REPO_ROOT / SPLIT / "metadata.jsonl").exists(),
                    reason="the default model or the digits test split is not built yet")
def test_demo_with_no_arguments_runs_the_shipped_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default data path must not depend on the working directory
    code, out, err = run_cli(capsys, "demo", "-q")
    assert code == 0, err
    recall = {m[1]: (float(m[2]), float(m[4])) for m in
              re.finditer(r"(\w+ -> \w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out)}
    assert set(recall) == {"text -> image", "text -> audio", "audio -> image"}
    measured, chance = recall["text -> image"]
    assert measured > chance  # a trained model beats a random ranking on its own training task
    assert (tmp_path / "onepeace_demo" / "retrieval_grid.png").exists()


# --------------------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_random_model_dir):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.png").write_text("not an image")
    (folder / "notes.wav").write_text("not audio")
    soundfile.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    (folder / "no_config").mkdir()
    (folder / "bert").mkdir()
    (folder / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "classifier").mkdir()
    (folder / "classifier" / "config.json").write_text(json.dumps(
        {"model_type": "onepeace", "architectures": ["OnePeaceForImageClassification"]}))
    text_image = folder / "text_image"
    OnePeaceModel(tiny_random_config(modalities=["text", "image"])).save_pretrained(text_image)
    OnePeaceProcessor.from_pretrained(tiny_random_model_dir).save_pretrained(text_image)
    truncated = folder / "truncated"
    truncated.mkdir()
    for path in tiny_random_model_dir.iterdir():
        (truncated / path.name).write_bytes(path.read_bytes()[:100] if path.suffix == ".safetensors" else
                                            path.read_bytes())
    (folder / "folder.npy").mkdir()
    tone = 0.3 * np.sin(np.arange(16000) / 10).astype(np.float32)
    soundfile.write(folder / "nan.wav", np.where(np.arange(16000) < 8000, tone, np.nan), 16000, subtype="FLOAT")
    soundfile.write(folder / "whole.flac", np.tile(tone, 3), 16000)
    (folder / "cut.flac").write_bytes((folder / "whole.flac").read_bytes()[:-4000])
    Image.fromarray(np.full((32, 32), 10**6, dtype=np.int32)).save(folder / "counts.tif")  # 32-bit, not a picture
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "bomb.png")
    return folder


ERROR_CASES = {
    "missing image": (["embed", "--image", "{bad}/nope.png", "-o", "{tmp}/x.npy"], 2, "image file"),
    "unreadable image": (["embed", "--image", "{bad}/notes.png", "-o", "{tmp}/x.npy"], 2, "Pillow"),
    "unreadable audio": (["embed", "--audio", "{bad}/notes.wav", "-o", "{tmp}/x.npy"], 2, "soundfile"),
    "empty audio": (["classify", "--audio", "{bad}/empty.wav", "--labels", "a", "b"], 2, "no samples"),
    "NaN audio": (["embed", "--audio", "{bad}/nan.wav", "-o", "{tmp}/x.npy"], 2,
                  "nan.wav holds NaN or infinite samples (the first at frame 8000)"),
    "truncated audio": (["embed", "--audio", "{bad}/cut.flac", "-o", "{tmp}/x.npy"], 2,
                        "cut.flac is damaged or truncated: decoding stopped after"),
    "32-bit image": (["embed", "--image", "{bad}/counts.tif", "-o", "{tmp}/x.npy"], 2, "counts.tif: A mode 'I'"),
    "oversized image": (["embed", "--image", "{bad}/bomb.png", "-o", "{tmp}/x.npy"], 2, "bomb.png: Image size"),
    "unknown model": (["embed", "--text", "a", "-o", "{tmp}/x.npy", "--model", "{bad}/nowhere"], 2, "does not exist"),
    "not a model": (["embed", "--text", "a", "-o", "{tmp}/x.npy", "--model", "{bad}/no_config"], 2, "config.json"),
    "other model": (["embed", "--text", "a", "-o", "{tmp}/x.npy", "--model", "{bad}/bert"], 2, "'bert'"),
    "no projections": (["embed", "--text", "a", "-o", "{tmp}/x.npy", "--model", "{bad}/classifier"], 2,
                       "OnePeaceForImageClassification"),
    "missing modality": (["rank", "--query-text", "a", "--audio", "{bad}/empty.wav", "--model", "{bad}/text_image"],
                         2, "no audio branch"),
    "output format": (["embed", "--text", "a", "-o", "{tmp}/x.csv"], 2, ".csv"),
    "npy of two": (["embed", "--text", "a", "--image", "{bad}/notes.png", "-o", "{tmp}/x.npy"], 2, ".npz"),
    "two candidate kinds": (["rank", "--query-text", "a", "--text", "b", "--image", "{bad}/notes.png"], 2,
                            "exactly one modality"),
    "uneven combination": (["rank", "--query-text", "a", "b", "--query-image", "{bad}/notes.png", "{bad}/notes.png",
                            "{bad}/notes.png", "--text", "c"], 2, "same number"),
    "one label": (["classify", "--image", "{bad}/notes.png", "--labels", "a"], 2, "two --labels"),
    "no labels": (["classify", "--image", "{bad}/notes.png"], 2, "two --labels (or a --labels-list)"),
    "missing label list": (["classify", "--image", "{bad}/notes.png", "--labels-list", "{bad}/labels.txt"], 2,
                           "labels.txt does not exist"),
    "bad template": (["classify", "--image", "{bad}/notes.png", "--labels", "a", "b", "--template", "x"], 2, "{}"),
    "no data": (["demo", "--data", "{bad}", "--output-dir", "{tmp}/d"], 2, "metadata.jsonl"),
    "bad device": (["embed", "--text", "a", "-o", "{tmp}/x.npy", "--device", "banana"], 2, "cannot use device"),
    "zero top-k": (["rank", "--query-text", "a", "--text", "b", "--top-k", "0"], 2, "positive integer"),
    "blank label": (["classify", "--image", "{bad}/notes.png", "--labels", "a", " "], 2, "empty or blank"),
    "truncated weights": (["embed", "--text", "a", "-o", "{tmp}/x.npy", "--model", "{bad}/truncated"], 2,
                          "could not load the weights"),
    # Output paths are checked before any model runs.
    "output under a file": (["embed", "--text", "a", "-o", "{bad}/notes.png/x.npy"], 2, "cannot create"),
    "output is a folder": (["embed", "--text", "a", "-o", "{bad}/folder.npy"], 2, "is a folder"),
    "grid under a file": (["rank", "--query-text", "a", "--text", "b", "--grid", "{bad}/notes.png/g.png"], 2,
                          "cannot create"),
    "grid font": (["rank", "--query-text", "a", "--text", "b", "--grid", "{tmp}/g.png", "--grid-font",
                   "{bad}/notes.png"], 2, "notes.png: not a font file Pillow can use"),
    "demo output a file": (["demo", "--output-dir", "{bad}/notes.png"], 2, "cannot create"),
    "unwritable output": (["embed", "--text", "a", "-o", "/proc/onepeace.npy"], 1, "cannot write /proc"),
    "usage": (["rank", "--top-k"], 2, "expected one argument"),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_errors_are_one_line_without_traceback(case, capsys, tmp_path, bad_files, tiny_random_model_dir,
                                               monkeypatch):
    argv, expected_code, fragment = ERROR_CASES[case]
    argv = [arg.format(bad=bad_files, tmp=tmp_path) for arg in argv]
    if case == "oversized image":  # Pillow refuses images over twice MAX_IMAGE_PIXELS; 8 x 8 stands in for 200 MP
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    if "--model" not in argv and argv[0] != "demo":
        argv += ["--model", str(tiny_random_model_dir)]
    if argv[0] == "demo":
        argv += ["--model", str(tiny_random_model_dir)]
    code, out, err = run_cli(capsys, *argv)
    assert code == expected_code
    assert "Traceback" not in err and fragment in err
    if case not in ("usage", "zero top-k"):  # argparse prints its usage line before the message
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path, tiny_random_model_dir):
    """`onepeace-hf ... | head`: the pipe closes before the results are printed."""
    command = [sys.executable, "-m", "onepeace_hf.cli", "embed", "--text", "a", "b", "-o", str(tmp_path / "x.npy"),
               "--model", str(tiny_random_model_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the model has even loaded
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert (tmp_path / "x.npy").exists()  # the work itself was done


def test_console_script_is_declared():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["onepeace-hf"] == "onepeace_hf.cli:main"


# ------------------------------------------------------------------------------------------------------- pictures


def test_retrieval_grid_places_thumbnails_and_frames():
    red, blue = Image.new("RGB", (20, 30), (255, 0, 0)), Image.new("RGB", (50, 50), (0, 0, 255))
    queries = [GridItem(label="q", text="a long query that has to wrap over lines"), GridItem(label="q2", image=blue)]
    results = [[GridItem(label="hit", image=red, score=0.9, correct=True),
                GridItem(label="miss", waveform=np.sin(np.arange(800) / 5), score=0.1, correct=False)],
               [GridItem(label="t", text="text result")]]
    picture = retrieval_grid(queries, results, cell_size=64)
    assert picture.mode == "RGB"
    # Layout: margin 12 + cell 64 + gap 28 to the first result; header 22 from the top margin.
    first_result_x, first_row_y = 12 + 64 + 28, 12 + 22
    assert picture.getpixel((first_result_x + 32, first_row_y + 32)) == (255, 0, 0)  # thumbnail centred
    assert picture.getpixel((first_result_x + 1, first_row_y + 1)) == MATCH
    assert picture.getpixel((first_result_x + 64 + 8 + 1, first_row_y + 1)) == MISS
    second_row_y = first_row_y + 64 + 34 + 8
    assert picture.getpixel((12 + 32, second_row_y + 32)) == (0, 0, 255)
    assert picture.size == (12 + 64 + 28 + 2 * 64 + 8 + 12, second_row_y + 64 + 34 + 12)
    assert retrieval_grid(queries, results, cell_size=64).tobytes() == picture.tobytes()  # deterministic
    with pytest.raises(ValueError, match="result rows"):
        retrieval_grid(queries, results[:1])


def system_font() -> str:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 11).path
    except OSError:
        pytest.skip("DejaVu Sans is not installed (Debian: fonts-dejavu-core)")


def test_pictures_draw_characters_the_builtin_font_lacks_with_a_font_that_has_them(monkeypatch):
    """Pillow's built-in font has basic Latin only: 'café' or 'Жук' would come out as boxes, exactly like three
    noncharacters (which no font draws)."""
    from transformers.testing_utils import CaptureLogger

    from onepeace_hf import pictures

    system_font()
    image = Image.new("RGB", (20, 20), (255, 0, 0))

    def grid(label, **kwargs):
        return retrieval_grid([GridItem(label="q", image=image)], [[GridItem(label=label, image=image)]], **kwargs)

    boxes = grid("\uffff" * 3).tobytes()
    assert grid("Жук").tobytes() != boxes and grid("caf\u00e9").tobytes() != grid("caf\uffff").tobytes()
    plain = grid("dog")
    assert plain.tobytes() == grid("dog", font=None).tobytes()  # basic Latin: the built-in font, as before
    assert grid("dog", font=system_font()).tobytes() != plain.tobytes()  # an explicit font is used throughout
    heatmap = similarity_heatmap(np.eye(2), ["Жук", "b"], ["1", "2"])
    assert heatmap.tobytes() != similarity_heatmap(np.eye(2), ["\uffff" * 3, "b"], ["1", "2"]).tobytes()
    with pytest.raises(ValueError, match="Cannot use font"):
        grid("dog", font="/nonexistent/font.ttf")
    # No font here has every character of "\u72d7 \u00fcn" (a CJK one and u-umlaut): the one lacking the fewest draws
    # the umlaut, and only the CJK character is named as a box.
    with CaptureLogger(pictures.logger) as logged:
        mixed = grid("\u72d7 \u00fcn").tobytes()
    assert "\u00fc" not in logged.out, logged.out  # what DejaVu lacks (the CJK character) may be named, not more

    monkeypatch.setattr(pictures, "FALLBACK_FONTS", ())  # no font has them: drawn as boxes, and said so
    assert grid("\u72d7 \u00fcn").tobytes() != mixed
    with CaptureLogger(pictures.logger) as logged:
        assert grid("Жук").tobytes() == boxes
    assert "No font found that draws 'Жку'" in logged.out and "--grid-font" in logged.out


def test_pictures_take_tensors_of_any_dtype():
    """NumPy has no bfloat16: similarities and waveforms computed in bf16 are drawn like their float32 values."""
    similarities = torch.tensor([[0.5, -0.25], [0.125, 1.0]])
    expected = similarity_heatmap(similarities.numpy(), ["a", "b"], ["x", "y"]).tobytes()
    assert similarity_heatmap(similarities.bfloat16(), ["a", "b"], ["x", "y"]).tobytes() == expected
    waveform = torch.arange(-32, 32) / 32  # exact in bfloat16
    drawn = [retrieval_grid([GridItem(label="q", waveform=clip)], [[GridItem(label="c", text="t")]]).tobytes()
             for clip in (waveform.numpy(), waveform.bfloat16())]
    assert drawn[0] == drawn[1]


def test_similarity_heatmap_colours_follow_the_values():
    matrix = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.7]])
    picture = similarity_heatmap(matrix, ["row a", "row b"], ["col 1", "col 2", "col 3"], title="t", cell_size=40)
    assert picture.mode == "RGB" and picture.width > 3 * 40 and picture.height > 2 * 40
    again = similarity_heatmap(matrix, ["row a", "row b"], ["col 1", "col 2", "col 3"], title="t", cell_size=40)
    assert again.tobytes() == picture.tobytes()
    pixels = np.asarray(picture)
    # Find the cells by their corner colours: the lowest value gets the ramp's dark end, the highest its yellow end.
    dark, yellow = (68, 1, 84), (253, 231, 37)
    assert (pixels == dark).all(axis=-1).sum() > 100 and (pixels == yellow).all(axis=-1).sum() > 100
    with pytest.raises(ValueError, match="labels"):
        similarity_heatmap(matrix, ["a"], ["1", "2", "3"])


def test_convert_help_states_every_default(capsys):
    code, out, _ = run_cli(capsys, "convert", "--help")
    help_text = " ".join(out.split())
    assert code == 0
    # The tolerances conversion/README.md documents per dtype, and the saved dtype and shard size.
    assert "(default by --dtype: fp32 0.0001, bf16 0.1, fp16 0.02)" in help_text
    assert "(default by --dtype: fp32 0, bf16 0.05, fp16 0.01)" in help_text
    assert "(default: float32)" in help_text and "(default: 5GB)" in help_text
