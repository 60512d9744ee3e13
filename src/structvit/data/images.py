"""Loading an image file as 8-bit RGB with its real range, whatever mode PIL opens it in.

PIL's own ``convert("RGB")`` clips wide integer modes: a 16-bit PNG (``I;16``, or ``I`` in
older Pillow) comes out with every value above 255 saturated.  :func:`load_image` maps
each mode explicitly:

* 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``LA``, ``PA``, ``CMYK``, ``YCbCr``,
  ...): PIL's conversion (palette looked up, alpha dropped, CMYK/YCbCr converted);
* 16-bit (``I;16*``): divided by 257, so 0..65535 maps onto 0..255 rounded;
* 32-bit integers (``I``): taken as 16-bit when the values lie in 0..65535 (how PIL opens
  16-bit PNGs), else refused;
* floats (``F``): values in 0..1 are scaled by 255, values in 0..255 taken as they are;
  anything else (negative, larger, NaN or infinite) is refused.

A mode or range that cannot be mapped raises :class:`~.files.UnsupportedImageError`, a
file that does not decode :class:`~.files.CorruptFileError`; both name the file.
"""
from __future__ import annotations

import os

import numpy as np

from .files import CorruptFileError, MissingFileError, UnsupportedImageError

__all__ = ["load_image", "to_rgb"]

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _gray_to_rgb(values: np.ndarray):
    """``(H, W)`` values already in 0..255 (any dtype) -> RGB PIL image."""
    from PIL import Image

    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")


def to_rgb(image, path: str = "<image>"):
    """``image`` (a PIL image of any mode) as an 8-bit RGB PIL image (see the module doc);
    ``path`` names it in errors."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT:
        return _gray_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImageError(path, f"32-bit integer image (mode I) with values {values.min()}.."
                                              f"{values.max()}: only 0..65535 (16-bit) can be mapped to 8 bits")
        return _gray_to_rgb(values / 257.0)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise UnsupportedImageError(path, "float image (mode F) holds NaN or infinite values")
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise UnsupportedImageError(path, f"float image (mode F) with values {lo:g}..{hi:g}: expected 0..1 "
                                              "or 0..255")
        return _gray_to_rgb(values * 255.0 if hi <= 1.0 else values)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise UnsupportedImageError(path, f"image mode {mode!r} cannot be converted to RGB ({e})") from None


def load_image(path):
    """The image file ``path`` as an 8-bit RGB PIL image with its real range (see the
    module doc); errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = to_rgb(im, path)
            return rgb.copy() if rgb is im else rgb  # closing the file frees an image not copied
    except UnsupportedImageError:
        raise
    except FileNotFoundError:
        raise MissingFileError(path, "image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CorruptFileError(path, f"cannot decode image ({type(e).__name__}: {e})") from None
