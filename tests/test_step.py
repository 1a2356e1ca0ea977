"""One device, 8 devices under shard_map and 8 under pmap end with the same parameters."""
import functools

import jax
import numpy as np
import pytest

from conftest import make_batches, max_relative_difference, tiny_pieces, train_on


@functools.cache
def pieces(parallelism="shard_map", num_devices=8, *overrides):
  return tiny_pieces(jax.devices()[:num_devices], f"parallelism={parallelism}", *overrides)


def train(parallelism, num_devices, batches, *, learning_rate=0.1, bn_group_size=0):
  return train_on(pieces(parallelism, num_devices, f"bn_group_size={bn_group_size}"), batches,
                  learning_rate)


@pytest.fixture(scope="module")
def reference():
  batches = make_batches(3)
  return batches, train("shard_map", 1, batches)


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_eight_devices_match_one_device(reference, parallelism):
  batches, (ref_state, ref_metrics) = reference
  state, metrics = train(parallelism, 8, batches)
  assert int(state.step) == 3
  assert max_relative_difference(state.params, ref_state.params) <= 1e-5
  assert max_relative_difference(state.batch_stats, ref_state.batch_stats) <= 1e-5
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)


def test_comparison_catches_an_update_n_times_too_large(reference):
  """The check_vma pitfall makes the update 8x too large; the 1e-5 tolerance must see that."""
  batches, (ref_state, _) = reference
  wrong, _ = train("shard_map", 8, batches, learning_rate=0.1 * 8)
  assert max_relative_difference(wrong.params, ref_state.params) > 1e-2


def test_params_actually_change(reference):
  batches, (ref_state, _) = reference
  untrained, _ = train("shard_map", 1, batches[:0])
  assert max_relative_difference(untrained.params, ref_state.params) > 1e-3


def test_bn_groups_use_group_statistics():
  """bn_group_size=4 on 8 devices: the same as two separate 4-device runs, averaged stats."""
  batches = make_batches(1)
  grouped, _ = train("shard_map", 8, batches, bn_group_size=4)
  whole, _ = train("shard_map", 8, batches)
  # Group statistics differ from global ones, so parameters after a step differ...
  assert max_relative_difference(grouped.params, whole.params) > 1e-4
  # ...and each half of the batch on 4 devices reproduces one group's running mean exactly.
  halves = [train("shard_map", 4, [{k: v[i * 8:(i + 1) * 8] for k, v in batches[0].items()}])[0]
            for i in range(2)]
  mean_of_groups = jax.tree.map(lambda a, b: (a + b) / 2, halves[0].batch_stats,
                                halves[1].batch_stats)
  assert max_relative_difference(grouped.batch_stats, mean_of_groups) <= 1e-5


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_eval_counts_only_unmasked_examples(parallelism):
  runner = pieces(parallelism).runner
  state = runner.init_state(jax.random.key(0))
  batch = make_batches(1)[0]
  batch["mask"] = (np.arange(16) < 11).astype(np.float32)
  sums = jax.device_get(runner.eval_step(state, runner.put_batch(batch)))
  assert sums["count"] == 11
  assert 0 <= sums["accuracy"] <= 11
