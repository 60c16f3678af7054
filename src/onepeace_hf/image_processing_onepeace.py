"""Image processor for ONE-PEACE (PIL/NumPy backend, no torchvision)."""

import os

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.utils import logging

from .image_utils import load_image
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


_BASE64_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")


def _is_missing_file(source) -> bool:
    """A path that names no file: any `os.PathLike`, or a string that is not a URL and cannot be base64 (which
    transformers also accepts), such as one with a dot or a space."""
    if isinstance(source, os.PathLike):
        return not os.path.isfile(source)
    if not isinstance(source, str) or source.startswith(("http://", "https://", "data:")):
        return False
    return not set(source) <= _BASE64_CHARACTERS and not os.path.isfile(source)


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

    @classmethod
    def from_dict(cls, image_processor_dict, **kwargs):
        """Refuses the audio feature extractor's settings: both parts save `preprocessor_config.json`, and
        transformers reads a `*FeatureExtractor` type as the `*ImageProcessor` of the same name, so a folder holding
        only the feature extractor would otherwise load as this class (AutoProcessor then tries the feature
        extractor, as it should)."""
        # AutoImageProcessor drops the `feature_extractor_type` it renamed: the audio settings tell them apart.
        if "image_processor_type" not in image_processor_dict and {"sampling_rate", "feature_size"} <= set(
            image_processor_dict
        ):
            raise ValueError(
                "These settings are ONE-PEACE's audio feature extractor, not its image processor: load them with "
                "OnePeaceFeatureExtractor or AutoFeatureExtractor."
            )
        return super().from_dict(image_processor_dict, **kwargs)

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

    def fetch_images(self, image_url_or_urls):
        """Local image files open with `onepeace_hf.load_image` (EXIF turn applied, mode kept, so that 16-bit and
        float greyscale are scaled below rather than clipped by an early `convert("RGB")`); a 2-D array is the pixels
        of one greyscale picture, read as Pillow reads it. URLs and the rest go to transformers."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)) and os.path.isfile(image_url_or_urls):
            return load_image(image_url_or_urls)
        if _is_missing_file(image_url_or_urls):  # rather than transformers' "Invalid base64-encoded string"
            raise ValueError(f"Image file {os.fspath(image_url_or_urls)} does not exist.")
        if isinstance(image_url_or_urls, (np.ndarray, torch.Tensor)) and image_url_or_urls.ndim == 2:
            return _greyscale_picture(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def process_image(self, image, *args, **kwargs):
        """Refuse an image without pixels: resizing it would give a black picture and a meaningless embedding."""
        shape = (image.height, image.width) if isinstance(image, PIL.Image.Image) else tuple(image.shape)
        if 0 in shape:
            raise ValueError(f"Got an image without pixels (size {shape}).")
        return super().process_image(image, *args, **kwargs)

    def convert_to_rgb(self, image, **kwargs):
        """PIL images: plain `convert("RGB")` (alpha dropped, not composited on white), as the original does.

        Greyscale that `convert("RGB")` would clip at 255 is first scaled to 8 bits (the original clips it, which
        turns such pictures white or black): 16-bit (modes "I;16*", and "I" holding 16-bit values) divided by 257,
        and float (mode "F", e.g. float TIFF) read like float arrays: values in [0, 1] times 255, in [0, 255] as they
        are. `**kwargs`: transformers 5.23 passes `input_data_format`, 5.17 passes nothing."""
        if isinstance(image, PIL.Image.Image):
            if image.mode.startswith("I;16") or image.mode == "I" and not _within_8_bits(image):
                image = _scaled_to_8_bits(image, np.asarray(image).astype(np.float32) / 257, 65535)
            elif image.mode == "F":
                grey = np.asarray(image, dtype=np.float32)
                image = _scaled_to_8_bits(image, grey * 255 if 0 <= grey.min() and grey.max() <= 1 else grey, 255)
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


def _greyscale_picture(pixels) -> PIL.Image.Image:
    """A 2-D array or tensor as the greyscale PIL image holding its values (mode "L", "I;16", "I", "F" or "1")."""
    pixels = pixels.numpy(force=True) if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    if np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32)
    elif np.issubdtype(pixels.dtype, np.integer) and pixels.dtype not in (np.uint8, np.uint16):
        pixels = pixels.astype(np.int32) if pixels.size and np.abs(pixels).max() < 2**31 else pixels
    return PIL.Image.fromarray(np.ascontiguousarray(pixels))


def _within_8_bits(image: PIL.Image.Image) -> bool:
    low, high = image.getextrema()
    return 0 <= low and high <= 255


def _scaled_to_8_bits(image: PIL.Image.Image, grey: np.ndarray, full_scale: int) -> PIL.Image.Image:
    """`grey` (the picture's values brought to [0, 255]) as a mode "L" image; values outside give an error."""
    if not (np.isfinite(grey).all() and 0 <= grey.min() and grey.max() <= 255):
        low, high = image.getextrema()
        raise ValueError(
            f"A mode {image.mode!r} image with values in [{low}, {high}] has no RGB reading: give values in "
            f"[0, {full_scale}]" + (" (or [0, 1])." if image.mode == "F" else ".")
        )
    return PIL.Image.fromarray(np.round(grey).astype(np.uint8), mode="L")


__all__ = ["OnePeaceImageProcessor"]
