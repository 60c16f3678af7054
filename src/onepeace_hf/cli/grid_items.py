"""Command-line inputs as cells of a retrieval grid (`onepeace_hf.pictures.GridItem`)."""

from pathlib import Path

from ..pictures import GridItem
from .inputs import read_audio, read_image


def grid_item(modality: str, value, label: str | None = None, score: float | None = None,
              correct: bool | None = None) -> GridItem:
    """A text, an image file or an audio file as one cell; files are labelled with their name unless told."""
    if modality == "text":
        return GridItem(label=label or "text", text=str(value), score=score, correct=correct)
    label = label or Path(value).name
    if modality == "image":
        return GridItem(label=label, image=read_image(Path(value)), score=score, correct=correct)
    waveform, _ = read_audio(Path(value))
    if waveform.ndim == 2:
        waveform = waveform.mean(axis=1)
    return GridItem(label=label, waveform=waveform, score=score, correct=correct)


def combined_item(parts: list[tuple[str, object]], label: str | None = None) -> GridItem:
    """One cell for a query made of several parts: the first image (else audio) as the picture, texts on a band."""
    texts = [str(value) for modality, value in parts if modality == "text"]
    media = [(modality, value) for modality, value in parts if modality != "text"]
    if not media:
        return GridItem(label=label or "text", text=" + ".join(texts))
    modality, value = sorted(media, key=lambda part: part[0] != "image")[0]
    item = grid_item(modality, value, label=label)
    item.text = " + ".join(texts) or None
    return item
