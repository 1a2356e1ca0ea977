"""The data path: offline Fashion-MNIST, the training stream, exact eval, global batches."""
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from jaxscale import config as config_lib, data, mesh as mesh_lib
from jaxscale.data import fashion_mnist, sources
from jaxscale.errors import DataError

IDX_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def fmnist(tfds_dir):
  config = config_lib.defaults()
  config.data_dir = tfds_dir
  return data.load_dataset(config)


def test_fashion_mnist_from_debian_idx_files(fmnist):
  assert (len(fmnist.train), len(fmnist.eval)) == (60000, 10000)
  assert fmnist.num_classes == 10 and fmnist.mean == (0.286 * 255,)
  record = fmnist.eval[0]
  assert record["image"].dtype == np.uint8 and record["image"].shape == (28, 28, 1)
  # The converted records hold the IDX pixels and labels unchanged.
  images = fashion_mnist.read_idx(os.path.join(IDX_DIR, "t10k-images-idx3-ubyte.gz"))
  labels = fashion_mnist.read_idx(os.path.join(IDX_DIR, "t10k-labels-idx1-ubyte.gz"))
  # TFDS stores records in a hashed order: find record 0 among all test images.
  found = np.flatnonzero((images == record["image"][..., 0]).all(axis=(1, 2)))
  assert len(found) >= 1 and labels[found[0]] == record["label"]
  assert "tensorflow" not in sys.modules


def test_missing_data_names_the_options(tmp_path, monkeypatch):
  config = config_lib.defaults()
  config.data_dir = str(tmp_path / "empty")
  config.fashion_mnist_idx_dir = str(tmp_path / "no-idx")
  # Offline (this machine): said at once, with no download attempt that would retry for minutes.
  monkeypatch.setattr(sources, "network_reachable", lambda: False)
  with pytest.raises(DataError, match="fashion_mnist_idx_dir.*dataset-fashion-mnist.*and no "
                                      "network to download it$"):
    sources._fashion_mnist_builder(config.data_dir, config.fashion_mnist_idx_dir)

  def failing(*args, **kwargs):
    raise ConnectionError("no route")
  monkeypatch.setattr(sources, "network_reachable", lambda: True)
  monkeypatch.setattr(sources.tfds.core.DatasetBuilder, "download_and_prepare", failing)
  with pytest.raises(DataError, match=r"download failed \(ConnectionError: no route\)$"):
    sources._fashion_mnist_builder(config.data_dir, config.fashion_mnist_idx_dir)


def test_a_conversion_finished_first_by_another_run_is_reused(tfds_dir, monkeypatch):
  # Two runs sharing data_dir both see it unprepared; the slower one's final rename then fails.
  real_is_prepared, checks = fashion_mnist.FashionMnistIdx.is_prepared, []
  def is_prepared(self):
    checks.append(self)
    return len(checks) > 1 and real_is_prepared(self)
  monkeypatch.setattr(fashion_mnist.FashionMnistIdx, "is_prepared", is_prepared)
  def lost_the_race(*args, **kwargs):
    raise FileExistsError("Destination fashion_mnist_idx/1.0.0 already exists.")
  monkeypatch.setattr(fashion_mnist.FashionMnistIdx, "download_and_prepare", lost_the_race)
  builder = fashion_mnist.prepare(IDX_DIR, tfds_dir)
  assert len(checks) == 2 and builder.info.splits["train"].num_examples == 60000
  # Nothing prepared there: the error is not swallowed.
  with pytest.raises(FileExistsError, match="already exists"):
    fashion_mnist.prepare(IDX_DIR, os.path.join(tfds_dir, "elsewhere"))


def test_a_download_finished_first_by_another_run_is_reused(tmp_path, monkeypatch):
  # The catalog download has the IDX conversion's race (no IDX files here, so it downloads).
  class Catalog:
    info = None  # read only when prepared at the first look
    prepared = False
    other_run_finishes_first = True
    def is_prepared(self):
      return Catalog.prepared
    def download_and_prepare(self, **kwargs):
      assert kwargs == {"file_format": "array_record"}
      Catalog.prepared = Catalog.other_run_finishes_first
      raise FileExistsError("Destination fashion_mnist/3.0.1 already exists.")
  monkeypatch.setattr(sources.tfds, "builder", lambda name, data_dir: Catalog())
  monkeypatch.setattr(sources, "network_reachable", lambda: True)
  no_idx = str(tmp_path / "no-idx")
  assert isinstance(sources._fashion_mnist_builder(str(tmp_path), no_idx), Catalog)
  # Nothing prepared by another run: the failure is reported, not swallowed.
  Catalog.prepared = Catalog.other_run_finishes_first = False
  with pytest.raises(DataError, match=r"download failed \(FileExistsError: "):
    sources._fashion_mnist_builder(str(tmp_path), no_idx)


