"""Gradient accumulation: k micro-batches give the update of one batch k times larger.

With BatchNorm, "k times larger" means ghost batches (jaxscale/step.py, train_step): 4 devices
x 2 micro-batches equal 8 devices with bn_group_size=4, group i holding the micro-batches i.
"""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxscale import precision, train
from conftest import make_batches, max_relative_difference, run_main, tiny_pieces, train_on

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "quickstart.py")


def ghost_order(batch, devices, k):
  """Rows of a `devices` x k-micro-batch run, reordered so that consecutive blocks of `devices`
  devices of a run on devices x k devices hold the micro-batches 0, 1, ...: device d's
  micro-batch i (rows d*k*m + i*m ...) moves to device i*devices + d (rows (i*devices + d)*m ...).
  """
  return {key: x.reshape(devices, k, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
          for key, x in batch.items()}


def test_ghost_order_maps_micro_batches_to_groups():
  rows = ghost_order({"i": np.arange(16)}, devices=4, k=2)["i"]
  # 4-device run: device d holds rows 4d..4d+3, micro-batch i = rows 4d+2i, 4d+2i+1.
  # 8-device run: device e = 4i + d holds 2 rows; group 0 = devices 0-3, group 1 = 4-7.
  assert rows.tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]


@pytest.fixture(scope="module")
def resnet_runs():
  """4 devices x 2 micro-batches; 8 devices in BN groups of 4 on the ghost-ordered batches and,
  as a control, on the batches as they are."""
  batches = make_batches(3)
  accumulated = train_on(tiny_pieces(jax.devices()[:4], "grad_accum_steps=2"), batches)
  grouped = tiny_pieces(jax.devices(), "bn_group_size=4")
  ghost = train_on(grouped, [ghost_order(b, devices=4, k=2) for b in batches])
  unordered = train_on(grouped, batches)
  return accumulated, ghost, unordered


def test_accumulation_equals_bn_groups_of_the_micro_batches(resnet_runs):
  (state, metrics), (ref_state, ref_metrics), _ = resnet_runs
  assert int(state.step) == 3
  assert max_relative_difference(state.params, ref_state.params) <= 1e-5
  assert max_relative_difference(state.batch_stats, ref_state.batch_stats) <= 1e-5
  for key in ("loss", "accuracy", "grad_sq_norm_global"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5)


def test_comparison_catches_other_bn_groups(resnet_runs):
  """Control: the same examples grouped otherwise are normalized otherwise; 1e-5 sees it."""
  (state, _), _, (unordered, _) = resnet_runs
  assert max_relative_difference(state.params, unordered.params) > 1e-3
  assert max_relative_difference(state.batch_stats, unordered.batch_stats) > 1e-3


class MLP(nn.Module):
  """No BatchNorm: accumulation must give exactly the mean gradient of the whole batch."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def mlp_reference():
  """3 steps on whole batches of 16, one device, no accumulation."""
  pieces = tiny_pieces(jax.devices()[:1], model=MLP())
  whole = train_on(pieces, make_batches(3))
  assert max_relative_difference(whole[0].params, train_on(pieces, [])[0].params) > 1e-3
  return whole


# A power-of-2 loss scale is exact in float32: the same update, scaled sums and all.
STATIC_SCALE = precision.LossScaleConfig(initial=2.0**10, min=2.0**10, max=2.0**10)


@pytest.mark.parametrize("overrides, spec", [
    (["grad_accum_steps=4"], {}),
    (["grad_accum_steps=4", "parallelism=pmap"], {}),  # pmap's per-device batch shape
    (["max_per_device_batch=4"], {}),  # 16 examples -> 4 micro-batches of 4
    (["grad_accum_steps=4"], dict(loss_scale=STATIC_SCALE)),
])
def test_accumulation_without_bn_equals_the_whole_batch(mlp_reference, overrides, spec):
  whole, whole_metrics = mlp_reference
  pieces = tiny_pieces(jax.devices()[:1], *overrides, model=MLP())
  if spec:
    pieces = pieces.with_spec(**spec)
  state, metrics = train_on(pieces, make_batches(3))
  assert max_relative_difference(state.params, whole.params) <= 1e-5
  for key in ("loss", "accuracy", "grad_sq_norm_local", "grad_sq_norm_global"):
    np.testing.assert_allclose(metrics[key], whole_metrics[key], rtol=1e-5)


def test_accumulation_keeps_one_micro_batch_of_activations():
  """The point of accumulating: the compiled step's scratch memory shrinks about k-fold."""
  def scratch_bytes(k):
    pieces = tiny_pieces(jax.devices()[:1], f"grad_accum_steps={k}", model=MLP())
    runner = pieces.runner
    batch = runner.put_batch({"image": np.zeros((4096, 8, 8, 1), np.uint8),
                              "label": np.zeros(4096, np.int32)})
    compiled = runner.train_step.lower(pieces.init_state(), batch, 0.1).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert scratch_bytes(4) < scratch_bytes(1) / 3


TINY = ["--config.dataset=synthetic", "--config.image_size=8",
        "--config.synthetic_num_train_examples=64", "--config.synthetic_num_eval_examples=16",
        "--config.eval_batch_size=16", "--config.global_batch_size=32",
        "--config.progress_bar=off", "--config.checkpoint_async=False",
        "--config.compilation_cache_dir=", "--config.xla_gpu_overlap=False"]


def test_trainer_runs_with_accumulation_and_logs_it(tmp_path, capsys):
  train.main(["--config", QUICKSTART, "--workdir", str(tmp_path), *TINY,
              "--config.num_train_steps=2", "--config.grad_accum_steps=2"])
  err = capsys.readouterr().err
  assert "global batch 32 (2 micro-batches of 2 per device)" in err
  assert "eval accuracy" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("overrides, message", [
    (["--config.grad_accum_steps=0"], "config key 'grad_accum_steps' must be >= 1, got 0"),
    (["--config.grad_accum_steps=3"], "config key 'global_batch_size': 32 is not a multiple of "
                                      "24 (8 data-parallel devices x grad_accum_steps 3)"),
    (["--config.grad_accum_steps=2", "--config.batch_schedule=0:32,1:40"],
     "config key 'batch_schedule': batch size 40 of stage '1:40' is not a positive multiple of 16"),
    (["--config.grad_accum_steps=2", "--config.max_per_device_batch=2"],
     "config keys 'grad_accum_steps' (2) and 'max_per_device_batch' (2): set one, not both"),
    (["--config.max_per_device_batch=-1"], "config key 'max_per_device_batch' must be >= 0"),
])
def test_bad_accumulation_config_is_one_line_error(tmp_path, capsys, overrides, message):
  code, line = run_main(["--config", QUICKSTART, "--workdir", str(tmp_path / "w"), *TINY,
                         *overrides], capsys)
  assert code == 2 and line.startswith("jaxscale-train: error: ") and message in line
  assert not (tmp_path / "w").exists()
