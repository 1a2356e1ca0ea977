"""Per-image transforms on the host: decode, Inception crop, flip, eval resize and center crop.

Images leave the host as uint8 (normalization happens on the device). Every random draw comes
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

EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875, then center-crop `size` (224 <- 256)
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


def open_image(image) -> Image.Image:
  """Encoded bytes (opened lazily, so draft decoding stays possible) or a decoded array."""
  if isinstance(image, (bytes, np.bytes_)):
    return Image.open(io.BytesIO(image))
  image = np.asarray(image)
  return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def to_array(pil: Image.Image, channels: int) -> np.ndarray:
  """uint8 HWC with `channels` channels (0: as decoded, grey or RGB)."""
  if channels or pil.mode not in ("L", "RGB"):
    pil = pil.convert("L" if channels == 1 else "RGB")
  array = np.asarray(pil)
  return array[..., None] if array.ndim == 2 else array


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
  """Resizes the `box` window of `pil` to size x size, decoding a JPEG at a reduced scale."""
  width = pil.size[0]
  if pil.format == "JPEG":
    # Ask for a decoded size at which the window still has >= `size` pixels per side.
    reduce = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
    if reduce >= 2:
      pil.draft("RGB", (math.ceil(pil.size[0] / reduce), math.ceil(pil.size[1] / reduce)))
  scale = pil.size[0] / width  # 1, or the DCT scale draft() chose
  return pil.resize((size, size), Image.BILINEAR, box=tuple(x * scale for x in box))


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Training: decode, then (when image_size > 0) Inception crop, then optional flip."""
  image_size: int = 0
  random_flip: bool = True
  channels: int = 0

  def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
    pil = open_image(image)
    if self.image_size:
      box = sample_crop_box(pil.size[1], pil.size[0], rng)
      pil = crop_and_resize(pil, box, self.image_size)
    array = to_array(pil, self.channels)
    if self.random_flip and rng.random() < 0.5:
      array = array[:, ::-1]
    return array


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Eval: decode, then (when image_size > 0) resize and center crop."""
  image_size: int = 0
  channels: int = 0

  def __call__(self, image, rng: np.random.Generator | None = None) -> np.ndarray:
    pil = open_image(image)
    if self.image_size:
      pil = crop_and_resize(pil, center_box(pil.size[1], pil.size[0], self.image_size),
                            self.image_size)
    return to_array(pil, self.channels)
