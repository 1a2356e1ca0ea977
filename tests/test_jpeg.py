"""Crop-window JPEG decoding (jaxscale/data/jpeg.py, _jpeg.c): Pillow's pixels, determinism,
the Pillow fallback, and exact resume through TrainLoader."""
import glob
import io

import numpy as np
import pytest
from PIL import Image

from jaxscale import data
from jaxscale.data import jpeg, transforms

needs_extension = pytest.mark.skipif(jpeg._jpeg is None, reason="the _jpeg extension is not built")


def photo(height, width, seed=0):
  """Smooth colour field plus noise: what a camera JPEG holds, small enough to stay fast."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
  return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def encode(array, **options):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=90, **options)
  return buffer.getvalue()


def crop(encoded, box, size, decoder, monkeypatch):
  """transforms.crop_and_resize with the crop-window decoder ("fast") or Pillow ("pil")."""
  monkeypatch.setenv(jpeg.ENV, "" if decoder == "fast" else "pil")
  return np.asarray(transforms.crop_and_resize(Image.open(io.BytesIO(encoded)), box, size))


def boxes(height, width, count=6):
  """Training crops of all kinds, the whole image, the eval window, a sub-pixel box."""
  yield from (transforms.sample_crop_box(height, width, np.random.default_rng(s))
              for s in range(count))
  yield (0, 0, width, height)
  yield transforms.center_box(height, width, 64)
  yield (3.3, 5.7, 40.2, 61.9)


def libjpeg_turbo_headers() -> bool:
  """Whether the headers the extension builds against are installed (Debian's multiarch path)."""
  for path in glob.glob("/usr/include/jconfig.h") + glob.glob("/usr/include/*/jconfig.h"):
    with open(path) as header:
      if "LIBJPEG_TURBO_VERSION" in header.read():
        return True
  return False


@pytest.mark.skipif(not libjpeg_turbo_headers(), reason="no libjpeg-turbo headers here")
def test_extension_is_built_where_libjpeg_turbo_headers_are(monkeypatch):
  assert jpeg._jpeg is not None, "rebuild it: pip install -e . (libjpeg62-turbo-dev is installed)"
  monkeypatch.delenv(jpeg.ENV, raising=False)
  assert jpeg.available()


@needs_extension
@pytest.mark.parametrize("options", [
    {"subsampling": 2},  # 4:2:0, Pillow's default at quality 90
    {"subsampling": 1},  # 4:2:2
    {"subsampling": 0},  # 4:4:4
    {"progressive": True},
])
def test_crop_window_decode_gives_pillows_pixels(options, monkeypatch):
  """Bit for bit what Pillow's full decode and resize give, whatever the window and size."""
  array = photo(150, 203, seed=1)
  encoded = encode(array, **options)
  for box in boxes(150, 203):
    for size in (64, 17):
      monkeypatch.setenv(jpeg.ENV, "")
      pil = Image.open(io.BytesIO(encoded))
      assert jpeg.resize_window(pil, box, size) is not None, "the fast path must be the one tested"
      fast = crop(encoded, box, size, "fast", monkeypatch)
      pillow = crop(encoded, box, size, "pil", monkeypatch)
      assert fast.shape == (size, size, 3) and fast.dtype == np.uint8
      np.testing.assert_array_equal(fast, pillow, err_msg=f"box {box}, size {size}")
  # And Pillow's path is the plain reference: decode all, then crop and resize.
  reference = Image.open(io.BytesIO(encoded)).convert("RGB").resize(
      (64, 64), Image.BILINEAR, box=(10, 20, 150, 140))
  np.testing.assert_array_equal(crop(encoded, (10, 20, 150, 140), 64, "fast", monkeypatch),
                                np.asarray(reference))


@needs_extension
def test_reduced_scale_grey_and_bottom_edge_windows(monkeypatch):
  """DCT-scaled decoding (window >= 2x the size), greyscale JPEGs, and a window on the bottom
  edge of an odd-width image, which made Pillow's resize raise before the box was clamped."""
  big = encode(photo(600, 1001, seed=2))
  for box in [(0, 100, 600, 600), (0, 0, 1001, 600), (401, 7, 1001, 555)]:
    fast = crop(big, box, 64, "fast", monkeypatch)
    np.testing.assert_array_equal(fast, crop(big, box, 64, "pil", monkeypatch))
  grey = encode(photo(120, 161, seed=3)[..., 0])
  fast = crop(grey, (5, 9, 150, 111), 32, "fast", monkeypatch)
  assert fast.shape == (32, 32)
  np.testing.assert_array_equal(fast, crop(grey, (5, 9, 150, 111), 32, "pil", monkeypatch))
  out = jpeg.decode_crop(grey, (5, 9, 150, 111), 32)
  assert out.shape == (32, 32, 1) and np.array_equal(out[..., 0], fast)


@needs_extension
def test_bytes_after_the_end_marker(monkeypatch):
  """Padding after the end-of-image marker, which some encoders write, keeps the fast path."""
  padded = encode(photo(70, 90, seed=5)) + bytes(16)
  monkeypatch.setenv(jpeg.ENV, "")
  assert jpeg.resize_window(Image.open(io.BytesIO(padded)), (4, 4, 80, 60), 40) is not None
  np.testing.assert_array_equal(crop(padded, (4, 4, 80, 60), 40, "fast", monkeypatch),
                                crop(padded, (4, 4, 80, 60), 40, "pil", monkeypatch))


def test_same_seed_same_pixels_on_either_decoder(monkeypatch):
  """TrainTransform: a pure function of (image, seed), and the same one with either decoder."""
  encoded = [encode(photo(90 + 7 * i, 130 - 5 * i, seed=i)) for i in range(4)]
  transform = data.TrainTransform(48)
  outputs = {}
  for decoder in (["fast", "pil"] if jpeg._jpeg is not None else ["pil"]):
    monkeypatch.setenv(jpeg.ENV, "" if decoder == "fast" else "pil")
    outputs[decoder] = [transform(e, np.random.default_rng((7, p))) for p, e in enumerate(encoded)]
    again = [transform(e, np.random.default_rng((7, p))) for p, e in enumerate(encoded)]
    for a, b in zip(outputs[decoder], again):
      np.testing.assert_array_equal(a, b)
    other = transform(encoded[0], np.random.default_rng((8, 0)))
    assert not np.array_equal(other, outputs[decoder][0])  # the seed matters
  for a, b in zip(*outputs.values()):
    np.testing.assert_array_equal(a, b)


def test_pillow_fallback(monkeypatch):
  """Without the extension (or with JAXSCALE_JPEG=pil) Pillow decodes, with the same result;
  CMYK and damaged files always go to Pillow, which keeps its own behaviour on them."""
  encoded = encode(photo(80, 100, seed=4))
  box = (7, 3, 91, 77)
  expected = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB").resize(
      (48, 48), Image.BILINEAR, box=box))  # window < 2x: no draft
  monkeypatch.setenv(jpeg.ENV, "pil")
  assert not jpeg.available()
  assert jpeg.resize_window(Image.open(io.BytesIO(encoded)), box, 48) is None
  monkeypatch.setenv(jpeg.ENV, "")
  monkeypatch.setattr(jpeg, "_jpeg", None)  # as if installed without libjpeg-turbo's headers
  assert not jpeg.available()
  np.testing.assert_array_equal(crop(encoded, box, 48, "fast", monkeypatch), expected)
  np.testing.assert_array_equal(jpeg.decode_crop(encoded, box, 48), expected)
  monkeypatch.undo()

  buffer = io.BytesIO()
  Image.fromarray(photo(40, 50)).convert("CMYK").save(buffer, format="JPEG")
  cmyk = buffer.getvalue()
  assert jpeg.resize_window(Image.open(io.BytesIO(cmyk)), (0, 0, 50, 40), 16) is None
  pillow = transforms.crop_and_resize(Image.open(io.BytesIO(cmyk)), (0, 0, 50, 40), 16)
  assert pillow.mode == "CMYK" and pillow.size == (16, 16)
  truncated = encoded[:len(encoded) * 2 // 3]
  for window in (box, (0, 0, 30, 12)):  # the second ends above the missing part
    assert jpeg.resize_window(Image.open(io.BytesIO(truncated)), window, 32) is None
    for decoder in ("fast", "pil"):
      with pytest.raises(OSError, match="truncated"):
        crop(truncated, window, 32, decoder, monkeypatch)


def test_train_loader_resumes_exactly(monkeypatch):
  """Same stream position, same batch: after a restart, and across the two decoders."""
  source = [{"image": encode(photo(60 + 3 * (i % 5), 80 - 2 * (i % 7), seed=i)), "label": i}
            for i in range(24)]

  def loader():
    return data.TrainLoader(source, seed=3, transform=data.TrainTransform(224), process_index=0,
                            process_count=1)
  first = loader()
  batches = [first.next_batch(8) for _ in range(2)]
  state = first.get_state()
  batches += [first.next_batch(8) for _ in range(2)]  # the last crosses into the next epoch
  assert state == {"position": 16} and batches[0]["image"].shape == (8, 224, 224, 3)
  for decoder in ("", "pil"):
    monkeypatch.setenv(jpeg.ENV, decoder)
    resumed = loader()
    resumed.set_state(state)
    for expected in batches[2:]:
      batch = resumed.next_batch(8)
      np.testing.assert_array_equal(batch["image"], expected["image"])
      np.testing.assert_array_equal(batch["label"], expected["label"])
