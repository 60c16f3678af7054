"""Cross-modal similarity of texts, images and audio clips with a ONE-PEACE model (used by the main demo)."""

from pathlib import Path

import torch
import torch.nn.functional as F

from .image_utils import load_image


@torch.no_grad()
def embed_all(model, processor, texts=(), image_paths=(), audio_paths=()) -> dict[str, torch.Tensor]:
    """L2-normalized embeddings of each given modality, keyed "text" / "image" / "audio"."""
    embeddings = {}
    if texts:
        inputs = processor(text=list(texts), return_tensors="pt")
        embeddings["text"] = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    if image_paths:
        images = [load_image(path) for path in image_paths]
        embeddings["image"] = model.get_image_features(processor(images=images, return_tensors="pt")["pixel_values"])
    if audio_paths:
        # One clip per call, each decoded at its own rate: padded next to a longer clip, a clip's embedding changes
        # (the padding quirk in the README).
        batches = [processor(audio=[str(path)], return_tensors="pt") for path in audio_paths]
        embeddings["audio"] = torch.cat([model.get_audio_features(b["input_values"], b["padding_mask"])
                                         for b in batches])
    return {name: F.normalize(value, dim=-1) for name, value in embeddings.items()}


def format_table(similarity: torch.Tensor, row_labels, column_labels, title: str) -> str:
    """A plain-text table of cosine similarities, rows = queries."""
    width = max(10, *(len(label) for label in column_labels)) + 2
    label_width = max(len(label) for label in row_labels) + 2
    lines = [title, " " * label_width + "".join(label.rjust(width) for label in column_labels)]
    for label, row in zip(row_labels, similarity.tolist()):
        lines.append(label.ljust(label_width) + "".join(f"{value:{width}.3f}" for value in row))
    return "\n".join(lines)


def similarity_report(model, processor, texts, image_paths, audio_paths) -> str:
    """Text-image, text-audio and image-audio cosine similarity tables."""
    embeddings = embed_all(model, processor, texts, image_paths, audio_paths)
    labels = {
        "text": [repr(t) for t in texts],
        "image": [Path(p).name for p in image_paths],
        "audio": [Path(p).name for p in audio_paths],
    }
    tables = []
    for rows, columns in (("text", "image"), ("text", "audio"), ("image", "audio")):
        if rows in embeddings and columns in embeddings:
            similarity = embeddings[rows] @ embeddings[columns].t()
            tables.append(format_table(similarity, labels[rows], labels[columns], f"{rows} x {columns} (cosine)"))
    return "\n\n".join(tables)
