"""Per-image transforms on the host: Inception crop, flip, eval resize and center crop.

Images leave the host as uint8 (normalization happens on the device). Every random draw comes
from a generator seeded by (seed, stream position), so a transform is a pure function of the
record and its position: any worker may compute any example and the result is the same.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875, then center-crop `size` (224 <- 256)


def as_hwc(image) -> np.ndarray:
  """A decoded image (TFDS decodes JPEG/PNG with PIL inside its reads) as uint8 HWC."""
  image = np.asarray(image)
  return image if image.ndim == 3 else image[..., None]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[2]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[..., None] if channels == 1 else out


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        area_range: tuple[float, float] = (0.08, 1.0),
                        aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
                        attempts: int = 10) -> np.ndarray:
  """Inception-style crop (Szegedy et al. 2015): a random area and aspect ratio, resized to size.

  Draws a crop covering 8%-100% of the image with aspect ratio in [3/4, 4/3] (log-uniform);
  after `attempts` failures it falls back to the center crop of the whole image.
  """
  height, width = image.shape[:2]
  area = height * width
  for _ in range(attempts):
    target = area * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(math.log(aspect_range[0]), math.log(aspect_range[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return _resize(image[top:top + h, left:left + w], size, size)
  return center_crop(image, size, crop_fraction=1.0)


def center_crop(image: np.ndarray, size: int,
                crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
  """Resizes the shorter side to size / crop_fraction, then takes the central size x size."""
  height, width = image.shape[:2]
  scale = size / crop_fraction / min(height, width)
  h, w = max(size, round(height * scale)), max(size, round(width * scale))
  image = _resize(image, h, w)
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Training: (when image_size > 0) Inception crop, then optional flip."""
  image_size: int = 0
  random_flip: bool = True

  def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
    image = as_hwc(image)
    if self.image_size:
      image = random_resized_crop(image, rng, self.image_size)
    if self.random_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return image


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Eval: (when image_size > 0) resize and center crop."""
  image_size: int = 0

  def __call__(self, image, rng: np.random.Generator | None = None) -> np.ndarray:
    image = as_hwc(image)
    return center_crop(image, self.image_size) if self.image_size else image
