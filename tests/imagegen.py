"""Generators of odd and broken image files for decoder and pipeline tests (no downloads)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width x height with a tiny compressed body (a few KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(200)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """A 40x20 JPEG (left half red, right half blue) tagged orientation 6 (rotate 90 CW)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(im, exif=exif.tobytes()), arr


def bad_corpus(flag_png: Path) -> dict[str, bytes]:
    """File name -> bytes of every odd case the pipeline must handle (issue: reliability)."""
    good = Image.open(flag_png).convert("RGB")
    data = png_bytes(good)
    jpg = jpeg_bytes(good)
    pal = good.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    frames = [good, good.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    arr16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257)
    rotated, _ = exif_rotated_jpeg()
    return {
        "zero_bytes.png": b"",
        "truncated.png": data[: len(data) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "page.png": b"<!DOCTYPE html><html><body>Not found</body></html>",
        "vector.svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "cmyk.jpg": jpeg_bytes(good.convert("CMYK")),
        "grey16.png": png_bytes(Image.fromarray(arr16)),
        "palette_transparent.png": png_bytes(pal, transparency=0),
        "animated.gif": gif.getvalue(),
        "one_pixel.png": png_bytes(Image.new("RGB", (1, 1), (10, 200, 30))),
        "bomb.png": bomb_png(),
        "exif_rotated.jpg": rotated,
        "Ærø ünïcode $(echo hi) & 'quote'.png": data,
    }


#: Cases that must decode (convertible formats); the rest must be reported as errors.
DECODABLE = {
    "cmyk.jpg", "grey16.png", "palette_transparent.png", "animated.gif", "one_pixel.png",
    "exif_rotated.jpg", "Ærø ünïcode $(echo hi) & 'quote'.png",
}
