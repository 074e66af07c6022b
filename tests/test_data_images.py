"""Image decoding, mode conversion, bomb guard and CLIP/SigLIP preprocessing."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from megatron_mm1.data.images import (
    ImageRejected,
    PREPROCESSING,
    load_image,
    preprocess,
    processor_config,
    resize_and_crop,
)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is tiny: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.new("L", (8, 8), 100), (100, 100, 100)),
        (Image.new("1", (8, 8), 1), (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (200, 10, 10, 255)), (200, 10, 10)),
        (Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("LA", (8, 8), (50, 255)), (50, 50, 50)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("P", (8, 8), 0), (0, 0, 0)),
        (Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), (255, 255, 255)),  # 16-bit grey
        (Image.fromarray(np.full((8, 8), 257 * 128, dtype=np.uint16)), (128, 128, 128)),
    ],
    ids=["L", "1", "RGBA", "RGBA-transparent", "LA", "CMYK", "P", "I16-white", "I16-mid"],
)
def test_modes_convert_to_rgb(img, expected):
    fmt = "TIFF" if img.mode == "CMYK" else "PNG"
    rgb = load_image(encode(img, fmt))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((4, 4)) == expected


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    img.info["transparency"] = 0
    assert load_image(encode(img)).getpixel((0, 0)) == (255, 255, 255)


def test_rejections_have_reasons():
    with pytest.raises(ImageRejected) as e:
        load_image(encode(Image.new("F", (8, 8)), "TIFF"))
    assert e.value.reason == "unsupported_image_mode"
    with pytest.raises(ImageRejected) as e:
        load_image(b"not an image at all")
    assert e.value.reason == "corrupt_image"
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = encode(noisy, fmt)
        with pytest.raises(ImageRejected) as e:
            load_image(data[: len(data) // 2])
        assert e.value.reason == "corrupt_image", fmt


@pytest.mark.parametrize("size", [(12_000, 10_000), (20_000, 20_000)])  # 120 MP (PIL only warns), 400 MP
def test_decompression_bomb_rejected_from_header(size):
    with pytest.raises(ImageRejected) as e:
        load_image(png_header_only(*size))
    assert e.value.reason == "image_too_large"
    with pytest.raises(ImageRejected) as e:
        load_image(encode(Image.new("RGB", (100, 100))), max_pixels=9_999)
    assert e.value.reason == "image_too_large"


def test_resize_shortest_side_and_centre_crop():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 40, 100))  # a red band on the far left is cropped away
    out = resize_and_crop(img, 50)
    assert out.size == (50, 50)
    assert out.getpixel((0, 25)) == (0, 0, 0)
    tall = resize_and_crop(Image.new("RGB", (30, 91)), 56)
    assert tall.size == (56, 56)


@pytest.mark.parametrize("arch", PREPROCESSING)
def test_preprocess_normalises_with_the_encoders_statistics(arch):
    arr = preprocess(Image.new("RGB", (40, 60), (255, 128, 0)), 28, arch)
    assert arr.shape == (3, 28, 28) and arr.dtype == np.float32
    _, mean, std = PREPROCESSING[arch]
    for c, value in enumerate((255, 128, 0)):
        assert np.allclose(arr[c], (value / 255 - mean[c]) / std[c], atol=1e-5)


@pytest.mark.parametrize("arch", PREPROCESSING)
def test_matches_the_huggingface_image_processor(arch):
    """CLIPImageProcessor (shortest side, centre crop) or SiglipImageProcessor (the whole image
    squeezed to the square), built from the exported preprocessor_config.json."""
    transformers = pytest.importorskip("transformers")
    config = processor_config(56, arch)
    hf = getattr(transformers, config["image_processor_type"])(
        **{k: v for k, v in config.items() if k != "image_processor_type"})
    rng = np.random.default_rng(1)
    for shape in ((90, 130), (130, 90), (56, 56)):
        img = Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
        ours = preprocess(img, 56, arch)
        theirs = hf(images=img, return_tensors="np")["pixel_values"][0]
        assert theirs.shape == ours.shape
        # Both resize with PIL bicubic; allow for float rounding of the rescale.
        assert np.abs(theirs - ours).max() < 0.02, shape
