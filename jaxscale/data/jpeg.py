"""Crop-window JPEG decoding on the CPU: the fast path of `transforms.crop_and_resize`.

A random-resized crop keeps part of the image, so most of a full decode is thrown away. tf.data's
fused `decode_and_crop_jpeg` asks libjpeg-turbo for the window only; the C extension `_jpeg`
(jaxscale/data/_jpeg.c) does the same without TensorFlow:
  - rows above the window are entropy-decoded but not inverse-transformed, upsampled or
    colour-converted (`jpeg_skip_scanlines`), rows below it are not read at all;
  - columns outside it are entropy-decoded only (`jpeg_crop_scanline`);
  - at the DCT scale (1/2, 1/4, 1/8) that Pillow's `draft()` picks, as before;
and then resizes the window with Pillow's own bilinear filter, in a faster arrangement. The
result is Pillow's to the bit: `pil.resize((size, size), Image.BILINEAR, box=box)` on the same
(drafted) image. So training and evaluation see the same pixels with or without the extension,
and a run may resume on a machine that lacks it.

The extension is optional: it is built at install time where libjpeg-turbo's headers are
(Debian: libjpeg62-turbo-dev), and without it Pillow decodes, as before. Set
JAXSCALE_JPEG=pil to use Pillow even where it is built.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

try:
  from jaxscale.data import _jpeg
except ImportError:  # installed without libjpeg-turbo's headers: Pillow decodes
  _jpeg = None

ENV = "JAXSCALE_JPEG"  # "pil": never the extension


def available() -> bool:
  """Whether crop-window decoding is in use: the extension is built and not turned off."""
  return _jpeg is not None and os.environ.get(ENV, "") != "pil"


def resize_window(pil: Image.Image, box, size: int) -> Image.Image | None:
  """`pil.resize((size, size), Image.BILINEAR, box=box)`, decoding only what it reads.

  `pil` is a JPEG that Pillow has opened from memory (`Image.open(io.BytesIO(data))`), perhaps
  drafted, but not decoded; `box` is in its (drafted) pixels. None where this path does not
  apply (no extension, another mode than L or RGB, such as CMYK, or a file that is truncated or
  that libjpeg warns about): the caller then lets Pillow decode it, with Pillow's behaviour.
  """
  fp = getattr(pil, "fp", None)
  if (not available() or pil.format != "JPEG" or pil.mode not in ("L", "RGB")
      or not isinstance(fp, io.BytesIO)):
    return None
  reduction = pil.decoderconfig[0] if pil.decoderconfig else 1  # draft(): 1, 2, 4 or 8
  with fp.getbuffer() as data:
    # A file cut short goes to Pillow, which raises on it even where the missing part lies
    # below the window, which this path never reads. Its end-of-image marker (FF D9, which
    # entropy-coded data cannot hold) is missing: allow a little padding after it.
    if b"\xff\xd9" not in bytes(data[-64:]):
      return None
    try:
      pixels = _jpeg.decode_resize(data, 8 // reduction, pil.mode == "L", *box, size, size)
    except ValueError:
      return None
  raw_mode = "L" if pil.mode == "L" else "RGBX"  # _jpeg's pixels: Pillow's layout for RGB
  return Image.frombytes(pil.mode, (size, size), pixels, "raw", raw_mode)


def decode_crop(encoded: bytes, box, size: int) -> np.ndarray:
  """The `box` window (left, top, right, bottom, in pixels) of a JPEG, resized to size x size.

  uint8, HxWx3 (HxWx1 for a greyscale JPEG): what `transforms.crop_and_resize` gives, with
  or without the extension: Pillow's decode (at a reduced DCT scale when the window is at least
  twice `size`), then `resize((size, size), Image.BILINEAR, box=box)`.
  """
  from jaxscale.data import transforms
  pil = transforms.crop_and_resize(Image.open(io.BytesIO(encoded)), box, size)
  return transforms.to_array(pil, 0)

