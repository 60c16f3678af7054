"""Pictures of retrieval results and similarity matrices, drawn with Pillow alone (no matplotlib dependency).

Both functions are deterministic for a given Pillow version (they use Pillow's built-in default font), so pictures
of the same results are byte-identical and can be compared in tests. That font draws basic Latin only (no accents,
no other scripts): text it lacks characters for is drawn with a system font that has them (DejaVu Sans, Noto Sans,
Arial Unicode, when installed), or with the font file passed as `font`.
"""

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from transformers.utils import logging


logger = logging.get_logger(__name__)


BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
PANEL = (238, 240, 244)
# Frame colours of a retrieved item: right / wrong / unknown (no ground truth given).
MATCH, MISS, NEUTRAL = (30, 150, 60), (205, 45, 45), (170, 170, 170)
# A perceptually ordered dark-blue -> teal -> yellow ramp (the anchor colours of viridis), so that a printed
# heatmap stays readable in greyscale.
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)


@dataclass
class GridItem:
    """One cell of [`retrieval_grid`]: an image, an audio clip or a text, with what to write under it.

    image: shown as a thumbnail. waveform: a 1-D array drawn as its envelope (audio has no picture of its own).
    text: drawn inside the cell (a text query or candidate), or, with an image or waveform, on a band across its
        bottom (the text part of a combined query). label: the caption line under the cell (a file name,
    class name). score: the similarity, written under the label. correct: frames the cell green (True) or red
    (False); None leaves a grey frame.
    """

    label: str = ""
    image: Image.Image | None = None
    waveform: np.ndarray | None = None
    text: str | None = None
    score: float | None = None
    correct: bool | None = None


# Tried in order when the built-in font lacks a character (Pillow looks for them in the system's font folders).
FALLBACK_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial Unicode.ttf", "arialuni.ttf")


def _glyph(font, character: str) -> tuple:
    mask = font.getmask(character)
    return mask.size, bytes(mask)


def _missing_characters(font, texts: Iterable[str]) -> str:
    """The characters of `texts` that `font` draws as its placeholder box (what it draws for a noncharacter)."""
    box = _glyph(font, "\uffff")
    characters = {c for text in texts for c in text if not c.isspace()}
    return "".join(sorted(c for c in characters if _glyph(font, c) == box))


def _font_file(texts: Iterable[str], font: str | os.PathLike | None) -> str | os.PathLike | None:
    """The font file to draw `texts` with; None for the built-in font, kept whenever it has every character."""
    if font is not None:
        return font
    missing = _missing_characters(ImageFont.load_default(size=13), texts)
    if not missing:
        return None
    best, still_missing = None, missing  # the font that lacks the fewest (a file name mixing é and 狗)
    for name in FALLBACK_FONTS:
        try:
            lacking = _missing_characters(ImageFont.truetype(name, 13), missing)
        except OSError:
            continue
        if len(lacking) < len(still_missing):
            best, still_missing = name, lacking
    if still_missing:
        logger.warning(
            f"No font found that draws {still_missing[:20]!r}; they show as boxes. Pass font= (--grid-font) a font "
            "file with them (e.g. a Noto Sans file for the script)."
        )
    return best


def _fonts(texts: Iterable[str], font: str | os.PathLike | None, *sizes: int) -> list:
    """Fonts of the given pixel sizes for drawing `texts` (see `_font_file`)."""
    file = _font_file(texts, font)
    try:
        return [ImageFont.load_default(size=size) if file is None else ImageFont.truetype(file, size) for size in sizes]
    except OSError as error:
        raise ValueError(f"Cannot use font {file}: {error}") from None


def _text_width(font, text: str) -> float:
    return font.getlength(text)


