"""Pictures a request brings (an img2img init image, an inpainting mask): decoded, bounded, fitted.

Decoding is bounded before any pixel is read (``Image.open`` reads the header only): a
picture of more than ``limits.max_input_pixels`` pixels, or one that is not PNG or
JPEG, is refused with ``InvalidArgument``. Fitting follows A1111's "crop and resize":
scale to cover the target size, keeping the aspect ratio, then cut the overflow evenly.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field

from PIL import Image

from adapters.errors import InvalidArgument

FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class SourceImage:
    """A decoded request picture, fitted to the request's size; ``sha256`` of the bytes as sent."""

    sha256: str
    image: Image.Image = field(compare=False, hash=False, repr=False)
    original_size: tuple[int, int] = (0, 0)


def decode(data: bytes, label: str, max_pixels: int, *, mode: str = "RGB") -> Image.Image:
    """``data`` (PNG or JPEG bytes) as a ``mode`` image; refuses anything else or anything too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = opened.size
            if width * height > max_pixels:
                raise InvalidArgument(
                    f"{label} is {width}x{height} pixels; at most {max_pixels} pixels are allowed "
                    "(limits.max_input_pixels): send a smaller picture"
                )
            opened.load()
    except InvalidArgument:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as error:
        problem = f"{type(error).__name__}: {error}"
        raise InvalidArgument(f"{label} is not a PNG or JPEG image ({problem})") from None
    if opened.mode in ("RGBA", "LA", "PA") or (opened.mode == "P" and "transparency" in opened.info):
        # Transparent areas become white, as A1111 does, not black.
        background = Image.new("RGBA", opened.size, (255, 255, 255, 255))
        opened = Image.alpha_composite(background, opened.convert("RGBA"))
    return opened.convert(mode)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` scaled to cover ``width`` x ``height`` (aspect kept), then center-cropped to it."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.LANCZOS,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def source_image(
    data: bytes, label: str, width: int, height: int, max_pixels: int, *, mode: str = "RGB"
) -> SourceImage:
    decoded = decode(data, label, max_pixels, mode=mode)
    return SourceImage(hashlib.sha256(data).hexdigest(), fit(decoded, width, height), decoded.size)
