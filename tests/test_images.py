"""Untrusted images: every bad file gets a message naming the problem; odd but valid ones are converted."""

import io

import numpy as np
import pytest
from PIL import Image

from minigpt4_ja import InputError
from minigpt4_ja.images import load_image, preprocess


def png_bytes(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.png", "does not exist"),
    (lambda p: write(p / "empty.png", b""), "empty"),
    (lambda p: write(p / "notes.png", b"not an image at all"), "not an image"),
    (lambda p: write(p / "cut.png", png_bytes(Image.new("RGB", (64, 64), "red"))[:120]), "damaged or truncated"),
    (lambda p: write(p / "cut.jpg", png_bytes(Image.effect_noise((256, 256), 50).convert("RGB"), "JPEG")[:900]),
     "damaged or truncated"),
])
def test_bad_files_are_named(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as err:
        load_image(path)
    assert path.name in str(err.value)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_bytes(Image.new("L", (9000, 9000)))  # 81 MP of zeros compresses to a few kB
    assert len(bomb) < 200_000
    with pytest.raises(InputError, match="pixel limit"):
        load_image(bomb)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path)


@pytest.mark.parametrize("image", [
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)),
    Image.new("P", (40, 30), 3),
    Image.new("L", (40, 30), 200),
    Image.new("LA", (40, 30), (50, 255)),
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
    Image.new("1", (40, 30), 1),
    Image.new("F", (40, 30), 0.5),
], ids=lambda im: im.mode)
def test_modes_are_converted_to_rgb(image):
    out = load_image(png_bytes(image, "TIFF" if image.mode in ("CMYK", "F") else "PNG"))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_sixteen_bit_images_keep_their_contrast():
    array = np.linspace(0, 65535, 40 * 30, dtype=np.uint16).reshape(30, 40)
    out = np.asarray(load_image(png_bytes(Image.fromarray(array))))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 100  # not clipped to white


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert load_image(image).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), "blue")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    out = load_image(png_bytes(image, "JPEG", exif=exif))
    assert out.size == (20, 60)


def test_animated_images_use_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "lime", "blue")]
    data = io.BytesIO()
    frames[0].save(data, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = load_image(data.getvalue())
    r, g, b = out.getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50


def test_preprocess_is_224_clip_normalised():
    pixels = preprocess(load_image(Image.new("RGB", (500, 100), (255, 255, 255))))
    assert pixels.shape == (1, 3, 224, 224)
    expected = [(1 - m) / s for m, s in zip((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))]
    assert pixels[0, :, 100, 100].tolist() == pytest.approx(expected, abs=1e-5)
