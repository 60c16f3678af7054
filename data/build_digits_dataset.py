"""Build the tri-modal spoken/printed digits set in data/digits/ from offline sources (deterministic, seeded).

    apt-get install -y espeak-ng fonts-dejavu-core fonts-liberation fonts-freefont-ttf
    python data/build_digits_dataset.py            # writes data/digits/{train,test}/ and build_info.json

Images: the digit glyph drawn with TrueType fonts (and Pillow's built-in default font) at random sizes, rotations,
offsets, stroke widths, grey levels, blur and noise, 48x48 grayscale PNG. Audio: the digit's English name spoken by
espeak-ng with several accents, voice variants, speeds and pitches, trimmed, padded, with noise, 16 kHz mono
16-bit WAV. Every item has a caption. The train split holds image-caption and audio-caption items only (never an
audio-image pair); the test split uses fonts and voice variants that the train split never uses.

Each item is drawn from its own generator seeded by (seed, split, modality, index), so any subset can be rebuilt
alone (`render_image`, `render_audio`) and compared with the shipped files.
"""

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr
from PIL import Image, ImageDraw, ImageFilter, ImageFont


ROOT = Path(__file__).resolve().parent / "digits"
SEED = 20260
IMAGE_SIZE = 48
SAMPLING_RATE = 16000
MAX_SECONDS = 0.9
# Kept mild on purpose: with +-20 degrees, 5 px shifts and 30% inverted images, a tiny model trained from scratch on
# CPU did not get past the collapse of its contrastive loss (random image features barely separate the digits).
MAX_ANGLE, MAX_SHIFT, INVERTED_SHARE, MAX_NOISE = 10.0, 3, 0.0, 10.0
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FONT_DIR = Path("/usr/share/fonts/truetype")
PILLOW_DEFAULT = "pillow-default"  # Pillow's built-in font (ImageFont.load_default), present everywhere Pillow is

# Fonts and voices are split so that the test split's renderings and speakers are never seen in training.
FONTS = {
    "train": (
        PILLOW_DEFAULT, "dejavu/DejaVuSans.ttf", "dejavu/DejaVuSans-Bold.ttf", "dejavu/DejaVuSansCondensed-Oblique.ttf",
        "dejavu/DejaVuSerif.ttf", "dejavu/DejaVuSansMono.ttf", "dejavu/DejaVuSans-ExtraLight.ttf",
        "liberation/LiberationSans-Regular.ttf", "liberation/LiberationSans-Bold.ttf",
        "liberation/LiberationSerif-Regular.ttf", "liberation/LiberationMono-Regular.ttf",
        "liberation/LiberationSansNarrow-Regular.ttf", "freefont/FreeSans.ttf", "freefont/FreeSerifBold.ttf",
        "freefont/FreeMono.ttf", "freefont/FreeSansOblique.ttf",
    ),
    "test": (
        "dejavu/DejaVuSerif-Italic.ttf", "dejavu/DejaVuSansCondensed-Bold.ttf",
        "liberation/LiberationSerif-BoldItalic.ttf",
        "liberation/LiberationMono-Bold.ttf", "freefont/FreeSerifItalic.ttf", "freefont/FreeSansBold.ttf",
    ),
}
VOICES = {  # (espeak-ng languages, voice variants); test variants are held out, and two test accents too
    "train": (("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"),
              ("m1", "m2", "m3", "m4", "m6", "f1", "f2", "f3", "f5", "klatt")),
    "test": (("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbcwmd"), ("m5", "m7", "f4", "klatt3")),
}
# Items per class; 48x48 PNGs are ~1 KB, clips ~15 KB, which keeps the shipped set under ~6 MB.
COUNTS = {"train": {"image": 60, "audio": 24}, "test": {"image": 10, "audio": 6}}

IMAGE_CAPTIONS = (
    "{w}", "{d}", "the digit {w}", "the number {d}", "number {w}", "a picture of the digit {w}", "an image of a {d}",
    "the numeral {d}", "a printed {d}", "a {w} in {style} type", "the digit {d} in a {style} font",
)
AUDIO_CAPTIONS = (
    "{w}", "someone saying {w}", "the spoken word {w}", "a voice says {d}", "{w}, spoken aloud",
    "a recording of the number {w}", "a {gender} voice saying {w}", "the number {d} said out loud",
)


@dataclass(frozen=True)
class Item:
    split: str
    modality: str
    index: int  # within (split, modality); the label is index % 10

    @property
    def label(self) -> int:
        return self.index % len(NAMES)

    @property
    def id(self) -> str:
        return f"{self.split}-{self.modality}-{self.index:04d}"

    @property
    def file(self) -> str:
        return f"images/{self.id}.png" if self.modality == "image" else f"audio/{self.id}.wav"

    def rng(self) -> np.random.Generator:
        key = zlib.crc32(f"{self.split}/{self.modality}".encode())
        return np.random.default_rng([SEED, key, self.index])


def plan(split: str, modality: str) -> list[Item]:
    return [Item(split, modality, i) for i in range(COUNTS[split][modality] * len(NAMES))]


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == PILLOW_DEFAULT:
        return ImageFont.load_default(size=size)
    path = FONT_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; install fonts-dejavu-core fonts-liberation fonts-freefont-ttf.")
    return ImageFont.truetype(str(path), size)


def _style(font: str) -> str:
    if font == PILLOW_DEFAULT or "Sans" in font:
        return "sans-serif"
    return "monospace" if "Mono" in font else "serif"


