"""Host input throughput: JPEG decode + Inception random-resized crop 224 + flip, per CPU core.

Generates ImageNet-like JPEGs (about 500x375, smooth content plus noise, quality 90), writes them
as a TFDS array_record dataset with an Image feature (no TensorFlow needed), and measures:
  - jaxscale: `TrainLoader` with `TrainTransform(224)`: TFDS reads and decodes (PIL), jaxscale
    crops, resizes and flips; one background thread (one core), and `--workers N` processes;
  - tf.data, when `--tf-python` (default: this Python) has TensorFlow, in a child process so
    that the jaxscale side runs without TensorFlow as training does, doing the same work the standard TF way
    (`sample_distorted_bounding_box` + fused `decode_and_crop_jpeg` + resize + flip) on one
    core, from the JPEG bytes in memory;
and prints images/s per core, the ratio, and the cores one H200 at 7,000 images/s would need.

  python benchmarks/input_pipeline.py [--images 512] [--workers 2] [--tf-python VENV/bin/python]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

H200_IMAGES_PER_SEC = 7_000  # ResNet-50 training on one H200 (shared reference figures)


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """Photo-like JPEGs: a smooth random field upsampled to ~500x375, plus pixel noise."""
  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(count):
    width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    jpegs.append(buffer.getvalue())
  return jpegs


def write_tfds(jpegs: list[bytes], data_dir: str):
  """An array_record TFDS dataset of the JPEGs, returned as its train data source."""
  import tensorflow_datasets as tfds

  class SyntheticJpegs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, jpeg in enumerate(jpegs):
        yield i, {"image": io.BytesIO(jpeg), "label": i % 1000}

  builder = SyntheticJpegs(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})


def jaxscale_rate(source, batch: int, workers: int, repeats: int) -> float:
  """Images/s of the jaxscale training input path over `repeats` epochs of the source."""
  from jaxscale import data
  loader = data.TrainLoader(source, seed=0, transform=data.TrainTransform(224), workers=workers,
                            prefetch=1, process_index=0, process_count=1)
  loader.next_batch(batch)  # starts the thread or the worker processes
  steps = repeats * len(source) // batch
  start = time.perf_counter()
  for _ in range(steps):
    out = loader.next_batch(batch)
  assert out["image"].shape == (batch, 224, 224, 3) and out["image"].dtype == np.uint8
  return steps * batch / (time.perf_counter() - start)


def tf_data_rate(jpegs: list[bytes], batch: int, repeats: int) -> float | None:
  """Images/s of the same work in tf.data on one core, or None without TensorFlow."""
  try:
    import tensorflow as tf
  except ImportError:
    return None
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)

  def preprocess(jpeg):
    shape = tf.io.extract_jpeg_shape(jpeg)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4]), area_range=(0.08, 1.0), aspect_ratio_range=(0.75, 4 / 3),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, (224, 224), method="bilinear")
    return tf.cast(tf.image.random_flip_left_right(image), tf.uint8)

  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  dataset = (tf.data.Dataset.from_tensor_slices(jpegs).repeat(repeats)
             .map(preprocess, num_parallel_calls=1).batch(batch).prefetch(1)
             .with_options(options))
  iterator = iter(dataset)
  next(iterator)  # warm up (graph tracing)
  count, start = 0, time.perf_counter()
  for images in iterator:
    count += int(images.shape[0])
  return count / (time.perf_counter() - start)


def tf_data_rate_in_subprocess(args) -> float | None:
  """The tf.data reference in its own process: jaxscale's side runs without TensorFlow loaded."""
  command = [args.tf_python, __file__, "--tf-reference", "--images", str(args.images),
             "--batch", str(args.batch), "--repeats", str(args.repeats)]
  out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  return json.loads(lines[-1])["images_per_sec"] if lines else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2, help="passes over the images")
  parser.add_argument("--workers", type=int, default=2, help="worker processes for the 2nd run")
  parser.add_argument("--tf-python", default=sys.executable,
                      help="a Python with TensorFlow for the tf.data reference (e.g. a venv)")
  parser.add_argument("--tf-reference", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  jpegs = make_jpegs(args.images)
  if args.tf_reference:
    print(json.dumps({"images_per_sec": tf_data_rate(jpegs, args.batch, args.repeats)}))
    return
  sizes = [Image.open(io.BytesIO(j)).size for j in jpegs[:100]]
  print(f"{args.images} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB, "
        f"mean size {np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f}, "
        f"{os.cpu_count()} CPU cores")
  with tempfile.TemporaryDirectory() as data_dir:
    source = write_tfds(jpegs, data_dir)
    one_core = jaxscale_rate(source, args.batch, 0, args.repeats)
    many = jaxscale_rate(source, args.batch, args.workers, args.repeats) if args.workers else None
  reference = tf_data_rate_in_subprocess(args)

  print(f"jaxscale, 1 core:            {one_core:7.0f} images/s")
  if many:
    print(f"jaxscale, {args.workers} worker processes: {many:7.0f} images/s "
          f"({many / one_core:.2f}x one core)")
  if reference is None:
    print("tf.data: TensorFlow is not installed here; no reference in this run")
  else:
    print(f"tf.data, 1 core:             {reference:7.0f} images/s")
    print(f"ratio jaxscale / tf.data (per core): {one_core / reference:.2f}")
  print(f"cores for one H200 at {H200_IMAGES_PER_SEC:,} images/s: "
        f"{H200_IMAGES_PER_SEC / one_core:.0f} (jaxscale)" +
        (f", {H200_IMAGES_PER_SEC / reference:.0f} (tf.data)" if reference else ""))


if __name__ == "__main__":
  main()
