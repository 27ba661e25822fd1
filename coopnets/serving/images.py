"""What ``POST /predict`` accepts: one 8-bit PNG or JPEG image, checked before anything runs.

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("L", (4, 3), 128).save(buf, format="PNG")
    >>> decode_image(buf.getvalue()).mode, decode_image(buf.getvalue()).size
    ('RGB', (4, 3))
    >>> decode_image(b"hello")
    Traceback (most recent call last):
    ...
    coopnets.serving.images.BadRequest: 400: the body is not an image (it starts with b'hello'): POST one PNG or JPEG file
"""
from __future__ import annotations

import io

#: image formats served, by their file signature
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
#: other formats recognised only to say that they are not served (415)
OTHER_SIGNATURES = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
                    b"RIFF": "RIFF/WebP", b"\x00\x00\x01\x00": "ICO", b"%PDF": "PDF"}
#: 8-bit PIL modes converted to RGB; anything else (16-bit "I;16", 32-bit "I"/"F", "CMYK", "YCbCr"...) is a 415
SERVED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")

class BadRequest(ValueError):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = int(status), " ".join(message.split())


def decode_image(body: bytes, max_bytes: int = 10 * 2**20, max_pixels: int = 40_000_000):
    """The PNG or JPEG image in ``body`` as an 8-bit RGB ``PIL.Image``; :class:`BadRequest` for anything else.

    400: empty, not an image, truncated or undecodable; 413: over ``max_bytes`` or
    ``max_pixels``; 415: another image format, a 16-bit PNG, or a mode other than
    :data:`SERVED_MODES` (e.g. a CMYK JPEG).
    """
    from PIL import Image

    if not body:
        raise BadRequest(400, "empty body: POST one PNG or JPEG image as the request body")
    if len(body) > max_bytes:
        raise BadRequest(413, f"the body is {len(body)} bytes, over the limit of {max_bytes} bytes")
    fmt = next((name for sig, name in SIGNATURES.items() if body.startswith(sig)), None)
    if fmt is None:
        other = next((name for sig, name in OTHER_SIGNATURES.items() if body.startswith(sig)), None)
        if other is not None:
            raise BadRequest(415, f"{other} images are not served: POST a PNG or JPEG image")
        raise BadRequest(400, f"the body is not an image (it starts with {body[:8]!r}): POST one PNG or JPEG file")
    if fmt == "PNG" and len(body) >= 26 and body[12:16] == b"IHDR" and body[24] > 8:
        raise BadRequest(415, f"{body[24]}-bit PNG images are not served: POST an 8-bit PNG or a JPEG")
    try:
        image = Image.open(io.BytesIO(body), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise BadRequest(413, f"the image is too large to decode ({e})") from e
    except Exception as e:  # PIL raises several types for broken files
        raise BadRequest(400, f"the body is not a readable {fmt} image ({type(e).__name__}: {e})") from e
    width, height = image.size
    if width * height > max_pixels:
        raise BadRequest(413, f"the image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
    if image.mode not in SERVED_MODES:
        kind = "CMYK" if image.mode == "CMYK" else f"mode {image.mode}"
        raise BadRequest(415, f"{kind} {fmt} images are not served: POST an 8-bit RGB, RGBA, grayscale or palette image")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as e:
        raise BadRequest(400, f"the {fmt} image could not be decoded ({type(e).__name__}: {e})") from e
