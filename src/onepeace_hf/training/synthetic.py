"""A small synthetic paired dataset (text with image or audio) for offline tries, tests and smoke runs.

Each class has a name used in the captions, a colour (images: a coloured square on noise) and a tone (audio: a sine
at the class frequency with noise), so image-text, audio-text and, through the shared captions, audio-image
retrieval are all learnable from a few hundred examples.
"""

import datasets
import numpy as np
from PIL import Image


CLASSES = {  # name: (RGB colour, tone in Hz)
    "red": ((220, 30, 30), 220.0),
    "green": ((30, 200, 30), 330.0),
    "blue": ((30, 30, 220), 440.0),
    "yellow": ((230, 220, 30), 550.0),
    "purple": ((150, 30, 180), 660.0),
    "cyan": ((30, 210, 210), 770.0),
    "orange": ((240, 140, 20), 880.0),
    "gray": ((128, 128, 128), 990.0),
}
TEMPLATES = ("{}", "a {} one", "the {} thing", "something {}")


def synthetic_pairs(
    num_examples: int,
    modality: str = "image",
    num_classes: int = len(CLASSES),
    seed: int = 0,
    image_size: int = 32,
    sampling_rate: int = 16000,
    seconds: float = 0.5,
) -> datasets.Dataset:
    """`datasets.Dataset` with columns `text`, `label` and `image` (PIL) or `audio` ({"array", "sampling_rate"} as plain values)."""
    if modality not in ("image", "audio"):
        raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}.")
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(CLASSES)}], got {num_classes}.")
    rng = np.random.default_rng(seed)
    names = list(CLASSES)[:num_classes]
    rows = {"text": [], "label": [], modality: []}
    for i in range(num_examples):
        label = i % num_classes
        colour, tone = CLASSES[names[label]]
        rows["text"].append(TEMPLATES[rng.integers(len(TEMPLATES))].format(names[label]))
        rows["label"].append(label)
        if modality == "image":
            pixels = rng.integers(0, 256, (image_size, image_size, 3)).astype(np.float32) * 0.3
            side = image_size // 2
            top, left = rng.integers(0, image_size - side + 1, 2)
            pixels[top : top + side, left : left + side] = colour
            rows["image"].append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        else:
            t = np.arange(int(seconds * sampling_rate)) / sampling_rate
            phase = rng.uniform(0, 2 * np.pi)
            wave = 0.5 * np.sin(2 * np.pi * tone * t + phase) + 0.05 * rng.standard_normal(t.shape)
            rows["audio"].append({"array": wave.astype(np.float32), "sampling_rate": sampling_rate})
    features = datasets.Features({
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=names),
        # Plain arrays rather than datasets.Audio, whose encoding needs torchcodec/FFmpeg.
        modality: datasets.Image() if modality == "image"
        else {"array": datasets.List(datasets.Value("float32")), "sampling_rate": datasets.Value("int32")},
    })
    return datasets.Dataset.from_dict(rows, features=features)
