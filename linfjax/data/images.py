"""Decoding and resizing image files safely: PIL with an allow-list of formats and a size limit.

An image file is opened only by the decoders of `FORMATS` (no format guessing beyond
them, and no pickle anywhere), its header's size is checked against `MAX_PIXELS` before
any pixel is decoded (a small file can claim a huge image), and a truncated or garbled
file is an `ImageError` naming the path, never a partial image. Resizing uses PIL's
bilinear filter (with its antialiasing when shrinking), as torchvision's `Resize` on PIL
images does in BackdoorBench's GTSRB pipeline.
"""

from __future__ import annotations

import os

import numpy as np

# Formats PIL may decode here; GTSRB ships PPM.
FORMATS = ("PNG", "JPEG", "PPM", "BMP", "GIF", "TIFF", "WEBP")
# File names an image folder's loader reads; other files (GTSRB's per-class CSV) are skipped.
EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif",
              ".tiff", ".webp")
# Ours: 16.8 megapixels, far above any classification image, far below a decompression bomb.
MAX_PIXELS = 1 << 24


class ImageError(ValueError):
  """A file is not a readable image of an allowed format and size."""


def is_image_name(name: str) -> bool:
  """Whether a file name has an image extension (case-insensitive) and is not hidden."""
  return not name.startswith(".") and os.path.splitext(name)[1].lower() in EXTENSIONS


def decode(path: str, *, size: tuple[int, int] | None = None) -> np.ndarray:
  """Reads an image file as uint8 RGB, resized to `size` when given.

  Args:
    path: the file.
    size: (height, width) to resize to, or None to keep the stored size.

  Returns:
    uint8 [H, W, 3].

  Raises:
    ImageError: the file is missing, not one of FORMATS, larger than MAX_PIXELS, or
      cannot be decoded in full.
  """
  from PIL import Image  # Imported here: only image sources need it.

  try:
    with Image.open(path, formats=FORMATS) as image:
      width, height = image.size
      if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: {width}x{height} pixels is more than the {MAX_PIXELS} "
                         "allowed")
      rgb = image.convert("RGB")
  except ImageError:
    raise
  except Exception as e:  # PIL raises many types for unreadable, truncated or unknown files.
    raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
  if size is not None and rgb.size != (size[1], size[0]):
    rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
  return np.asarray(rgb, np.uint8)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes a uint8 [H, W, C] image (C 1 or 3) to (height, width) with PIL's bilinear filter."""
  from PIL import Image

  if image.shape[:2] == tuple(size):
    return image
  squeeze = image.shape[-1] == 1
  resized = Image.fromarray(image[..., 0] if squeeze else image).resize(
      (size[1], size[0]), Image.Resampling.BILINEAR)
  array = np.asarray(resized, np.uint8)
  return array[..., None] if squeeze else array


def decode_ppm(payload: bytes, path: str) -> np.ndarray:
  """A binary PPM (P6, maxval up to 255) as uint8 [H, W, 3]; ImageError naming `path`.

  Much faster than PIL for many small files (GTSRB ships 51,839 of them).
  """
  tokens, position = [], 2
  if payload[:2] != b"P6":
    raise ImageError(f"{path}: not a binary PPM image (it does not start with P6)")
  while len(tokens) < 3:
    while position < len(payload) and payload[position:position + 1].isspace():
      position += 1
    if payload[position:position + 1] == b"#":
      end = payload.find(b"\n", position)
      position = len(payload) if end < 0 else end + 1
      continue
    start = position
    while position < len(payload) and not payload[position:position + 1].isspace():
      position += 1
    token = payload[start:position]
    if not token.isdigit():
      raise ImageError(f"{path}: a truncated or malformed PPM header")
    tokens.append(int(token))
  width, height, maxval = tokens
  if not (width > 0 and height > 0 and 0 < maxval <= 255):
    raise ImageError(f"{path}: a PPM of {width}x{height} with maxval {maxval} is not an "
                       "8-bit image")
  if width * height > MAX_PIXELS:
    raise ImageError(f"{path}: {width}x{height} pixels is more than the "
                       f"{MAX_PIXELS} allowed")
  start, size = position + 1, width * height * 3
  if len(payload) < start + size:
    raise ImageError(f"{path}: truncated ({max(0, len(payload) - start)} of {size} pixel "
                       "bytes)")
  pixels = np.frombuffer(payload, np.uint8, size, start).reshape(height, width, 3)
  if maxval != 255:
    pixels = (pixels.astype(np.uint32) * 255 // maxval).astype(np.uint8)
  return pixels
