"""Image checks and preprocessing: decode, convert to RGB, resize (CLIP: + centre-crop), normalise.

The same parameters are exported for Hugging Face (`processor_config`) so that a converted
checkpoint preprocesses exactly as training did: CLIP's bicubic resize of the shortest side,
centre crop, rescale by 1/255 and CLIP mean/std, or SigLIP's bicubic resize to the square and
mean/std 0.5.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# model.vision.arch -> (centre crop, mean, std). CLIP resizes the shortest side and crops the
# centre; SigLIP resizes the whole image to the square, whatever its aspect ratio. Both bicubic.
PREPROCESSING = {
    "clip": (True, CLIP_MEAN, CLIP_STD),
    "siglip": (False, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# Far above any real training image (a 10k x 10k photo is 100M pixels) and below what would
# exhaust a worker's memory; the check reads only the header, so a bomb is never decoded.
MAX_IMAGE_PIXELS = 100_000_000

# Modes PIL reads that have a faithful RGB conversion. Float ("F") and other exotic modes carry
# no agreed display range, so they are rejected rather than guessed.
SUPPORTED_MODES = {
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
    "I", "I;16", "I;16L", "I;16B", "I;16N",
}  # fmt: skip


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def load_image(source: Union[bytes, str, Path], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully and return it as RGB, or raise ImageRejected.

    Reasons: image_too_large (checked on the header, before decoding), unsupported_image_mode,
    corrupt_image (unreadable, truncated or otherwise undecodable).
    """
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit below decides
            img = Image.open(fp)
    except Image.DecompressionBombError as e:  # PIL's own hard limit, 2 x Image.MAX_IMAGE_PIXELS
        raise ImageRejected("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types for unreadable files
        raise ImageRejected("corrupt_image", f"cannot identify image ({e})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    if width == 0 or height == 0:
        raise ImageRejected("corrupt_image", f"empty image {width}x{height}")
    if img.mode not in SUPPORTED_MODES:
        raise ImageRejected("unsupported_image_mode", f"mode {img.mode}")
    try:
        img.load()
    except Exception as e:
        raise ImageRejected("corrupt_image", f"cannot decode ({e})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any supported mode to 8-bit RGB; transparency is composited on white."""
    if img.mode.startswith("I"):
        # 16/32-bit greyscale: scale the 16-bit range to 8 bits (PIL's convert would clip).
        arr = np.asarray(img).astype(np.float32)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the shortest side to `size`, then a centre crop to size x size.

    Sizes are rounded as Hugging Face's CLIPImageProcessor does (long side truncated), so both
    produce the same pixels.
    """
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, size: int, arch: str = "clip") -> np.ndarray:
    """RGB PIL image -> float32 [3, size, size], as the encoder `arch` was pretrained to see
    images (PREPROCESSING)."""
    crop, mean, std = PREPROCESSING[arch]
    img = resize_and_crop(img, size) if crop else img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def processor_config(image_size: int, arch: str = "clip") -> dict:
    """The preprocessing above as a Hugging Face image processor config (preprocessor_config.json):
    CLIPImageProcessor's or SiglipImageProcessor's."""
    crop, mean, std = PREPROCESSING[arch]
    square = {"height": image_size, "width": image_size}
    if crop:
        resize = {"size": {"shortest_edge": image_size}, "do_center_crop": True, "crop_size": square}
    else:
        resize = {"size": square}
    return {
        "image_processor_type": "CLIPImageProcessor" if arch == "clip" else "SiglipImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        **resize,
        "resample": int(Image.Resampling.BICUBIC),  # 3
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }
