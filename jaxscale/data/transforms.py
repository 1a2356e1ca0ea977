"""Per-image transforms on the host: decode, Inception crop, flip, eval resize and center crop.

Images leave the host in their own dtype (uint8 for decoded files; normalization happens on the
device) and with their own channel count. Every random draw comes
from a generator seeded by (seed, stream position), so a transform is a pure function of the
record and its position: any worker may compute any example and the result is the same.

JPEGs arrive undecoded. The crop window is drawn from the header's size, then libjpeg decodes at
the smallest DCT scale (1/2, 1/4, 1/8) that still covers the window at the output size, and one
resize with a source box crops and scales at once: the work tf.data's fused
`decode_and_crop_jpeg` saves, done with PIL.
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from jaxscale.data import jpeg

EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875, then center-crop `size` (224 <- 256)
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


def is_encoded(image) -> bool:
  """Whether `image` is an encoded file (JPEG, PNG, ...) rather than a decoded array."""
  return isinstance(image, (bytes, np.bytes_))


def open_image(image: bytes) -> Image.Image:
  """Encoded bytes, opened lazily so that draft (reduced-scale) decoding stays possible."""
  return Image.open(io.BytesIO(image))


def to_array(pil: Image.Image, channels: int) -> np.ndarray:
  """A decoded file as uint8 HWC with `channels` channels (0: as decoded, grey or RGB)."""
  if channels or pil.mode not in ("L", "RGB"):
    pil = pil.convert("L" if channels == 1 else "RGB")
  array = np.asarray(pil)
  return array[..., None] if array.ndim == 2 else array


def as_hwc(image) -> np.ndarray:
  """A decoded image as an HWC array of its own dtype and channel count (HW gets one)."""
  array = np.asarray(image)
  if array.ndim == 2:
    return array[..., None]
  if array.ndim != 3:
    raise ValueError(f"an image must be HW or HWC, got shape {array.shape}")
  return array


def resize_array(array: np.ndarray, box: Box, size: int) -> np.ndarray:
  """The `box` window of an HWC array resized to size x size (bilinear), any dtype or channel
  count kept: uint8 grey or RGB through PIL at once, anything else one float32 channel at a
  time (PIL's "F" mode), so float images in [0, 1] keep their values."""
  if array.dtype == np.uint8 and array.shape[-1] in (1, 3):
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return as_hwc(np.asarray(pil.resize((size, size), Image.BILINEAR, box=box)))
  channels = [np.asarray(Image.fromarray(array[..., c].astype(np.float32), mode="F").resize(
      (size, size), Image.BILINEAR, box=box)) for c in range(array.shape[-1])]
  out = np.stack(channels, axis=-1)
  if np.issubdtype(array.dtype, np.integer):
    info = np.iinfo(array.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(array.dtype)
  return out.astype(array.dtype)


def sample_crop_box(height: int, width: int, rng: np.random.Generator,
                    area_range: tuple[float, float] = (0.08, 1.0),
                    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
                    attempts: int = 10) -> Box:
  """Inception-style crop window (Szegedy et al. 2015): random area and aspect ratio.

  Covers 8%-100% of the image with aspect ratio in [3/4, 4/3] (log-uniform); after `attempts`
  misses it falls back to the largest centered square.
  """
  area = height * width
  for _ in range(attempts):
    target = area * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(math.log(aspect_range[0]), math.log(aspect_range[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return (left, top, left + w, top + h)
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  return (left, top, left + side, top + side)


def center_box(height: int, width: int, size: int,
               crop_fraction: float = EVAL_CROP_FRACTION) -> Box:
  """The window that resizing the short side to size / crop_fraction and center-cropping keeps."""
  side = min(height, width) * crop_fraction
  top, left = (height - side) / 2, (width - side) / 2
  return (left, top, left + side, top + side)


def crop_and_resize(pil: Image.Image, box: Box, size: int) -> Image.Image:
  """Resizes the `box` window of `pil` to size x size, decoding a JPEG at a reduced scale.

  Where the crop-window extension is built, a JPEG is decoded only where the window is, with
  the pixels Pillow's own decode and resize give (jaxscale/data/jpeg.py); else Pillow does both.
  """
  width = pil.size[0]
  if pil.format == "JPEG":
    # Ask for a decoded size at which the window still has >= `size` pixels per side.
    reduce = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
    if reduce >= 2:
      pil.draft("RGB", (math.ceil(pil.size[0] / reduce), math.ceil(pil.size[1] / reduce)))
  scale = pil.size[0] / width  # 1, or the DCT scale draft() chose
  # The drafted height is rounded up from height / reduction, not scaled by `scale`: clamp, or a
  # window on the bottom edge of an odd-width image may end past it (Pillow raises ValueError).
  box = (box[0] * scale, box[1] * scale, min(box[2] * scale, pil.size[0]),
         min(box[3] * scale, pil.size[1]))
  window = jpeg.resize_window(pil, box, size) if pil.format == "JPEG" else None
  return window if window is not None else pil.resize((size, size), Image.BILINEAR, box=box)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Training: decode, then (when image_size > 0) Inception crop, then optional flip.

  Decoded arrays keep their dtype and channel count; `channels` applies to encoded files only.
  """
  image_size: int = 0
  random_flip: bool = True
  channels: int = 0

  def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
    if is_encoded(image):
      pil = open_image(image)
      if self.image_size:
        box = sample_crop_box(pil.size[1], pil.size[0], rng)
        pil = crop_and_resize(pil, box, self.image_size)
      if self.random_flip and rng.random() < 0.5:
        # Flipped by Pillow: a contiguous image, where a reversed view would make the batch's
        # np.stack copy it element by element (0.36 ms per image, benchmarks/input_pipeline.py).
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      return to_array(pil, self.channels)
    array = as_hwc(image)
    if self.image_size:
      box = sample_crop_box(array.shape[0], array.shape[1], rng)
      array = resize_array(array, box, self.image_size)
    if self.random_flip and rng.random() < 0.5:
      array = array[:, ::-1]
    return array


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Eval: decode, then (when image_size > 0) resize and center crop."""
  image_size: int = 0
  channels: int = 0

  def __call__(self, image, rng: np.random.Generator | None = None) -> np.ndarray:
    if is_encoded(image):
      pil = open_image(image)
      if self.image_size:
        pil = crop_and_resize(pil, center_box(pil.size[1], pil.size[0], self.image_size),
                              self.image_size)
      return to_array(pil, self.channels)
    array = as_hwc(image)
    if self.image_size:
      array = resize_array(array, center_box(array.shape[0], array.shape[1], self.image_size),
                           self.image_size)
    return array
