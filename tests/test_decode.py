"""The decoder: every odd format becomes RGB uint8 or a one-line reason; transparency on white."""

from __future__ import annotations

import numpy as np
import pytest
from imagegen import DECODABLE, bad_corpus, bomb_png, exif_rotated_jpeg, png_bytes
from PIL import Image

from flagsim.decode import DecodeError, decode_image


@pytest.fixture(scope="module")
def corpus(bundled_dir):
    return bad_corpus(bundled_dir / "images" / "Chad.png")


def test_every_case_decodes_or_gives_a_reason(corpus):
    for name, data in corpus.items():
        if name in DECODABLE:
            arr = decode_image(data)
            assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
        else:
            with pytest.raises(DecodeError) as info:
                decode_image(data)
            assert str(info.value) and "\n" not in str(info.value), name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero_bytes.png", "empty file"),
        ("truncated.png", "truncated"),
        ("truncated.jpg", "truncated"),
        ("page.png", "HTML"),
        ("vector.svg", "SVG"),
        ("bomb.png", "bomb|too large"),
    ],
)
def test_reasons_name_the_problem(corpus, name, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(corpus[name])


def test_alpha_is_composited_on_white(bundled_dir):
    nepal = (bundled_dir / "images" / "Nepal.png").read_bytes()
    assert Image.open(bundled_dir / "images" / "Nepal.png").mode == "RGBA"
    arr = decode_image(nepal)
    # Nepal's flag is a double pennant: its top-right corner is transparent, so white.
    assert tuple(arr[2, -3]) == (255, 255, 255)


def test_palette_transparency_on_white():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    im.putpixel((1, 1), 1)
    arr = decode_image(png_bytes(im, transparency=0))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[1, 1]) == (200, 10, 10)


def test_exif_orientation_applied():
    data, arr = exif_rotated_jpeg()
    out = decode_image(data)
    assert out.shape[:2] == (arr.shape[1], arr.shape[0])  # 90-degree rotation
    # rotate 90 CW: the red (left) half ends up on top
    assert out[2, 10, 0] > 200 and out[2, 10, 2] < 60
    assert out[-3, 10, 2] > 200 and out[-3, 10, 0] < 60


def test_sixteen_bit_is_scaled_not_clipped(corpus):
    arr = decode_image(corpus["grey16.png"])
    assert arr.max() > 128  # 16-bit values map to 0..255 rather than saturating at 255


def test_cmyk_matches_rgb(corpus, bundled_dir):
    ref = decode_image((bundled_dir / "images" / "Chad.png").read_bytes()).astype(int)
    cmyk = decode_image(corpus["cmyk.jpg"]).astype(int)
    assert np.abs(ref - cmyk).mean() < 12  # JPEG + CMYK round trip, same colours


def test_pixel_limit_is_configurable_both_ways():
    big = png_bytes(Image.new("RGB", (400, 300), (1, 2, 3)))
    with pytest.raises(DecodeError, match="bomb|too large"):
        decode_image(big, max_pixels=100_000)
    assert decode_image(big, max_pixels=200_000).shape == (300, 400, 3)


@pytest.mark.parametrize("side", [9000, 30000])  # over the limit, and over Pillow's own 2x error
def test_bomb_message_names_the_enforced_limit(side):
    # Pillow's message names its error threshold (twice the limit), not the limit we enforce
    with pytest.raises(DecodeError) as info:
        decode_image(bomb_png(side, side), max_pixels=64_000_000)
    msg = str(info.value)
    assert f"{side * side:,} pixels" in msg and "limit of 64,000,000 pixels" in msg, msg
    assert "128000000" not in msg and "\n" not in msg
