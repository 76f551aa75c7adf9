"""Decode image bytes to RGB uint8 arrays: alpha on white, EXIF orientation, bomb limit."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from flagsim.errors import DataError

DEFAULT_MAX_PIXELS = 64_000_000
WHITE = (255, 255, 255)


class DecodeError(DataError):
    """An image could not be decoded; the message is the reason recorded in the errors table."""


def _sniff(data: bytes) -> str | None:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:200]:
        return "HTML page, not an image"
    if head.startswith(b"<?xml") or head.startswith(b"<svg") or b"<svg" in head[:300]:
        return "SVG vector image is not supported (rasterise it first)"
    return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array, or raise DecodeError with a one-line reason.

    Transparency (alpha channels, palette transparency) is composited on white; CMYK, 16-bit,
    greyscale and palette images are converted; EXIF orientation is applied; animated images
    use their first frame; images over `max_pixels` are refused before decoding (bomb guard).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    sniffed = _sniff(data)
    if sniffed:
        raise DecodeError(sniffed)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own bomb guard follows our limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError(f"image too large: {w}x{h} pixels exceeds the limit of {max_pixels}")
            if w < 1 or h < 1:
                raise DecodeError(f"image has no pixels ({w}x{h})")
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's text names its error threshold, twice ours; say the limit that was enforced
        m = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(m.group(1)):,} pixels" if m else "the image"
        raise DecodeError(
            f"decompression bomb refused: {size} exceeds the limit of {max_pixels:,} pixels"
        ) from None
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            raise DecodeError(f"truncated image: {msg}") from None
        raise DecodeError(f"corrupt image: {msg}") from None


def to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any PIL mode to RGB uint8, compositing transparency on white."""
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    elif im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif im.mode == "L" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGBA", im.size, WHITE + (255,))
        bg.alpha_composite(im)
        im = bg.convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, L, 1, ...
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def decode_batch_torchvision(
    datas: list[bytes], device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[np.ndarray | DecodeError]:
    """Decode a batch: JPEGs with `torchvision.io.decode_jpeg` on `device` (one batched call;
    nvJPEG on cuda, libjpeg-turbo on cpu), everything else, CMYK JPEGs and any JPEG that
    torchvision refuses with `decode_image` (PIL). Each result is an HxWx3 uint8 array or the
    DecodeError that `decode_image` gives (the errors-table reason)."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_torchvision(datas, device, max_pixels)


def _decode_torchvision(
    datas: list[bytes], device: str, max_pixels: int
) -> list[np.ndarray | DecodeError]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[np.ndarray | DecodeError | None] = [None] * len(datas)
    jpegs = []
    for i, data in enumerate(datas):
        if is_jpeg(data) and _plain_jpeg(data, max_pixels):
            jpegs.append(i)
    tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
    decoded: list = []
    if tensors:
        try:
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device,
                                  apply_exif_orientation=True)
        except RuntimeError:  # one bad file fails the batch: decode them one by one
            decoded = []
            for t in tensors:
                try:
                    decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device,
                                               apply_exif_orientation=True))
                except RuntimeError:
                    decoded.append(None)
    for i, img in zip(jpegs, decoded, strict=True):
        if img is not None:
            out[i] = np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy())
    for i, data in enumerate(datas):
        if out[i] is None:
            try:
                out[i] = decode_image(data, max_pixels)
            except DecodeError as exc:
                out[i] = exc
    return out  # type: ignore[return-value]


def _plain_jpeg(data: bytes, max_pixels: int) -> bool:
    """True for a JPEG whose header PIL reads as RGB or greyscale within `max_pixels` (the
    others, and the bomb guard's refusals, take the PIL path and its reasons)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return im.format == "JPEG" and im.mode in ("RGB", "L") and 0 < w * h <= max_pixels
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
