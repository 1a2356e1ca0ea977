"""One device, 8 devices under shard_map and 8 under pmap end with the same parameters."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscale import mesh as mesh_lib, models, step as step_lib

MEAN, STD = (72.9,), (90.0,)
GLOBAL_BATCH = 16


def make_batches(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (GLOBAL_BATCH, 8, 8, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}
          for _ in range(num_steps)]


def train(parallelism, devices, batches, *, learning_rate=0.1, bn_group_size=0):
  mesh = mesh_lib.create_mesh("data", devices)
  n = mesh.size
  groups = None
  if bn_group_size and bn_group_size < n:
    groups = [list(range(i, i + bn_group_size)) for i in range(0, n, bn_group_size)]
  model = models.create_model("resnet8", num_classes=10, stem="small", bn_axis_name="data",
                              bn_axis_index_groups=groups)
  make_optimizer = lambda lr: optax.chain(optax.add_decayed_weights(5e-4),
                                          optax.sgd(lr, momentum=0.9, nesterov=True))
  spec = step_lib.StepSpec(model=model, make_optimizer=make_optimizer, axes=("data",),
                           mean=MEAN, std=STD, sync_batch_stats=groups is not None)
  create = functools.partial(step_lib.create_train_state, model, make_optimizer,
                             image_shape=(8, 8, 1))
  runner = step_lib.RUNNERS[parallelism](spec, mesh, lambda rng: create(rng))
  state, metrics = runner.init_state(jax.random.key(0)), None
  for batch in batches:
    state, metrics = runner.train_step(state, runner.put_batch(batch), learning_rate)
  return jax.device_get(runner.global_state(state)), jax.device_get(metrics)


def max_relative_difference(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)), a, b)
  return max(jax.tree.leaves(diffs))


@pytest.fixture(scope="module")
def reference():
  batches = make_batches(3)
  return batches, train("shard_map", jax.devices()[:1], batches)


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_eight_devices_match_one_device(reference, parallelism):
  batches, (ref_state, ref_metrics) = reference
  state, metrics = train(parallelism, jax.devices(), batches)
  assert int(state.step) == 3
  assert max_relative_difference(state.params, ref_state.params) <= 1e-5
  assert max_relative_difference(state.batch_stats, ref_state.batch_stats) <= 1e-5
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)


def test_comparison_catches_an_update_n_times_too_large(reference):
  """The check_vma pitfall makes the update 8x too large; the 1e-5 tolerance must see that."""
  batches, (ref_state, _) = reference
  wrong, _ = train("shard_map", jax.devices(), batches, learning_rate=0.1 * 8)
  assert max_relative_difference(wrong.params, ref_state.params) > 1e-2


def test_params_actually_change(reference):
  batches, (ref_state, _) = reference
  untrained, _ = train("shard_map", jax.devices()[:1], batches[:0])
  assert max_relative_difference(untrained.params, ref_state.params) > 1e-3


def test_bn_groups_use_group_statistics():
  """bn_group_size=4 on 8 devices: the same as two separate 4-device runs, averaged stats."""
  batches = make_batches(1)
  grouped, _ = train("shard_map", jax.devices(), batches, bn_group_size=4)
  whole, _ = train("shard_map", jax.devices(), batches)
  # Group statistics differ from global ones, so parameters after a step differ...
  assert max_relative_difference(grouped.params, whole.params) > 1e-4
  # ...and each half of the batch on 4 devices reproduces one group's running mean exactly.
  halves = [train("shard_map", jax.devices()[:4],
                  [{k: v[i * 8:(i + 1) * 8] for k, v in batches[0].items()}])[0]
            for i in range(2)]
  mean_of_groups = jax.tree.map(lambda a, b: (a + b) / 2, halves[0].batch_stats,
                                halves[1].batch_stats)
  assert max_relative_difference(grouped.batch_stats, mean_of_groups) <= 1e-5


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_eval_counts_only_unmasked_examples(parallelism):
  mesh = mesh_lib.create_mesh("data")
  model = models.create_model("resnet8", num_classes=10, stem="small", bn_axis_name="data")
  make_optimizer = lambda lr: optax.sgd(lr)
  spec = step_lib.StepSpec(model=model, make_optimizer=make_optimizer, axes=("data",),
                           mean=MEAN, std=STD)
  runner = step_lib.RUNNERS[parallelism](
      spec, mesh, lambda rng: step_lib.create_train_state(model, make_optimizer, rng, (8, 8, 1)))
  state = runner.init_state(jax.random.key(0))
  batch = make_batches(1)[0]
  batch["mask"] = (np.arange(GLOBAL_BATCH) < 11).astype(np.float32)
  sums = jax.device_get(runner.eval_step(state, runner.put_batch(batch)))
  assert sums["count"] == 11
  assert 0 <= sums["correct"] <= 11
