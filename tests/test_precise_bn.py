"""Precise BN and the BN momentum rule: BatchNorm evaluates correctly at few steps per epoch.

The few-steps-per-epoch setting: a 2,048-image subset of Fashion-MNIST at global batch 128 is
16 steps per epoch, the records' regime (81,920 of ImageNet's 1.28M is 16). After one epoch
the weights fit the training data, but running averages of momentum 0.99 still hold 85% of
their initial values, and eval with them is at chance.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxscale import build, checkpoint, config as config_lib, precise_bn, train
from jaxscale.data import fashion_mnist
from conftest import MEAN, STD, tiny_pieces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


# batch_stats_step: the BN statistics of one global batch, the same on every runner.

def make_runner(parallelism, devices, grad_accum_steps=1):
  return tiny_pieces(devices, f"parallelism={parallelism}",
                     f"grad_accum_steps={grad_accum_steps}").runner


def make_batch(seed):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
          "label": rng.integers(0, 10, 16).astype(np.int32)}


@pytest.fixture(scope="module")
def one_device():
  runner = make_runner("shard_map", jax.devices()[:1])
  state = runner.init_state(jax.random.key(0))
  return state, jax.device_get(runner.batch_stats_step(state, runner.put_batch(make_batch(0))))


@pytest.fixture(scope="module", params=["shard_map", "pmap"])
def eight_devices(request):
  runner = make_runner(request.param, jax.devices())
  return runner, runner.init_state(jax.random.key(0))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_batch_stats_on_eight_devices_match_one_device(one_device, eight_devices):
  _, reference = one_device
  runner, state = eight_devices
  stats = runner.batch_stats_step(state, runner.put_batch(make_batch(0)))
  # Replicated global arrays whichever the runner: the state's layout after global_state.
  assert all(x.sharding.is_fully_replicated and x.shape == y.shape
             for x, y in zip(jax.tree.leaves(stats), jax.tree.leaves(reference)))
  assert_trees_close(jax.device_get(stats), reference)


def test_batch_stats_with_accumulation_average_the_micro_batches(one_device):
  """With k micro-batches the statistics are those training normalizes with: per micro-batch,
  averaged (ghost batches), computed one micro-batch at a time."""
  state, _ = one_device
  batch = make_batch(0)
  batch["image"][:8] //= 4  # a dark half and a bright half: ghost and whole statistics differ
  runner = make_runner("shard_map", jax.devices()[:1], grad_accum_steps=2)
  stats = jax.device_get(runner.batch_stats_step(state, runner.put_batch(batch)))
  plain = make_runner("shard_map", jax.devices()[:1])
  whole = jax.device_get(plain.batch_stats_step(state, plain.put_batch(batch)))
  halves = [{k: v[i * 8:(i + 1) * 8] for k, v in batch.items()} for i in range(2)]
  per_half = [jax.device_get(plain.batch_stats_step(state, plain.put_batch(h))) for h in halves]
  assert_trees_close(stats, jax.tree.map(lambda a, b: (a + b) / 2, *per_half))
  # The whole batch's variance holds the spread between the halves: the comparison can fail.
  assert stats["bn_init"]["var"].sum() < 0.8 * whole["bn_init"]["var"].sum()


def test_batch_stats_are_the_batch_mean_and_variance(one_device):
  """The first BN layer's statistics are those of its input, the stem conv of the images."""
  state, stats = one_device
  images = (make_batch(0)["image"].astype(np.float64) - MEAN[0]) / STD[0]
  kernel = np.asarray(jax.device_get(state.params["conv_init"]["kernel"]), np.float64)
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))  # SAME for a 3x3 kernel
  conv = sum(np.einsum("nhwc,co->nhwo", padded[:, i:i + 8, j:j + 8], kernel[i, j])
             for i in range(3) for j in range(3))
  np.testing.assert_allclose(stats["bn_init"]["mean"], conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["bn_init"]["var"], conv.var((0, 1, 2)), rtol=1e-4)
  # The untrained running averages are 0 and 1: the statistics are not those.
  assert np.abs(stats["bn_init"]["var"] - 1).max() > 0.1


def test_precise_batch_stats_average_the_batches_and_keep_the_weights(eight_devices):
  runner, state = eight_devices
  batches = [make_batch(0), make_batch(1)]
  new = runner.global_state(precise_bn.precise_batch_stats(runner, state, batches))
  per_batch = [jax.device_get(runner.batch_stats_step(state, runner.put_batch(b)))
               for b in batches]
  assert_trees_close(jax.device_get(new.batch_stats),
                     jax.tree.map(lambda a, b: (a + b) / 2, *per_batch))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params),
               jax.device_get(runner.global_state(state).params))


# The trainer end to end in the few-steps-per-epoch setting.

