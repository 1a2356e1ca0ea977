"""Your model, your data, your loss: user Linen and NNX models, NumPy arrays, the model contract.

Time budget: about 2 minutes on a 2-core CPU (tiny models on 8x8 images).
"""
import functools
import json
import os
import shutil
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxscale import build, checkpoint, config as config_lib, data, export, models, train
from conftest import (make_batches, max_relative_difference, run_main, tiny_images, tiny_pieces,
                      train_on)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PlainBNNet(nn.Module):
  """A user's Linen model: plain nn.BatchNorm (no axis name), no jaxscale option but
  num_classes, no `bn_momentum` field."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)  # a bias before BatchNorm gets no gradient
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


class NoTrainFlag(nn.Module):
  """No `train` argument, BatchNorm whose mode jaxscale must set."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    return nn.Dense(10)(nn.relu(nn.BatchNorm()(x)))


class NNXNet(nnx.Module):
  """A user's NNX model with BatchNorm and dropout."""

  def __init__(self, num_classes: int, dropout: float = 0.1, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.bn(self.conv(x))))
    return self.head(x.mean((1, 2)))


def device_copies(tree):
  return jax.tree.map(lambda x: [np.asarray(s.data) for s in x.addressable_shards], tree)


# --- BatchNorm in a user's model is cross-replica without the model knowing. ------------------

# Without dropout: each device draws its own dropout keys.
@pytest.mark.parametrize("model", [PlainBNNet, functools.partial(NNXNet, dropout=0.0)],
                         ids=["linen", "nnx"])
def test_user_batchnorm_is_global_on_eight_devices(model):
  batches = make_batches(3)
  one, _ = train_on(tiny_pieces(jax.devices()[:1], model=model), batches)
  pieces = tiny_pieces(jax.devices(), model=model)
  state = pieces.init_state()
  for batch in batches:
    state, _ = pieces.runner.train_step(state, pieces.runner.put_batch(batch), 0.1)
  for copies in jax.tree.leaves(device_copies(state.batch_stats),
                                is_leaf=lambda x: isinstance(x, list)):
    for other in copies[1:]:
      np.testing.assert_array_equal(other, copies[0])  # identical on every device
  eight = jax.device_get(state)
  assert max_relative_difference(eight.params, one.params) <= 1e-5
  assert max_relative_difference(eight.batch_stats, one.batch_stats) <= 1e-5
  # The comparison can fail: per-device statistics (what the model alone would do) differ.
  local = tiny_pieces(jax.devices(), model=model).with_spec(batch_norm=models.BatchNorm(None),
                                                             sync_batch_stats=True)
  per_device, _ = train_on(local, batches)
  assert max_relative_difference(per_device.batch_stats, one.batch_stats) > 1e-3


def test_model_without_train_flag_evaluates_with_running_averages():
  pieces = tiny_pieces(jax.devices()[:1], model=NoTrainFlag)
  runner = pieces.runner
  state, _ = train_on(pieces, make_batches(2))
  assert max_relative_difference(state.batch_stats, jax.device_get(
      pieces.init_state().batch_stats)) > 1e-3  # training used and updated batch statistics
  state = runner.from_global_state(state)
  batch = make_batches(1, seed=5)[0]
  batch["mask"] = np.ones(16, np.float32)
  whole = jax.device_get(runner.eval_step(state, runner.put_batch(batch)))["loss"]
  halves = [jax.device_get(runner.eval_step(state, runner.put_batch(
      {k: v[i * 8:(i + 1) * 8] for k, v in batch.items()})))["loss"] for i in range(2)]
  # With running averages an example's loss does not depend on the rest of its batch.
  np.testing.assert_allclose(sum(halves), whole, rtol=1e-5)


def test_precise_bn_works_for_a_model_without_bn_momentum_field(tmp_path):
  config = config_lib.defaults()
  for o in ("num_train_steps=4", "global_batch_size=16", "eval_batch_size=16",
            "precise_bn_batches=2", "progress_bar=off", "checkpoint_async=False"):
    config_lib.apply_override(config, o)
  x, y = tiny_images(64)
  result = train.run(config, str(tmp_path), model=PlainBNNet, train=(x, y), eval=(x[:16], y[:16]))
  assert result["num_examples"] == 16


def test_precise_bn_without_batchnorm_is_refused(tmp_path):
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  with pytest.raises(config_lib.ConfigError, match="config key 'precise_bn_batches': model "
                                                   "'MLP' has no BatchNorm"):
    tiny_pieces(None, "precise_bn_batches=2", model=MLP)


# --- The contract, checked before anything compiles. -------------------------------------------

