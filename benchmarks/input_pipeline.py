"""Host input throughput: JPEG decode + Inception random-resized crop 224 + flip, per CPU core.

Generates ImageNet-like JPEGs (about 500x375, smooth content plus noise, quality 90), writes them
as a TFDS array_record dataset with an Image feature (no TensorFlow needed), and measures, with
each of jaxscale's two JPEG decoders (the crop-window C extension, jaxscale/data/jpeg.py, when it
is built, and Pillow, its fallback; JAXSCALE_JPEG=pil selects Pillow):
  - `TrainTransform(224)` alone, image after image on one core: the per-image work;
  - `TrainLoader` with it, from JPEGs in memory and from the TFDS dataset (training's path: TFDS
    reads, grain shuffles, jaxscale crops, resizes, flips and stacks), on one background
    thread (one core); then the first decoder with `--workers N` processes;
  - tf.data, when `--tf-python` (default: this Python) has TensorFlow, in a child process so
    that the jaxscale side runs without TensorFlow as training does, doing the same work the
    standard TF way (`sample_distorted_bounding_box` + fused `decode_and_crop_jpeg` + resize +
    flip) on one core, from the JPEG bytes in memory;
and prints images/s per core (and per CPU-second of the process, which other load on the machine
disturbs less), each the best of --rounds runs, the ratios, and the cores one H200 at 7,000
images/s would need.

  python benchmarks/input_pipeline.py [--images 512] [--workers 2] [--tf-python VENV/bin/python]
"""
from __future__ import annotations

import argparse
import contextlib
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


@contextlib.contextmanager
def decoder(name: str):
  """JPEG decoding by jaxscale's crop-window extension ("crop-window") or by Pillow ("pillow").

  An environment variable, so that worker processes follow it too."""
  from jaxscale.data import jpeg
  before = os.environ.get(jpeg.ENV)
  os.environ[jpeg.ENV] = "pil" if name == "pillow" else ""
  try:
    yield
  finally:
    if before is None:
      os.environ.pop(jpeg.ENV)
    else:
      os.environ[jpeg.ENV] = before


def best(measure, rounds: int):
  """The highest (wall, CPU) rates over `rounds` runs of measure(): on a shared machine, the
  runs that other load disturbed least. None if measure() returns None."""
  runs = [measure() for _ in range(rounds)]
  if any(r is None for r in runs):
    return None
  return max(r[0] for r in runs), max(r[1] for r in runs)


def timed(count: int, run) -> tuple[float, float]:
  """(images per second of wall time, images per CPU-second of this process) while run() runs."""
  wall, cpu = time.perf_counter(), time.process_time()
  run()
  return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def transform_rate(jpegs: list[bytes], repeats: int) -> tuple[float, float]:
  """`TrainTransform(224)` image after image, as a loader's worker calls it, on one core."""
  from jaxscale import data
  transform = data.TrainTransform(224)
  transform(jpegs[0], np.random.default_rng(0))  # warm up

  def run():
    for p in range(repeats * len(jpegs)):
      out = transform(jpegs[p % len(jpegs)], np.random.default_rng((0, p)))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  return timed(repeats * len(jpegs), run)


def jaxscale_rate(source, batch: int, workers: int, repeats: int) -> tuple[float, float]:
  """Images/s of the jaxscale training input path over `repeats` epochs of the source."""
  from jaxscale import data
  loader = data.TrainLoader(source, seed=0, transform=data.TrainTransform(224), workers=workers,
                            prefetch=1, process_index=0, process_count=1)
  loader.next_batch(batch)  # starts the thread or the worker processes
  steps = repeats * len(source) // batch

  def run():
    for _ in range(steps):
      out = loader.next_batch(batch)
    assert out["image"].shape == (batch, 224, 224, 3) and out["image"].dtype == np.uint8
  return timed(steps * batch, run)


def shuffle_lookup_us(size: int) -> float:
  """Microseconds per position of grain's index shuffle (TrainLoader's order) at this size."""
  import grain
  order = grain.MapDataset.range(size).shuffle(seed=0)
  order[0]
  start = time.perf_counter()
  for p in range(1000):
    order[p]
  return (time.perf_counter() - start) * 1e3


def stack_ms(flipped: bool, batch: int = 64) -> float:
  """Milliseconds per image of stacking a batch of 224x224x3 images (as TrainLoader collates
  them), horizontally flipped views (TrainTransform's flip) or contiguous arrays."""
  image = np.zeros((224, 224, 3), np.uint8)
  images = [image[:, ::-1] if flipped else image] * batch
  start = time.perf_counter()
  for _ in range(5):
    np.stack(images)
  return (time.perf_counter() - start) * 1e3 / (5 * batch)