def write_idx(path, array):
  """An uncompressed IDX file of unsigned bytes (magic 0x08, then the dimensions)."""
  header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(
      d.to_bytes(4, "big") for d in array.shape)
  with open(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_subset(tmp_path_factory):
  """Fashion-MNIST IDX files of the first 2,048 training and 1,000 test images."""
  idx_dir = tmp_path_factory.mktemp("fashion_subset")
  for split, count in (("train", 2048), ("test", 1000)):
    sources = fashion_mnist.idx_paths(fashion_mnist.DEFAULT_IDX_DIR, split)
    for source in sources:
      name = os.path.basename(source).removesuffix(".gz")
      write_idx(str(idx_dir / name), fashion_mnist.read_idx(source)[:count])
  return str(idx_dir)


def few_steps_config(idx_dir, **overrides):
  """One epoch of 16 steps, SGD, BN momentum 0.99; a checkpoint at steps 8 and 16."""
  config = config_lib.load(QUICKSTART, [
      "dataset=fashion_mnist", f"fashion_mnist_idx_dir={idx_dir}",
      f"data_dir={os.path.join(idx_dir, 'tfds')}", "global_batch_size=128", "num_epochs=1.0",
      "learning_rate=0.4", "lr_schedule.warmup_epochs=0.25", "optimizer.weight_decay=0.0",
      "random_flip=False", "bn_momentum=0.99", "checkpoint_every_steps=8",
      "checkpoint_async=False", "log_every_steps=16", "progress_bar=off"])
  config.update(overrides)
  return config


def train_accuracy(workdir):
  events = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [e["accuracy"] for e in events if e["split"] == "train"][-1]


@pytest.fixture(scope="module")
def runs(fashion_subset, tmp_path_factory):
  """(workdir, result) without precise BN and with it."""
  out = {}
  for name, overrides in (("lagging", {}), ("precise", {"precise_bn_batches": 4})):
    workdir = str(tmp_path_factory.mktemp(name))
    out[name] = workdir, train.run(few_steps_config(fashion_subset, **overrides), workdir)
  return out


def test_precise_bn_replaces_lagging_statistics(runs):
  lagging_dir, lagging = runs["lagging"]
  precise_dir, precise = runs["precise"]
  # The same training (the precise-BN stream is separate), so the same train accuracy.
  assert train_accuracy(precise_dir) == train_accuracy(lagging_dir) > 0.45
  # Measured: 0.105 with the lagging statistics, 0.623 with precise BN (train batch 0.586).
  assert lagging["accuracy"] < 0.25
  assert precise["accuracy"] > 0.5 and precise["accuracy"] > lagging["accuracy"] + 0.3
  jax.tree.map(np.testing.assert_array_equal, precise["state"].params, lagging["state"].params)


def test_momentum_rule_bounds_the_time_constant():
  """min(bn_momentum, 1 - 1 / (bn_momentum_epochs * steps_per_epoch)), at least 0."""
  config = config_lib.defaults()
  config.update({"bn_momentum": 0.99, "bn_momentum_epochs": 0.25})
  assert build.bn_momentum_for(config, steps_per_epoch=16) == 0.75  # 4 steps
  config.bn_momentum_epochs = 0.01  # less than a step: the last batch's statistics alone
  assert build.bn_momentum_for(config, steps_per_epoch=16) == 0.0
  config.bn_momentum_epochs = 100.0  # never above bn_momentum
  assert build.bn_momentum_for(config, steps_per_epoch=16) == 0.99
  config.bn_momentum_epochs = 0.0  # off
  assert build.bn_momentum_for(config, steps_per_epoch=1) == 0.99


def test_final_checkpoint_holds_the_statistics_eval_used(runs):
  workdir, result = runs["precise"]
  state, meta = checkpoint.read(os.path.join(workdir, "checkpoints", "16"))
  assert meta["step"] == 16
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"],
               jax.device_get(result["state"].batch_stats))


def test_resumed_run_ends_bit_identical(runs, fashion_subset, tmp_path, capsys):
  """Killed after the save of step 8: the resumed run trains on, redoes precise BN, and ends
  with the same checkpoint and eval as the uninterrupted run."""
  reference_dir, reference = runs["precise"]
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "16"))
  result = train.run(few_steps_config(fashion_subset, precise_bn_batches=4), workdir)
  log = capsys.readouterr().err
  assert "checkpoints/8 (epoch 0.50)" in log and "precise BN: statistics from 4 batches" in log
  for key in ("accuracy", "loss", "num_examples"):
    assert result[key] == reference[key], key
  state, _ = checkpoint.read(os.path.join(workdir, "checkpoints", "16"))
  reference_state, _ = checkpoint.read(os.path.join(reference_dir, "checkpoints", "16"))
  jax.tree.map(np.testing.assert_array_equal, state, reference_state)