def _fit(font, text: str, width: int) -> str:
    """`text` with its middle replaced by ".." so that it fits in `width` pixels: the ends of file names
    ("...-0075.png") tell items apart better than their common beginnings."""
    if _text_width(font, text) <= width:
        return text
    head, tail = text[: (len(text) + 1) // 2], text[(len(text) + 1) // 2 :]
    while (head or tail) and _text_width(font, f"{head}..{tail}") > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return f"{head}..{tail}"


def _wrap(font, text: str, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines of `width` pixels (the last one cut with an ellipsis)."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if _text_width(font, candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])]
    return [_fit(font, line, width) for line in lines]


def _as_float64(values) -> np.ndarray:
    """A float64 array of a torch tensor on any device and of any dtype (NumPy has no bfloat16), or of an array."""
    if hasattr(values, "detach"):
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64)


def _draw_waveform(draw: ImageDraw.ImageDraw, waveform: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """The clip's min/max envelope per pixel column, scaled to the box height."""
    left, top, right, bottom = box
    draw.rectangle(box, fill=PANEL)
    samples = _as_float64(waveform).reshape(-1)
    if samples.size == 0:
        return
    peak = float(np.abs(samples).max()) or 1.0
    middle, half = (top + bottom) / 2, (bottom - top) / 2 - 2
    columns = np.array_split(samples / peak, max(1, right - left))
    for x, column in enumerate(columns):
        if column.size:
            draw.line([(left + x, middle - column.max() * half), (left + x, middle - column.min() * half)],
                      fill=(50, 90, 160))


def _draw_cell(canvas: Image.Image, item: GridItem, x: int, y: int, size: int, fonts) -> None:
    draw = ImageDraw.Draw(canvas)
    small, body = fonts
    frame = NEUTRAL if item.correct is None else (MATCH if item.correct else MISS)
    box = (x, y, x + size - 1, y + size - 1)
    if item.image is not None:
        # contain() also enlarges: small pictures (48-px digits) would otherwise be lost in the cell.
        thumbnail = ImageOps.contain(item.image.convert("RGB"), (size - 6, size - 6), Image.Resampling.BICUBIC)
        draw.rectangle(box, fill=PANEL)
        canvas.paste(thumbnail, (x + (size - thumbnail.width) // 2, y + (size - thumbnail.height) // 2))
    elif item.waveform is not None:
        _draw_waveform(draw, item.waveform, box)
        draw.text((x + 5, y + 4), "audio", font=small, fill=MUTED)
    else:
        draw.rectangle(box, fill=PANEL)
        lines = _wrap(body, item.text or "", size - 10, max_lines=max(1, (size - 8) // 16))
        for i, line in enumerate(lines):
            draw.text((x + 5, y + 5 + 16 * i), line, font=body, fill=INK)
    if item.text and (item.image is not None or item.waveform is not None):
        # A combined query (say audio + text): the text goes on a band across the bottom of the picture.
        lines = _wrap(body, f"+ {item.text}", size - 10, max_lines=2)
        band_top = y + size - 8 - 16 * len(lines)
        draw.rectangle((x, band_top, x + size - 1, y + size - 1), fill=BACKGROUND)
        for i, line in enumerate(lines):
            draw.text((x + 5, band_top + 3 + 16 * i), line, font=body, fill=INK)
    draw.rectangle(box, outline=frame, width=3)
    draw.text((x, y + size + 3), _fit(small, item.label, size), font=small, fill=INK)
    if item.score is not None:
        draw.text((x, y + size + 17), f"{item.score:.3f}", font=small, fill=MUTED)


def retrieval_grid(
    queries: Sequence[GridItem],
    results: Sequence[Sequence[GridItem]],
    cell_size: int = 96,
    title: str | None = None,
    font: str | os.PathLike | None = None,
) -> Image.Image:
    """
    One row per query: the query on the left, then its retrieved items best first, framed green when they match
    and red when they do not. Returns an RGB image.

    queries: one [`GridItem`] per row. results: for each query, its ranked items (rows may have different lengths).
    cell_size: side of each thumbnail in pixels (at least 48, so that captions stay readable).
    font: a TrueType/OpenType file for the text (default: see the module docstring).
    """
    if len(queries) != len(results):
        raise ValueError(f"Got {len(queries)} queries but {len(results)} result rows.")
    if not queries:
        raise ValueError("retrieval_grid needs at least one query.")
    if cell_size < 48:
        raise ValueError(f"cell_size must be at least 48 pixels, got {cell_size}.")
    items = [*queries, *(item for row in results for item in row)]
    fonts = _fonts([title or "", *(f"{item.label}{item.text or ''}" for item in items)], font, 11, 13)
    margin, gap, query_gap, caption = 12, 8, 28, 34
    header = 22 + (22 if title else 0)
    columns = max(len(row) for row in results)
    width = 2 * margin + cell_size + query_gap + columns * (cell_size + gap) - gap
    height = header + margin + len(queries) * (cell_size + caption + gap) - gap + margin
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    top = margin
    if title:
        draw.text((margin, top), _fit(fonts[1], title, width - 2 * margin), font=fonts[1], fill=INK)
        top += 22
    first_result = margin + cell_size + query_gap
    draw.text((margin, top), "query", font=fonts[0], fill=MUTED)
    for k in range(columns):
        draw.text((first_result + k * (cell_size + gap), top), f"#{k + 1}", font=fonts[0], fill=MUTED)
    top += 22
    for row, (query, ranked) in enumerate(zip(queries, results)):
        y = top + row * (cell_size + caption + gap)
        _draw_cell(canvas, query, margin, y, cell_size, fonts)
        arrow_y = y + cell_size // 2
        draw.line([(margin + cell_size + 6, arrow_y), (first_result - 8, arrow_y)], fill=MUTED, width=2)
        draw.polygon([(first_result - 6, arrow_y), (first_result - 12, arrow_y - 5), (first_result - 12, arrow_y + 5)],
                     fill=MUTED)
        for k, item in enumerate(ranked):
            _draw_cell(canvas, item, first_result + k * (cell_size + gap), y, cell_size, fonts)
    return canvas


def _colour(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB rows along the ramp (linear between its anchors)."""
    position = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    low = np.minimum(np.floor(position).astype(int), len(_RAMP) - 2)
    fraction = (position - low)[..., None]
    return np.round(_RAMP[low] * (1 - fraction) + _RAMP[low + 1] * fraction).astype(np.uint8)


def similarity_heatmap(
    matrix,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str | None = None,
    cell_size: int = 36,
    value_range: tuple[float, float] | None = None,
    font: str | os.PathLike | None = None,
) -> Image.Image:
    """
    A (rows, columns) similarity matrix as coloured cells with their values written in, column labels written
    vertically above, and a colour bar. Each row's largest value is outlined, which is what retrieval picks.

    matrix: a torch tensor (any dtype or device), or anything `np.asarray` takes (a list of lists). value_range: the
    values mapped to the two ends of the colour scale (default: the matrix's min and max, so that small differences
    between cosine similarities stay visible). font: as in [`retrieval_grid`]. Returns an RGB image.
    """
    values = _as_float64(matrix)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {values.shape}.")
    if len(row_labels) != values.shape[0] or len(col_labels) != values.shape[1]:
        raise ValueError(
            f"Got {len(row_labels)} row and {len(col_labels)} column labels for a matrix of shape {values.shape}."
        )
    if not np.isfinite(values).all():
        raise ValueError("matrix contains NaN or infinite values.")
    if cell_size < 16:
        raise ValueError(f"cell_size must be at least 16 pixels, got {cell_size}.")
    low, high = value_range if value_range is not None else (float(values.min()), float(values.max()))
    scaled = (values - low) / (high - low) if high > low else np.full_like(values, 0.5)

    font, title_font = _fonts([title or "", *map(str, row_labels), *map(str, col_labels)], font, 11, 13)
    margin = 12
    label_width = int(max(font.getlength(str(label)) for label in row_labels)) + 8
    column_label_height = int(max(font.getlength(str(label)) for label in col_labels)) + 8
    rows, columns = values.shape
    bar_width, bar_gap = 14, 16
    title_height = 22 if title else 0
    grid_left = margin + label_width
    grid_top = margin + title_height + column_label_height
    width = grid_left + columns * cell_size + bar_gap + bar_width + 44 + margin
    height = max(grid_top + rows * cell_size, grid_top + 60) + margin
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((margin, margin), _fit(title_font, title, width - 2 * margin), font=title_font, fill=INK)

    colours = _colour(scaled)
    show_values = cell_size >= 30
    for i in range(rows):
        y = grid_top + i * cell_size
        draw.text((margin, y + (cell_size - 12) // 2), str(row_labels[i]), font=font, fill=INK)
        for j in range(columns):
            x = grid_left + j * cell_size
            colour = tuple(int(c) for c in colours[i, j])
            draw.rectangle((x, y, x + cell_size - 1, y + cell_size - 1), fill=colour)
            if show_values:
                # Dark text on the light (yellow/green) end of the ramp, white on the dark end.
                text_colour = INK if scaled[i, j] > 0.6 else (255, 255, 255)
                text = f"{values[i, j]:.2f}"
                draw.text((x + (cell_size - font.getlength(text)) / 2, y + (cell_size - 12) / 2), text,
                          font=font, fill=text_colour)
        best = int(np.argmax(values[i]))
        x = grid_left + best * cell_size
        draw.rectangle((x, y, x + cell_size - 1, y + cell_size - 1), outline=(230, 30, 30), width=2)

    for j, label in enumerate(col_labels):
        # Column labels are rendered sideways: long labels would otherwise force wide cells.
        text_width = int(font.getlength(str(label))) + 4
        strip = Image.new("RGB", (text_width, 14), BACKGROUND)
        ImageDraw.Draw(strip).text((0, 0), str(label), font=font, fill=INK)
        strip = strip.rotate(90, expand=True)
        x = grid_left + j * cell_size + (cell_size - strip.width) // 2
        canvas.paste(strip, (x, grid_top - 4 - strip.height))

    bar_left, bar_height = grid_left + columns * cell_size + bar_gap, max(rows * cell_size, 60)
    ramp = _colour(np.linspace(1, 0, bar_height))
    bar = Image.fromarray(np.repeat(ramp[:, None, :], bar_width, axis=1), "RGB")
    canvas.paste(bar, (bar_left, grid_top))
    draw.text((bar_left + bar_width + 4, grid_top), f"{high:.2f}", font=font, fill=INK)
    draw.text((bar_left + bar_width + 4, grid_top + bar_height - 12), f"{low:.2f}", font=font, fill=INK)
    return canvas


__all__ = ["GridItem", "retrieval_grid", "similarity_heatmap"]
