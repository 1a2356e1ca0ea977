"""The second task: byte-level language modelling with a causal Transformer and LAMB.

On a generated text file: the loss falls well below uniform bytes (ln 256), 1 device equals 8,
and a resumed run ends bit-identical. Time budget: about 60 s on a 2-core CPU.
"""
import functools
import math
import os
import shutil

import jax
import numpy as np
import pytest

from jaxscale import build, checkpoint, config as config_lib, train
from conftest import max_relative_difference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "lm_bytes.py")
WORDS = ("the data parallel mesh trains a model on every device while the optimizer scales "
         "its step by the trust ratio of each layer and the batch grows").split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  """About 24 KB of sentences drawn from a small vocabulary (deterministic)."""
  rng = np.random.default_rng(0)
  sentences = [" ".join(rng.choice(WORDS, rng.integers(5, 12))).capitalize() + "."
               for _ in range(400)]
  path = tmp_path_factory.mktemp("text") / "corpus.txt"
  path.write_text("\n".join(sentences))
  return str(path)


def lm_config(text_file, *overrides):
  return config_lib.load(RECIPE, [f"text_file={text_file}", "sequence_length=32",
                                  "global_batch_size=32", "eval_batch_size=64",
                                  "progress_bar=off", "checkpoint_async=False",
                                  "compilation_cache_dir=", *overrides])


def test_loss_falls_well_below_uniform_bytes(text_file, tmp_path):
  config = lm_config(text_file, "num_epochs=6.0", "lr_schedule.warmup_epochs=0.5",
                     "eval_every_epochs=3.0", "log_every_steps=10")
  result = train.run(config, str(tmp_path))
  assert result["loss"] < 0.5 * math.log(256), result  # measured: about 1.7
  assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
  assert 0.3 < result["accuracy"] <= 1.0


@functools.cache
def pieces(text_file, num_devices):
  return build.build(lm_config(text_file), devices=jax.devices()[:num_devices])


def test_eight_devices_equal_one(text_file):
  states = []
  for n in (1, 8):
    p = pieces(text_file, n)
    loader_batches = [p.dataset.train[i]["tokens"] for i in range(96)]
    state = p.init_state()
    for step in range(3):
      batch = {"tokens": np.stack(loader_batches[step * 32:(step + 1) * 32])}
      state, metrics = p.runner.train_step(state, p.runner.put_batch(batch), 4e-3)
    states.append(jax.device_get(state))
  assert max_relative_difference(states[1].params, states[0].params) <= 1e-5
  assert max_relative_difference(states[0].params, jax.device_get(
      pieces(text_file, 1).init_state().params)) > 1e-3  # it trained


def test_resumed_run_ends_bit_identical(text_file, tmp_path):
  overrides = ("num_train_steps=8", "checkpoint_every_steps=4", "eval_every_epochs=0.0",
               "eval_every_steps=4", "log_every_steps=1")
  reference = str(tmp_path / "reference")
  ref = train.run(lm_config(text_file, *overrides), reference)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(reference, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))  # "killed" after the save of step 4
  again = train.run(lm_config(text_file, *overrides), resumed)
  assert again["loss"] == ref["loss"] and again["bits_per_byte"] == ref["bits_per_byte"]
  state, _ = checkpoint.read(os.path.join(resumed, "checkpoints", "8"))
  ref_state, _ = checkpoint.read(os.path.join(reference, "checkpoints", "8"))
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