def tf_data_rate(jpegs: list[bytes], batch: int, repeats: int) -> tuple[float, float] | None:
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
  dataset = (tf.data.Dataset.from_tensor_slices(jpegs).repeat(repeats + 1)  # + the warm-up
             .map(preprocess, num_parallel_calls=1).batch(batch).prefetch(1)
             .with_options(options))
  iterator = iter(dataset)
  next(iterator)  # warm up (graph tracing)
  count, wall, cpu = 0, time.perf_counter(), time.process_time()
  for images in iterator:
    count += int(images.shape[0])
  return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def tf_data_rate_in_subprocess(args) -> tuple[float, float] | None:
  """The tf.data reference in its own process: jaxscale's side runs without TensorFlow loaded."""
  command = [args.tf_python, __file__, "--tf-reference", "--images", str(args.images),
             "--batch", str(args.batch), "--repeats", str(args.repeats),
             "--rounds", str(args.rounds)]
  out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  rates = json.loads(lines[-1])["images_per_sec"] if lines else None
  return tuple(rates) if rates else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2, help="passes over the images")
  parser.add_argument("--workers", type=int, default=2, help="worker processes for the last run")
  parser.add_argument("--rounds", type=int, default=3,
                      help="times each measurement runs; the best counts (least disturbed)")
  parser.add_argument("--tf-python", default=sys.executable,
                      help="a Python with TensorFlow for the tf.data reference (e.g. a venv)")
  parser.add_argument("--tf-reference", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  started = time.perf_counter()
  jpegs = make_jpegs(args.images)
  if args.tf_reference:
    print(json.dumps({"images_per_sec": best(
        lambda: tf_data_rate(jpegs, args.batch, args.repeats), args.rounds)}))
    return
  from jaxscale.data import jpeg
  generated = time.perf_counter() - started
  sizes = [Image.open(io.BytesIO(j)).size for j in jpegs[:100]]
  print(f"{args.images} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB, "
        f"mean size {np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f}, "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start")
  if jpeg._jpeg is None:
    print("crop-window decoder: not built (no libjpeg-turbo headers at install): Pillow only")
    decoders = ["pillow"]
  else:
    version = jpeg._jpeg.LIBJPEG_TURBO_VERSION_NUMBER
    print(f"crop-window decoder: built, libjpeg-turbo {version // 1000000}."
          f"{version // 1000 % 1000}.{version % 1000}")
    decoders = ["crop-window", "pillow"]

  rates = {}  # (measurement, decoder) -> (wall, cpu) images/s
  memory = [{"image": j, "label": i % 1000} for i, j in enumerate(jpegs)]
  with tempfile.TemporaryDirectory() as data_dir:
    source = write_tfds(jpegs, data_dir)
    for name in decoders:
      with decoder(name):
        rates["transform", name] = best(lambda: transform_rate(jpegs, args.repeats), args.rounds)
        rates["memory", name] = best(
            lambda: jaxscale_rate(memory, args.batch, 0, args.repeats), args.rounds)
        rates["tfds", name] = best(
            lambda: jaxscale_rate(source, args.batch, 0, args.repeats), args.rounds)
    if args.workers:
      with decoder(decoders[0]):
        many = jaxscale_rate(source, args.batch, args.workers, args.repeats)[0]
  reference = tf_data_rate_in_subprocess(args)

  def cell(rate):
    return f"{rate[0]:7.0f} [{rate[1]:5.0f}]"
  print(f"\nimages/s on one core [per CPU-second], best of {args.rounds}  " +
        "  ".join(f"{name:>15s}" for name in decoders))
  for key, label in (("transform", "TrainTransform(224) alone"),
                     ("memory", "TrainLoader, JPEGs in memory"),
                     ("tfds", "TrainLoader, TFDS array_record")):
    print(f"  {label:40s}" + "  ".join(f"{cell(rates[key, name]):>15s}" for name in decoders))
  if reference is None:
    print("  tf.data: TensorFlow is not installed here; no reference in this run")
  else:
    print(f"  {'tf.data, JPEGs in memory':40s}{cell(reference):>15s}")
    print("\nratio to tf.data per core (wall [CPU]):")
    for name in decoders:
      print(f"  {name:12s}" + ", ".join(
          f"{key} {rates[key, name][0] / reference[0]:.2f} "
          f"[{rates[key, name][1] / reference[1]:.2f}]" for key in ("tfds", "memory", "transform")))
  main_rate = rates["tfds", decoders[0]][0]
  if args.workers:
    print(f"\nTrainLoader, TFDS, {decoders[0]}, {args.workers} worker processes: "
          f"{many:.0f} images/s ({many / main_rate:.2f}x one core)")
  beyond = {key: 1e3 / rates[key, decoders[0]][1] - 1e3 / rates["transform", decoders[0]][1]
            for key in ("memory", "tfds")}
  print(f"TrainLoader's CPU per image beyond the transform ({decoders[0]}): "
        f"{beyond['memory']:.2f} ms from memory, {beyond['tfds']:.2f} ms from TFDS; measured "
        f"apart: grain's index shuffle {shuffle_lookup_us(len(jpegs)):.0f} us per position for "
        f"{len(jpegs)} records ({shuffle_lookup_us(1_281_167):.0f} us for ImageNet's 1,281,167), "
        f"np.stack {stack_ms(flipped=True):.2f} ms per flipped image (half are), "
        f"{stack_ms(flipped=False):.2f} ms per unflipped one")
  print(f"cores for one H200 at {H200_IMAGES_PER_SEC:,} images/s: "
        f"{H200_IMAGES_PER_SEC / main_rate:.0f} (jaxscale, {decoders[0]})" +
        (f", {H200_IMAGES_PER_SEC / reference[0]:.0f} (tf.data)" if reference else ""))
  elapsed = time.perf_counter() - started
  print(f"\nThis run: {elapsed:.0f} s, {generated:.0f} s of it making the JPEGs. To run it bigger: "
        f"the time grows as --images x --repeats x --rounds ({args.images} x {args.repeats} x "
        f"{args.rounds} here), the TFDS copy on temporary disk and the JPEGs "
        f"in memory as --images ({sum(map(len, jpegs)) / 1e6:.0f} MB each here); --workers N "
        "wants N idle cores; and photos rather than synthetic JPEGs need a prepared dataset.")

if __name__ == "__main__":
  main()
