"""Reading untrusted images and turning them into BLIP-2's eval input (224x224 bicubic squash, CLIP normalisation)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Anything larger is refused before decoding: a 40 MP limit stops decompression bombs but passes phone photos.
MAX_PIXELS = 40_000_000

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image from a path, bytes, an array or a PIL image, and return it as upright RGB.

    Raises InputError with a message naming the problem (missing, empty, truncated, not an image, too large).
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, max_pixels)
    if isinstance(source, np.ndarray):
        try:
            return to_rgb(Image.fromarray(source), max_pixels)
        except (TypeError, ValueError) as err:
            raise InputError(f"cannot read an image from an array of shape {source.shape} and dtype {source.dtype}") from err
    if isinstance(source, (bytes, bytearray)):
        name, data = "the uploaded data", bytes(source)
    else:
        path = Path(source)
        name = f"'{path.name}'"
        if not path.is_file():
            raise InputError(f"image file {name} does not exist")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InputError(f"image file {name} cannot be read: {err.strerror or err}") from err
    if not data:
        raise InputError(f"image {name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image, name, max_pixels)
            image.load()
    except UnidentifiedImageError as err:
        raise InputError(f"{name} is not an image this demo can read (PNG, JPEG, GIF, WebP, BMP, TIFF...)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(f"image {name} is too large to decode safely (limit {max_pixels:,} pixels)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"image {name} is damaged or truncated and cannot be decoded ({err})") from err
    return to_rgb(image, max_pixels, name)


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"image {name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"image {name} is {width}x{height}, more than the {max_pixels:,}-pixel limit")


def to_rgb(image: Image.Image, max_pixels: int = MAX_PIXELS, name: str = "image") -> Image.Image:
    """First frame, EXIF orientation applied, any mode (RGBA, P, L, I;16, CMYK...) converted to RGB."""
    _check_pixels(image, name, max_pixels)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's own conversion clips 16/32-bit values at 255: rescale to 8 bits first.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max()
        scale = 255.0 / peak if peak > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" or image.mode in ("LA", "PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        # Transparent pixels would otherwise show whatever colour they hide (often black): put them on white.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def preprocess(image: Image.Image) -> torch.Tensor:
    """BLIP-2 eval processing: resize straight to 224x224 (bicubic, no crop), scale to [0,1], CLIP-normalise.

    Returns a float32 tensor of shape (1, 3, 224, 224).
    """
    resized = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