class WrongOutput(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class Stateful(nn.Module):
  @nn.compact
  def __call__(self, x):
    counter = self.variable("counters", "n", jnp.zeros, ())
    counter.value += 1
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class OwnStats(nn.Module):
  """Batch statistics kept by hand: jaxscale cannot make them cross-replica."""
  @nn.compact
  def __call__(self, x, train=False):
    mean = self.variable("batch_stats", "mean", jnp.zeros, x.shape[-1:])
    if train:
      mean.value = x.mean((0, 1, 2))
    return nn.Dense(10)((x - mean.value).reshape(x.shape[0], -1))


@pytest.mark.parametrize("model, message", [
    (WrongOutput, "model 'WrongOutput' returns shape (2, 5); task 'classification' needs "
                  "(batch, num_classes) = (2, 10)"),
    (Stateful, "model 'Stateful' creates variable collections jaxscale does not train or carry: "
               "counters"),
    (OwnStats, "model 'OwnStats' keeps batch statistics outside nn.BatchNorm (mean)"),
    (lambda: 3, "returned a int, not a Flax module"),
    (nnx.Linear, "model 'Linear' cannot be built with"),
])
def test_model_that_breaks_the_contract_is_refused(model, message):
  with pytest.raises(config_lib.ConfigError) as error:
    tiny_pieces(None, model=model)
  assert message in str(error.value) and "\n" not in str(error.value)


def write_user_files(directory, module, model_source, config_lines):
  """A model file and a config file naming it, outside the package."""
  (directory / f"{module}.py").write_text(textwrap.dedent(model_source))
  config = directory / "config.py"
  config.write_text("from jaxscale.config import defaults\n\ndef get_config():\n"
                    "  c = defaults()\n" + "".join(f"  {line}\n" for line in config_lines)
                    + "  return c\n")
  return str(config)


TINY = ["dataset=synthetic", "image_size=8", "synthetic_num_train_examples=64",
        "synthetic_num_eval_examples=16", "eval_batch_size=16", "global_batch_size=16",
        "num_train_steps=3", "progress_bar=off", "checkpoint_async=False",
        "compilation_cache_dir=", "xla_gpu_overlap=False"]


def test_linen_model_from_a_file_outside_the_package_trains_through_the_cli(tmp_path, capsys):
  config = write_user_files(tmp_path, "user_linen_models", """
      import flax.linen as nn

      class MyMLP(nn.Module):
        num_classes: int
        @nn.compact
        def __call__(self, x):
          return nn.Dense(self.num_classes)(nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1))))
      """, ['c.model = "user_linen_models:MyMLP"'])
  workdir = tmp_path / "run"
  train.main(["--config", config, "--workdir", str(workdir), *[f"--config.{o}" for o in TINY]])
  err = capsys.readouterr().err
  assert "user_linen_models:MyMLP (classification)" in err and "done at step 3" in err
  exported = export.load(export.export(str(workdir)))
  logits = exported.logits(np.zeros((2, 8, 8, 3), np.uint8))
  assert logits.shape == (2, 10)


def test_broken_model_from_the_cli_is_one_line_and_writes_nothing(tmp_path, capsys):
  config = write_user_files(tmp_path, "user_broken_models", """
      import flax.linen as nn

      class Five(nn.Module):
        @nn.compact
        def __call__(self, x):
          return nn.Dense(5)(x.reshape(x.shape[0], -1))
      """, ['c.model = "user_broken_models:Five"'])
  workdir = tmp_path / "run"
  code, line = run_main(["--config", config, "--workdir", str(workdir),
                         *[f"--config.{o}" for o in TINY]], capsys)
  assert code == 2
  assert line == ("jaxscale-train: error: model 'user_broken_models:Five' returns shape (2, 5); "
                  "task 'classification' needs (batch, num_classes) = (2, 10)")
  assert not workdir.exists()


@pytest.mark.parametrize("name, message", [
    ("nowhere_module:Net", "config key 'model': cannot import 'nowhere_module' "
                           "(ModuleNotFoundError: No module named 'nowhere_module')"),
    ("jaxscale.models:NoSuchNet", "config key 'model': module 'jaxscale.models' has no "
                                  "'NoSuchNet'"),
    ("mymodels.MyMLP", "config key 'model': unknown model 'mymodels.MyMLP'; known: "),
])
def test_bad_model_path_is_one_line(tmp_path, capsys, name, message):
  code, line = run_main(["--config", os.path.join(ROOT, "configs", "quickstart.py"),
                         "--workdir", str(tmp_path / "w"), f"--config.model={name}"], capsys)
  assert code == 2 and message in line


# --- NNX: trains, resumes bit-identically, exports. --------------------------------------------

def nnx_config(steps):
  config = config_lib.defaults()
  for o in (f"num_train_steps={steps}", "global_batch_size=16", "eval_batch_size=16",
            "checkpoint_every_steps=2", "checkpoint_async=False", "progress_bar=off",
            "log_every_steps=1", "random_flip=False", "stem=small"):
    config_lib.apply_override(config, o)
  return config


def test_nnx_model_trains_resumes_bit_identically_and_exports(tmp_path):
  x, y = tiny_images(64, shape=(8, 8, 1))
  arrays = dict(train=(x, y), eval=(x[:32], y[:32]))
  reference = str(tmp_path / "reference")
  ref = train.run(nnx_config(6), reference, model=NNXNet, **arrays)
  # "Killed" after the save of step 4: the later checkpoint is gone, the run resumes.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(reference, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  again = train.run(nnx_config(6), resumed, model=NNXNet, **arrays)
  for key in ("accuracy", "loss"):
    assert again[key] == ref[key]
  state, _ = checkpoint.read(os.path.join(resumed, "checkpoints", "6"))
  ref_state, _ = checkpoint.read(os.path.join(reference, "checkpoints", "6"))
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  assert set(ref_state["params"]) == {"bn", "conv", "head"}
  # The export needs the class (it was passed as an object), and reproduces the eval.
  path = export.export(reference)
  with pytest.raises(Exception, match="passed to the run as a Python object"):
    export.load(path)
  exported = export.load(path, model=NNXNet)
  logits = np.asarray(exported.logits(x[:32]))
  assert np.mean(logits.argmax(-1) == y[:32]) == ref["accuracy"]


# --- Data from anywhere. ------------------------------------------------------------------------

def test_numpy_arrays_train_through_the_python_api(tmp_path):
  x, y = tiny_images(256, shape=(8, 8))  # HW: one channel is added
  config = nnx_config(30)
  config.learning_rate = 0.05
  y = (x.reshape(256, -1).mean(-1) > 127.5).astype(np.int32)  # learnable: bright or dark
  result = train.run(config, str(tmp_path), model=PlainBNNet, train=(x, y), eval=(x, y))
  assert result["num_examples"] == 256 and result["accuracy"] > 0.8


def test_float_images_in_0_1_train_like_uint8(tmp_path):
  x, _ = tiny_images(256, shape=(8, 8, 1))
  y = (x.reshape(256, -1).mean(-1) > 127.5).astype(np.int32)
  results = {}
  for name, images in (("uint8", x), ("float", x.astype(np.float32) / 255)):
    config = nnx_config(30)
    results[name] = train.run(config, str(tmp_path / name), model=PlainBNNet,
                              train=(images, y), eval=(images, y))
  assert results["uint8"]["accuracy"] > 0.8
  assert abs(results["float"]["accuracy"] - results["uint8"]["accuracy"]) <= 0.02
  with open(tmp_path / "float" / "config.json") as f:
    assert json.load(f)["mean"] == []  # computed from the data, recorded in checkpoints
  _, meta = checkpoint.read(checkpoint.latest_step_dir(str(tmp_path / "float")))
  assert 0.4 < meta["model"]["mean"][0] < 0.6  # in the images' [0, 1] units


def test_channels_and_dtypes_are_kept_or_refused():
  two = tiny_pieces(None, model=PlainBNNet, shape=(8, 8, 2))
  assert two.model_info["input_shape"] == [8, 8, 2]
  with pytest.raises(config_lib.ConfigError, match=r"train images: shape \(16, 8, 8, 3\) "
                                                   r"complex64 cannot be used"):
    data.from_arrays(train=(np.zeros((16, 8, 8, 3), np.complex64), np.zeros(16, int)))
  with pytest.raises(config_lib.ConfigError, match="train labels"):
    data.from_arrays(train=(np.zeros((16, 8, 8)), np.zeros(15, int)))


def test_dataset_from_an_import_path(tmp_path, monkeypatch):
  (tmp_path / "user_datasets.py").write_text(textwrap.dedent("""
      import numpy as np
      from jaxscale import data

      def bright_or_dark(config):
        rng = np.random.default_rng(config.seed)
        x = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
        return data.from_arrays(train=(x, (x.mean((1, 2, 3)) > 127.5).astype(int)),
                                name="bright_or_dark")
      """))
  monkeypatch.syspath_prepend(str(tmp_path))
  config = config_lib.defaults()
  for o in ("dataset=user_datasets:bright_or_dark", "global_batch_size=16", "stem=small"):
    config_lib.apply_override(config, o)
  pieces = build.build(config, model=PlainBNNet)
  assert pieces.dataset.name == "bright_or_dark" and pieces.dataset.eval is None
  assert pieces.task.num_classes == 2 and len(pieces.task.mean) == 1  # computed from the data
