"""The ImageNet-scale input path: TFDS catalog datasets (mocked), crops, workers, exact eval."""
import io

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from jaxscale import build, config as config_lib, data, train
from jaxscale.errors import DataError
from jaxscale.data import transforms
from jaxscale.data.sources import SyntheticSource


def imagenet_config(**overrides):
  config = config_lib.defaults()
  config.update({"dataset": "imagenet2012", "image_size": 32, "eval_split": "validation",
                 **overrides})
  return config


@pytest.fixture
def mock_imagenet():
  # Random images of random sizes, as TFDS's mock of imagenet2012 makes them.
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def test_imagenet2012_batches(mock_imagenet):
  dataset = data.load_dataset(imagenet_config())
  assert dataset.num_classes == 1000 and dataset.varying_size and dataset.channels == 3
  sizes = {dataset.train[i]["image"].shape for i in range(5)}
  assert len(sizes) > 1  # varying sizes in, fixed size out
  loader = data.TrainLoader(dataset.train, seed=0, transform=data.TrainTransform(32),
                            process_index=0, process_count=1)
  batch = loader.next_batch(16)
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["image"].max() > 200 and batch["image"].min() < 50  # raw 0..255 pixels
  assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() < 1000
  again = data.TrainLoader(dataset.train, seed=0, transform=data.TrainTransform(32),
                           process_index=0, process_count=1).next_batch(16)
  np.testing.assert_array_equal(batch["image"], again["image"])
  evals = list(data.eval_batches(dataset.eval, 24, transform=data.EvalTransform(32),
                                 process_index=0, process_count=1))
  assert [b["image"].shape for b in evals] == [(24, 32, 32, 3)] * 2
  assert sum(b["mask"].sum() for b in evals) == 40


def test_trainer_runs_on_a_catalog_dataset(mock_imagenet, tmp_path):
  config = imagenet_config(model="resnet8", global_batch_size=16, eval_batch_size=16,
                           num_train_steps=2, log_every_steps=1)
  result = train.run(config, str(tmp_path))
  assert result["num_examples"] == 40 and 0.0 <= result["accuracy"] <= 1.0


def test_unprepared_dataset_names_data_dir(tmp_path):
  config = config_lib.defaults()
  config.update(dataset="cifar10", data_dir=str(tmp_path))
  with pytest.raises(DataError, match=f"'cifar10'.*not prepared.*{tmp_path}.*data_dir"):
    data.load_dataset(config)


def test_varying_image_sizes_need_image_size(mock_imagenet):
  with pytest.raises(config_lib.ConfigError, match="config key 'image_size': imagenet2012 has "
                                                   "images of varying size"):
    build.build(imagenet_config(image_size=0, global_batch_size=16))


def coordinate_image(height, width):
  """Pixel (y, x) holds (y mod 256, x mod 256, 0): a crop shows where it came from."""
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([y % 256, x % 256, np.zeros_like(y)], -1).astype(np.uint8)


def test_random_resized_crop_draws_area_and_aspect_in_range():
  image = coordinate_image(200, 250)
  crop = transforms.TrainTransform(image_size=64, random_flip=False)
  for seed in range(50):
    out = crop(image, np.random.default_rng(seed))
    assert out.shape == (64, 64, 3)
    # The crop's extent in the source, read back from the coordinates it carries.
    h = int(out[-1, 0, 0]) - int(out[0, 0, 0]) + 1
    w = int(out[0, -1, 1]) - int(out[0, 0, 1]) + 1
    area = h * w / (200 * 250)
    assert 0.06 <= area <= 1.0 and 0.6 <= w / h <= 1.5, (seed, h, w)


def test_center_crop_takes_the_middle():
  out = transforms.EvalTransform(224)(coordinate_image(375, 500))
  assert out.shape == (224, 224, 3)
  # The kept window is the central 328x328 (375 * 0.875) of the 375x500 image.
  assert abs(int(out[0, 0, 0]) - 23) <= 2 and abs(int(out[0, 0, 1]) - 86) <= 2
  assert abs(int(out[-1, -1, 0]) - 351) % 256 <= 2


def jpeg_bytes(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def test_jpeg_decoded_at_reduced_scale_matches_full_decode():
  """Draft decoding (DCT scaling) must give what decode-then-crop gives, up to resampling."""
  y, x = np.meshgrid(np.linspace(0, 1, 600), np.linspace(0, 1, 800), indexing="ij")
  smooth = (np.stack([y, x, (x + y) / 2], -1) * 255).astype(np.uint8)
  encoded = jpeg_bytes(smooth)
  for transform in (transforms.TrainTransform(64, random_flip=False), transforms.EvalTransform(64)):
    fast = transform(encoded, np.random.default_rng(3)).astype(float)
    full = transform(smooth, np.random.default_rng(3)).astype(float)
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.abs(fast - full).mean() < 3.0


def test_flip_is_a_fair_coin_per_position():
  transform = transforms.TrainTransform(image_size=0, random_flip=True)
  image = coordinate_image(4, 6)
  flipped = [transform(image, np.random.default_rng((0, p)))[0, 0, 1] == 5 for p in range(400)]
  assert 150 < sum(flipped) < 250


def test_worker_processes_give_the_same_batches_and_resume(tfds_dir):
  config = config_lib.defaults()
  config.data_dir = tfds_dir
  dataset = data.load_dataset(config)
  flips = data.TrainTransform(random_flip=True)
  single = data.TrainLoader(dataset.train, seed=1, transform=flips, process_index=0,
                            process_count=1)
  workers = data.TrainLoader(dataset.train, seed=1, transform=flips, workers=2,
                             process_index=0, process_count=1)
  for size in (64, 64, 128):
    a, b = single.next_batch(size), workers.next_batch(size)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  resumed = data.TrainLoader(dataset.train, seed=1, transform=flips, workers=2,
                             process_index=0, process_count=1)
  resumed.set_state(single.get_state())
  np.testing.assert_array_equal(resumed.next_batch(64)["image"], single.next_batch(64)["image"])


def test_imagenet_sized_eval_counts_50000_once():
  source = [{"image": np.zeros((1, 1, 1), np.uint8), "label": i % 1000} for i in range(50_000)]
  total = 0
  for process in range(4):
    for batch in data.eval_batches(source, 1024, process_index=process, process_count=4):
      total += batch["mask"].sum()
  assert total == 50_000 and data.num_eval_batches(50_000, 1024) == 49
