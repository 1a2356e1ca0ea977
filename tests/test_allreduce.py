"""Hierarchical all-reduce gives what the flat one gives, on 2x4 and 4x2 meshes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxscale import allreduce, mesh as mesh_lib


def per_device_grads(n):
  rng = np.random.default_rng(0)
  # Odd sizes, so the reduce-scatter needs padding; one scalar leaf.
  return {"kernel": rng.normal(size=(n, 3, 5, 7)).astype(np.float32),
          "bias": rng.normal(size=(n, 13)).astype(np.float32),
          "scale": rng.normal(size=(n,)).astype(np.float32)}


def reduce_on(layout, algorithm, dtype=None):
  mesh = mesh_lib.create_mesh(layout)
  axes = mesh_lib.data_axes(mesh)
  grads = per_device_grads(mesh.size)

  def local(g):
    g = jax.tree.map(lambda x: x[0], g)  # this device's gradient
    out = allreduce.mean_gradients(g, axes, algorithm, dtype)
    return jax.tree.map(lambda x: x[None], out)

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(axes), out_specs=P(axes),
                             check_vma=False))
  return jax.device_get(fn(grads)), grads


@pytest.mark.parametrize("layout", ["2x4", "4x2"])
def test_hierarchical_equals_flat_and_the_true_mean(layout):
  hierarchical, grads = reduce_on(layout, "hierarchical")
  flat, _ = reduce_on(layout, "flat")
  for key, values in grads.items():
    expected = values.mean(axis=0)
    for device in range(8):  # every device holds the whole mean
      np.testing.assert_allclose(hierarchical[key][device], expected, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(flat[key][device], expected, rtol=1e-6, atol=1e-6)


def test_composes_with_a_compressed_dtype():
  out, grads = reduce_on("2x4", "hierarchical", dtype=jnp.bfloat16)
  assert out["kernel"].dtype == np.float32  # cast back after the exchange
  expected = grads["kernel"].mean(axis=0)
  error = np.abs(out["kernel"][0] - expected).max()
  assert 0 < error < 0.05  # bfloat16's rounding is visible, and small


def test_bad_algorithm_and_mesh_are_refused():
  with pytest.raises(ValueError, match="config key 'allreduce': unknown 'ring'"):
    allreduce.mean_gradients({}, ("data",), "ring")
  with pytest.raises(ValueError, match="'hierarchical' needs a 2-D mesh"):
    allreduce.mean_gradients({}, ("data",), "hierarchical")


def test_hierarchical_exchanges_shards_between_hosts():
  """The compiled program reduce-scatters in a host and all-gathers back; flat does neither."""
  mesh = mesh_lib.create_mesh("2x4")
  axes = mesh_lib.data_axes(mesh)

  def hlo(algorithm):
    local = lambda g: allreduce.mean_gradients(g, axes, algorithm)
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(axes), out_specs=P(axes),
                               check_vma=False))
    return fn.lower(np.zeros((8, 64), np.float32)).compile().as_text()

  hierarchical, flat = hlo("hierarchical"), hlo("flat")
  assert "reduce-scatter" in hierarchical and "all-gather" in hierarchical
  assert "reduce-scatter" not in flat and "all-gather" not in flat
