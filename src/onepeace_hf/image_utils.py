"""Image file loading for ONE-PEACE, with Pillow only."""

import os
from typing import BinaryIO

from PIL import Image, ImageOps


def load_image(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """
    Decode an image file as it is displayed: EXIF orientation applied (cameras and phones store pictures sideways and
    record the turn), as `transformers.image_utils.load_image` and `datasets` do.

    The mode is kept (no RGB conversion here), so that `OnePeaceImageProcessor` converts every image the same way,
    16-bit greyscale and transparency included. The file is read completely and closed before returning.
    """
    with Image.open(path if hasattr(path, "read") else os.fspath(path)) as image:
        image.load()
        return ImageOps.exif_transpose(image)


__all__ = ["load_image"]
