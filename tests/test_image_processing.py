"""OnePeaceImageProcessor against the reference `inputs.src_images`."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from onepeace_hf.image_processing_onepeace import OnePeaceImageProcessor


REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
ATOL = 1e-6


@pytest.fixture(scope="module")
def images():
    return [Image.open(REFERENCE / "assets" / name) for name in ("dog.JPEG", "elephant.JPEG")]


@pytest.fixture(scope="module")
def expected_images():
    return load_file(REFERENCE / "expected_tiny_pretrain.safetensors")["inputs.src_images"]


@pytest.fixture(scope="module")
def processor():
    return OnePeaceImageProcessor()


def max_error(pixel_values, expected):
    assert pixel_values.shape == expected.shape and pixel_values.dtype == torch.float32
    return (pixel_values - expected).abs().max().item()


def test_pil_images_match_reference(processor, images, expected_images):
    assert max_error(processor(images, return_tensors="pt")["pixel_values"], expected_images) <= ATOL


def test_array_inputs_match_reference(processor, images, expected_images):
    arrays = [np.asarray(image.convert("RGB")) for image in images]  # HWC uint8
    cases = {
        "uint8 HWC": (arrays, {}),
        "uint8 CHW": ([a.transpose(2, 0, 1) for a in arrays], {}),
        "torch uint8 HWC": ([torch.from_numpy(a.copy()) for a in arrays], {}),
        "float [0, 255]": ([a.astype(np.float32) for a in arrays], {}),
        "float [0, 1]": ([a.astype(np.float32) / 255 for a in arrays], {"do_rescale": False}),
    }
    for name, (inputs, kwargs) in cases.items():
        pixel_values = processor(inputs, return_tensors="pt", **kwargs)["pixel_values"]
        assert max_error(pixel_values, expected_images) <= ATOL, name


def test_a_float_image_already_in_unit_range_warns_before_a_second_rescale(processor, images):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    logger = transformers_logging.get_logger("onepeace_hf.image_processing_onepeace")
    transformers_logging.warning_once.cache_clear()  # another test may have given it already in this process
    scaled = np.asarray(images[0].convert("RGB")).astype(np.float32) / 255
    with CaptureLogger(logger) as unscaled_log:
        processor(scaled * 255, return_tensors="pt")
    assert unscaled_log.out == ""
    with CaptureLogger(logger) as scaled_log:
        processor(scaled, return_tensors="pt")
    assert "pass do_rescale=False" in scaled_log.out


def test_single_image_and_numpy_output(processor, images, expected_images):
    pixel_values = processor(images[1], return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (1, 3, 256, 256) and pixel_values.dtype == np.float32
    assert np.abs(pixel_values[0] - expected_images[1].numpy()).max() <= ATOL


def test_grayscale_and_alpha_become_rgb(processor, images):
    gray = images[0].convert("L")
    assert processor(gray, return_tensors="pt")["pixel_values"].shape == (1, 3, 256, 256)
    # Like the original's `convert("RGB")`, transparency is dropped rather than composited on white.
    rgba = images[0].convert("RGBA")
    rgba.putalpha(0)
    from_rgba = processor(rgba, return_tensors="pt")["pixel_values"]
    assert torch.equal(from_rgba, processor(images[0], return_tensors="pt")["pixel_values"])


def test_sixteen_bit_greyscale_is_scaled_not_clipped(processor, images, tmp_path):
    """A 16-bit PNG opens as "I;16" ("I" for some files); `convert("RGB")` alone clips it at 255: a white picture."""
    grey = images[0].convert("L")
    wide = np.asarray(grey).astype(np.int64) * 257  # the same picture on the 16-bit scale
    Image.fromarray(wide.astype(np.uint16)).save(tmp_path / "g.png")
    png, as_int32 = Image.open(tmp_path / "g.png"), Image.fromarray(wide.astype(np.int32))
    assert (png.mode, as_int32.mode) == ("I;16", "I")
    expected = processor(grey, return_tensors="pt")["pixel_values"]
    for image in (png, as_int32):
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0)


def test_other_size(processor, images):
    assert processor(images, size={"height": 320, "width": 320}, return_tensors="pt")["pixel_values"].shape == (
        2, 3, 320, 320,
    )


# The model takes square patch grids only (as the original): a non-square size fails here, not in the model.
@pytest.mark.parametrize(
    "size", [{"height": 250, "width": 256}, {"height": 256, "width": 100}, 200, {"height": 224, "width": 320}]
)
def test_size_must_be_square_and_a_multiple_of_patch_size(processor, images, size):
    with pytest.raises(ValueError, match="square with a side that is a multiple of the patch size 16"):
        OnePeaceImageProcessor(size=size)
    with pytest.raises(ValueError, match="square with a side that is a multiple of the patch size 16"):
        processor(images, size=size)


@pytest.mark.parametrize("shape", [(250, 256, 3), (224, 320, 3)])
def test_unresized_image_must_fit_patches(processor, shape):
    with pytest.raises(ValueError, match=r"multiple of the patch size 16, got \d+x\d+ \(and `do_resize=False`\)"):
        processor(np.zeros(shape, dtype=np.uint8), do_resize=False)


def test_save_and_load(images, tmp_path):
    processor = OnePeaceImageProcessor(size={"height": 224, "width": 224})
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = OnePeaceImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert dict(reloaded.size) == {"height": 224, "width": 224}
    assert torch.equal(
        reloaded(images, return_tensors="pt")["pixel_values"], processor(images, return_tensors="pt")["pixel_values"]
    )


def test_load_image_turns_the_picture_as_displayed_and_keeps_its_mode(images, tmp_path):
    from onepeace_hf import load_image
    from onepeace_hf.training.data import as_image

    upright = images[0].convert("RGB").crop((0, 0, 64, 40))
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation 8: turn 90 degrees counter-clockwise to display
    upright.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "sideways.png", exif=exif)
    for loaded in (load_image(tmp_path / "sideways.png"), as_image(str(tmp_path / "sideways.png"))):
        assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(upright))
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert load_image(tmp_path / "grey16.png").mode.startswith("I")  # the processor scales it, not a clipping convert


def test_float_greyscale_is_scaled_like_float_arrays(processor, images):
    """A float TIFF opens as mode "F"; `convert("RGB")` alone clips [0, 1] values to 0 or 1: a black picture."""
    grey = images[0].convert("L")
    expected = processor(grey, return_tensors="pt")["pixel_values"]
    levels = np.asarray(grey).astype(np.float32)
    for pixels in (levels / 255, levels):
        picture = Image.fromarray(pixels)
        assert picture.mode == "F"
        torch.testing.assert_close(processor(picture, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0)
    for pixels in (levels * 4, levels - 10, np.where(levels > 100, np.nan, levels / 255).astype(np.float32)):
        with pytest.raises(ValueError, match=r"mode 'F' image with values in .* has no RGB reading"):
            processor(Image.fromarray(pixels))


def test_a_two_dimensional_array_is_one_greyscale_picture(processor, images):
    grey = images[0].convert("L")
    expected = processor(grey, return_tensors="pt")["pixel_values"]
    levels = np.asarray(grey)
    for pixels in (levels, torch.from_numpy(levels.copy()), levels.astype(np.uint16) * 257, levels.astype(np.int64),
                   levels.astype(np.float64) / 255):
        given = processor(pixels, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(given, expected, rtol=0, atol=0, msg=str(type(pixels)))
    assert torch.equal(processor([levels, levels], return_tensors="pt")["pixel_values"], expected.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"values in \[-4, 200\] has no RGB reading") as error:
        processor(levels.astype(np.int16) - 5)
    assert len(str(error.value)) < 200  # not the whole array


@pytest.mark.parametrize("empty", [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 0), np.uint8),
                                   Image.new("RGB", (0, 5)), torch.zeros(3, 8, 0)])
def test_an_image_without_pixels_is_refused(processor, empty):
    with pytest.raises(ValueError, match="image without pixels"):
        processor(empty)


def test_image_paths_open_as_load_image_opens_them(processor, images, tmp_path):
    """transformers' own path loading converts to RGB at once (16-bit clipped white) and ours keeps the mode."""
    from onepeace_hf import load_image

    wide = np.asarray(images[0].convert("L")).astype(np.uint16) * 257
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    images[1].convert("RGB").save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    for name in ("grey16.png", "sideways.jpg"):
        path = tmp_path / name
        expected = processor(load_image(path), return_tensors="pt")["pixel_values"]
        for given in (str(path), path, [str(path)]):
            assert torch.equal(processor(given, return_tensors="pt")["pixel_values"], expected), (name, given)