def test_each_example_once_per_epoch_across_processes_and_batch_sizes(fmnist):
  source = sources.SyntheticSource(100, (4, 4, 1), 10, seed=0)
  # Tag each record with its index through the label, to trace the order.
  tagged = [dict(source[i], label=i) for i in range(100)]
  loaders = [data.TrainLoader(tagged, seed=3, process_index=p, process_count=2) for p in range(2)]
  seen = []
  for size in [10, 30, 20, 40, 20, 40, 40]:  # 200 examples: exactly two epochs
    seen += [int(l) for loader in loaders for l in loader.next_batch(size)["label"]]
  assert sorted(seen[:100]) == list(range(100)) and sorted(seen[100:]) == list(range(100))
  assert seen[:100] != seen[100:]  # a new permutation each epoch
  assert loaders[0].epoch == 2.0
  # Each process reads a disjoint part of every batch.
  first = data.TrainLoader(tagged, seed=3, process_index=0, process_count=2).next_batch(10)
  second = data.TrainLoader(tagged, seed=3, process_index=1, process_count=2).next_batch(10)
  assert not set(first["label"]) & set(second["label"])


def test_stream_is_deterministic_and_resumable(fmnist):
  flips = data.TrainTransform(random_flip=True)
  a = data.TrainLoader(fmnist.train, seed=7, transform=flips, process_index=0, process_count=1)
  batches = [a.next_batch(32) for _ in range(3)]
  b = data.TrainLoader(fmnist.train, seed=7, transform=flips, process_index=0, process_count=1)
  b.set_state({"position": 64})
  np.testing.assert_array_equal(b.next_batch(32)["image"], batches[2]["image"])
  c = data.TrainLoader(fmnist.train, seed=8, process_index=0, process_count=1)
  assert not np.array_equal(c.next_batch(32)["label"], batches[0]["label"])
  assert a.get_state() == {"position": 96}


def test_eval_covers_every_example_once_with_padding():
  source = [{"image": np.zeros((2, 2, 1), np.uint8), "label": i} for i in range(23)]
  for processes in (1, 2, 4):
    labels, total = [], 0
    for p in range(processes):
      for batch in data.eval_batches(source, 8, process_index=p, process_count=processes):
        assert batch["image"].shape[0] == 8 // processes
        labels += [int(l) for l, m in zip(batch["label"], batch["mask"]) if m]
        total += batch["mask"].sum()
    assert total == 23 and sorted(labels) == list(range(23))
  assert data.num_eval_batches(23, 8) == 3


def test_local_batches_become_one_global_array(fmnist):
  mesh = mesh_lib.create_mesh("2x4")
  loader = data.TrainLoader(fmnist.train, seed=0, process_index=0, process_count=1)
  local = loader.next_batch(64)
  array = jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh), local["image"])
  assert array.shape == (64, 28, 28, 1) and array.dtype == np.uint8
  assert len(array.addressable_shards) == 8
  assert array.addressable_shards[0].data.shape == (8, 28, 28, 1)
  np.testing.assert_array_equal(np.asarray(array), local["image"])


def test_a_users_prepared_builder_is_found_without_its_code(tfds_dir, tmp_path):
  # A dataset prepared by a builder that this process never imports: TFDS's files in data_dir
  # under a name that no registered builder has.
  shutil.copytree(os.path.join(tfds_dir, "fashion_mnist_idx"), tmp_path / "my_garments")
  config = config_lib.defaults()
  config.data_dir, config.dataset = str(tmp_path), "my_garments"
  assert "my_garments" not in sources._catalog()
  dataset = data.load_dataset(config)
  assert (len(dataset.train), len(dataset.eval), dataset.num_classes) == (60_000, 10_000, 10)
  assert dataset.train[0]["image"].shape == (28, 28, 1)
