"""Test set-up: 8 CPU devices, fixed before JAX starts its backend, and one compilation cache.

Most of the suite's time is XLA compiling the same small steps again: a persistent compilation
cache for the session (this process and the trainer processes the tests start) compiles each
program once.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxscale_tests_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir holding Fashion-MNIST converted once from Debian's IDX files."""
  from jaxscale.data import fashion_mnist
  path = str(tmp_path_factory.mktemp("tfds"))
  fashion_mnist.prepare("/usr/share/datasets/fashion-mnist", path)
  return path


def run_main(args, capsys):
  """Runs `jaxscale-train` in-process; returns (exit status, last stderr line)."""
  from jaxscale import train
  with pytest.raises(SystemExit) as exit_info:
    train.main(args)
  err = capsys.readouterr().err.strip().splitlines()
  return exit_info.value.code, err[-1] if err else ""


MEAN, STD = (72.9,), (90.0,)  # the tiny images' normalization


def tiny_images(num_examples, seed=0, shape=(8, 8, 1), num_classes=10):
  """Random uint8 images and labels."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8),
          rng.integers(0, num_classes, num_examples).astype(np.int32))


def make_batches(num_steps, batch_size=16, seed=0, shape=(8, 8, 1)):
  """`num_steps` batches of tiny images, as the data pipeline makes them."""
  batches = []
  for i in range(num_steps):
    x, y = tiny_images(batch_size, seed=(seed, i), shape=shape)
    batches.append({"image": x, "label": y})
  return batches


def tiny_pieces(devices=None, *overrides, model="resnet8", num_examples=64, shape=(8, 8, 1)):
  """`jaxscale.build.build` on random 8x8 grey images of 10 classes, normalized by MEAN and
  STD; SGD-Nesterov with weight decay 5e-4, global batch 16, `overrides` as `key=value`."""
  from jaxscale import build, config as config_lib, data
  config = config_lib.defaults()
  for override in ("global_batch_size=16", "eval_batch_size=16", "mean=[72.9]", "std=[90.0]",
                   "optimizer.weight_decay=5e-4", "progress_bar=off", "stem=small",
                   *overrides):
    config_lib.apply_override(config, override)
  x, y = tiny_images(num_examples, shape=shape)
  dataset = data.from_arrays(train=(x, y), eval=(x[:16], y[:16]), num_classes=10)
  return build.build(config, model=model, dataset=dataset, devices=devices)


def train_on(pieces, batches, learning_rate=0.1):
  """Steps of `pieces.runner` over `batches`: (final state, last metrics) on the host."""
  import jax
  runner = pieces.runner
  state, metrics = pieces.init_state(), None
  for batch in batches:
    state, metrics = runner.train_step(state, runner.put_batch(batch), learning_rate)
  return jax.device_get(runner.global_state(state)), jax.device_get(metrics)


def max_relative_difference(a, b):
  import jax
  import numpy as np
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)),
                       a, b)
  return max(jax.tree.leaves(diffs))
