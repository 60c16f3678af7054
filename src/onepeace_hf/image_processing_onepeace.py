"""Image processor for ONE-PEACE (PIL/NumPy backend, no torchvision)."""

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.utils import logging

from .remote_code import SavesWithoutDanglingAutoMap


logger = logging.get_logger(__name__)

# The image adapter cuts the image into 16x16 patches.
PATCH_SIZE = 16


def _check_side(height: int, width: int, note: str = "") -> None:
    if height != width or height % PATCH_SIZE:
        raise ValueError(
            f"ONE-PEACE images must be square with a side that is a multiple of the patch size {PATCH_SIZE}, got "
            f"{height}x{width}{note}."
        )


class OnePeaceImageProcessor(SavesWithoutDanglingAutoMap, PilBackend):
    """
    ONE-PEACE image preprocessing: RGB, resize to a fixed square with PIL bicubic (no crop), scale to [0, 1],
    normalize with the CLIP mean/std. Returns `pixel_values` of shape (batch, 3, height, width), float32.

    Accepts PIL images and NumPy arrays / torch tensors (HWC or CHW), alone or in a list. PIL images and uint8 arrays
    follow the original exactly. Float arrays follow transformers' PIL-backend convention: they are turned into 8-bit
    images for the PIL resize (values in [0, 1] are multiplied by 255 first), so pass `do_rescale=False` for images
    in [0, 1]; integer-valued floats in [0, 255] need nothing.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 256, "width": 256}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._check_size(self.size)

    @staticmethod
    def _check_size(size):
        """The model takes square patch grids: both sides equal and a multiple of the 16-pixel patch size."""
        height, width = size.height, size.width
        if height is None or width is None:
            raise ValueError(f"ONE-PEACE needs a fixed `size` with 'height' and 'width', got {dict(size)}.")
        _check_side(height, width)

    def _validate_preprocess_kwargs(self, size=None, **kwargs):
        super()._validate_preprocess_kwargs(size=size, **kwargs)
        if kwargs.get("do_resize"):
            self._check_size(size)

    def _preprocess(self, images, **kwargs):
        # Without resizing the images must already have a valid, common size to be stacked and patched.
        if not kwargs.get("do_resize"):
            for image in images:
                _check_side(image.shape[-2], image.shape[-1], " (and `do_resize=False`)")
        return super()._preprocess(images, **kwargs)

    def convert_to_rgb(self, image, **kwargs):
        """PIL images: plain `convert("RGB")` (alpha dropped, not composited on white), as the original does.

        16-bit greyscale (PNG/TIFF modes "I;16*", and "I" holding 16-bit values) is first scaled to 8 bits:
        `convert("RGB")` clips it at 255, which turns nearly every such picture white (the original does that).
        `**kwargs`: transformers 5.23 passes `input_data_format`, 5.17 passes nothing."""
        if isinstance(image, PIL.Image.Image):
            if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
                grey = np.asarray(image).astype(np.float32)
                if grey.min() < 0 or grey.max() > 65535:
                    raise ValueError(f"A mode {image.mode!r} image with values outside 0-65535 has no RGB reading.")
                image = PIL.Image.fromarray(np.round(grey / 257).astype(np.uint8), mode="L")
            return np.array(image.convert("RGB"))
        return super().convert_to_rgb(image, **kwargs)

    def rescale(self, image, scale, **kwargs):
        """Rescale in float32 as a division (`x / 255` for the default factor): bit-identical to the original."""
        if np.issubdtype(image.dtype, np.floating) and image.size and 0.0 <= image.min() and image.max() <= 1.0:
            logger.warning_once(
                "A float image with values in [0, 1] is rescaled by 1/255 again (nearly black): if it is already "
                "scaled, pass do_rescale=False."
            )
        return image.astype(np.float32) / np.float32(1 / scale)


__all__ = ["OnePeaceImageProcessor"]