def render_image(item: Item) -> tuple[Image.Image, dict]:
    """The item's 48x48 grayscale image and its settings (font, size, angle, ...)."""
    rng = item.rng()
    fonts = FONTS[item.split]
    font_name = fonts[rng.integers(len(fonts))]
    size = int(rng.integers(22, 40))
    angle = float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))
    stroke = int(rng.integers(0, 2)) if "Light" not in font_name else 0
    dx, dy = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 2)
    inverted = bool(rng.random() < INVERTED_SHARE)
    background, foreground = int(rng.integers(0, 80)), int(rng.integers(170, 256))
    noise = float(rng.uniform(0, MAX_NOISE))
    blur = float(rng.choice([0.0, 0.0, 0.5, 0.8]))

    big = IMAGE_SIZE * 2  # draw on a larger canvas so that rotation never clips the glyph
    glyph = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(glyph)
    font = _font(font_name, size)
    left, top, right, bottom = draw.textbbox((0, 0), str(item.label), font=font, stroke_width=stroke)
    origin = ((big - (right - left)) / 2 - left, (big - (bottom - top)) / 2 - top)
    draw.text(origin, str(item.label), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    glyph = glyph.rotate(angle, resample=Image.BILINEAR, translate=(int(dx), int(dy)))
    offset = (big - IMAGE_SIZE) // 2
    glyph = glyph.crop((offset, offset, offset + IMAGE_SIZE, offset + IMAGE_SIZE))
    if blur:
        glyph = glyph.filter(ImageFilter.GaussianBlur(blur))

    alpha = np.asarray(glyph, dtype=np.float32) / 255.0
    low, high = (foreground, background) if inverted else (background, foreground)
    pixels = low + (high - low) * alpha + rng.normal(0.0, noise, alpha.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    settings = dict(font=Path(font_name).stem, size=size, angle=round(angle, 1), stroke=stroke, inverted=inverted)
    return image, settings


def _espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install -y espeak-ng).")
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    waveform, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return waveform, rate


def render_audio(item: Item) -> tuple[np.ndarray, dict]:
    """The item's 16 kHz float waveform and its settings (voice, speed, pitch, ...)."""
    rng = item.rng()
    languages, variants = VOICES[item.split]
    voice = f"{languages[rng.integers(len(languages))]}+{variants[rng.integers(len(variants))]}"
    speed, pitch = int(rng.integers(130, 231)), int(rng.integers(20, 81))
    lead = float(rng.uniform(0.0, 0.12))
    snr_db = float(rng.uniform(15, 40))
    gain = float(rng.uniform(0.3, 0.9))

    waveform, rate = _espeak(NAMES[item.label], voice, speed, pitch)
    waveform = soxr.resample(waveform, rate, SAMPLING_RATE).astype(np.float64)
    loud = np.flatnonzero(np.abs(waveform) > 0.02 * np.abs(waveform).max())
    waveform = waveform[loud[0] : loud[-1] + 1]
    waveform = np.concatenate([np.zeros(int(lead * SAMPLING_RATE)), waveform, np.zeros(int(0.05 * SAMPLING_RATE))])
    waveform = waveform[: int(MAX_SECONDS * SAMPLING_RATE)]
    waveform = gain * waveform / np.abs(waveform).max()
    signal_power = np.mean(waveform**2)
    waveform = waveform + rng.normal(0.0, np.sqrt(signal_power / 10 ** (snr_db / 10)), waveform.shape)
    waveform = np.clip(waveform, -1.0, 1.0).astype(np.float32)
    settings = dict(voice=voice, speed=speed, pitch=pitch, snr_db=round(snr_db, 1))
    return waveform, settings


def caption(item: Item, settings: dict) -> str:
    rng = np.random.default_rng([SEED, 7, zlib.crc32(item.id.encode())])  # independent of the rendering draws
    templates = IMAGE_CAPTIONS if item.modality == "image" else AUDIO_CAPTIONS
    template = templates[rng.integers(len(templates))]
    gender = "female" if "+f" in settings.get("voice", "") else "male"
    return template.format(w=NAMES[item.label], d=item.label, style=_style(settings.get("font", "")), gender=gender)


def build_item(item: Item, split_dir: Path) -> dict:
    if item.modality == "image":
        image, settings = render_image(item)
        image.save(split_dir / item.file, optimize=True)
    else:
        waveform, settings = render_audio(item)
        soundfile.write(split_dir / item.file, waveform, SAMPLING_RATE, subtype="PCM_16")
    return {"id": item.id, "label": item.label, "label_name": NAMES[item.label], "modality": item.modality,
            "file": item.file, "caption": caption(item, settings), "source": settings}


def espeak_version() -> str:
    return subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout.strip()


def digest(root: Path) -> str:
    """sha256 over every item file and both metadata files (names and bytes), in a fixed order."""
    sha = hashlib.sha256()
    for path in sorted(root.glob("*/*/*")) + sorted(root.glob("*/metadata.jsonl")):
        sha.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return sha.hexdigest()


def build(root: Path = ROOT) -> dict:
    """Write root/{train,test}/ and root/build_info.json; return the per-split counts."""
    counts = {}
    for split in ("train", "test"):
        split_dir = root / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        (split_dir / "images").mkdir(parents=True)
        (split_dir / "audio").mkdir()
        rows = [build_item(item, split_dir) for modality in ("image", "audio") for item in plan(split, modality)]
        with open(split_dir / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        counts[split] = {m: sum(row["modality"] == m for row in rows) for m in ("image", "audio")}
    info = {"seed": SEED, "counts": counts, "espeak_ng": espeak_version(), "pillow": Image.__version__,
            "numpy": np.__version__, "soxr": soxr.__version__, "sha256": digest(root)}
    (root / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    print(build(parser.parse_args().root))


if __name__ == "__main__":
    main()
