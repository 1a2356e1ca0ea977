"""Gradient all-reduce over the data axes: flat, or hierarchical on a (hosts x local) mesh.

`flat` is one `lax.pmean` over every data axis; XLA picks the algorithm. `hierarchical` is the
2-D pattern of the records (Sony's 2-D torus, Ying et al.'s 2-D all-reduce on TPU pods):
  1. reduce-scatter within each host (fast links): every local device ends with the sum of
     1/L of the gradient over its host's L devices;
  2. all-reduce across hosts (the network) on that 1/L shard only;
  3. all-gather within the host, so every device holds the whole reduced gradient.
Each device sends 1/L of the gradient over the slow links instead of all of it.

Both cast the gradients to `dtype` before the exchange and back after (float16/bfloat16 halve
the bytes); the caller applies any loss scale first, so small gradients survive the cast.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxscale.errors import ConfigError

ALGORITHMS = ("flat", "hierarchical")  # config key `allreduce`


def check_config(config) -> None:
  """Raises ConfigError when `allreduce='hierarchical'` has no 2-D mesh to run on."""
  if config.allreduce == "hierarchical" and (config.mesh == "data" or
                                             config.parallelism == "pmap"):
    raise ConfigError("config key 'allreduce': 'hierarchical' needs a 2-D mesh (mesh='hosts' "
                      "or 'RxC') under parallelism='shard_map'")


def _hierarchical_sum(x: jax.Array, hosts_axis: str, local_axis: str) -> jax.Array:
  """Sum over both axes: reduce-scatter in host, all-reduce across hosts, all-gather in host."""
  local_size = lax.axis_size(local_axis)
  flat = x.reshape(-1)
  padded = jnp.pad(flat, (0, -flat.size % local_size))  # psum_scatter needs equal shards
  shard = lax.psum_scatter(padded, local_axis, scatter_dimension=0, tiled=True)
  shard = lax.psum(shard, hosts_axis)
  whole = lax.all_gather(shard, local_axis, axis=0, tiled=True)
  return whole[:flat.size].reshape(x.shape)


def mean_gradients(grads: Any, axes: tuple[str, ...], algorithm: str = "flat",
                   dtype: Any = None) -> Any:
  """The mean of each device's gradients over the data axes, in every device's copy.

  Args:
    grads: this device's gradient pytree.
    axes: the mesh axes the batch is split over; `hierarchical` needs ("hosts", "local").
    algorithm: "flat" or "hierarchical".
    dtype: the dtype the gradients cross devices in (None: as they are).
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"config key 'allreduce': unknown {algorithm!r}; known: "
                     f"{', '.join(ALGORITHMS)}")
  if algorithm == "hierarchical" and len(axes) != 2:
    raise ValueError("config key 'allreduce': 'hierarchical' needs a 2-D mesh "
                     "(mesh='hosts' or 'RxC'), got axes " + str(axes))

  def reduce(g):
    if algorithm == "flat" and (dtype is None or g.dtype == jnp.dtype(dtype)):
      return lax.pmean(g, axes)
    count = lax.psum(1, axes)
    # Divide before the sum: a half-precision sum of N terms then overflows no sooner than one
    # term would.
    shard = (g.astype(jnp.float32) / count).astype(dtype or g.dtype)
    total = lax.psum(shard, axes) if algorithm == "flat" else _hierarchical_sum(shard, *axes)
    return total.astype(g.dtype)

  return jax.tree.map(reduce, grads)
