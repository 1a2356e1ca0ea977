"""Sharded training state (`state_sharding`): which leaf lies how on the mesh, and the collectives
that move between a leaf's shards and the whole leaf inside the shard_map step.

- `replicated`: every device holds everything and repeats the whole update.
- `optimizer` (ZeRO-1; Xu et al. 2020, arXiv 2004.13336): parameters replicated, optimizer state
  sharded. The gradients are reduce-scattered instead of all-reduced, each device updates its
  1/N slice of every parameter and of its optimizer state, and the new slices are all-gathered.
  An all-reduce is a reduce-scatter plus an all-gather, so no extra bytes cross the network.
- `fsdp`: parameters sharded at rest too, all-gathered at the start of each step for the forward
  and backward passes, and never gathered after the update. `param_gather_dtype=bfloat16`
  gathers the kernels (leaves of 2 or more dimensions) in bfloat16, half the bytes; layers that
  compute in bfloat16 cast them so anyway, so with `precision=bf16` the result is the same.

The rule for a leaf of N devices' state: it is sharded along its largest dimension that N
divides (the last one of equal size), so a checkpoint holds it in its own shape and restores onto
any mode and topology. A leaf with no such dimension stays replicated at rest; inside the update
it is flattened, padded to a multiple of N and chunked, so every device still updates only 1/N
of it. Scalars (step counts) stay whole. Inside the update each device thus holds a slice of
every leaf: elementwise optimizers need nothing more, and LARS and LAMB sum their layer norms
over the shards (`axis_name`), so the trust ratio is the whole layer's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxscale.errors import ConfigError

MODES = ("replicated", "optimizer", "fsdp")  # config key `state_sharding`
WHOLE = "whole"  # a scalar leaf: whole on every device, inside the update too
CHUNKED = "chunked"  # a leaf with no shard dimension: whole at rest, chunked in the update


def shard_dim(shape: tuple[int, ...], num_shards: int) -> int | None:
  """The dimension a leaf of `shape` is sharded along: the largest one `num_shards` divides
  (the last of equal size); None if there is none (the leaf is chunked inside the update)."""
  dims = [d for d, n in enumerate(shape) if n % num_shards == 0 and n >= num_shards]
  return max(dims, key=lambda d: (shape[d], d)) if dims else None


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the params and optimizer state of one run lie on the mesh.

  Attributes:
    mode: one of MODES.
    axes: the mesh axes a sharded dimension is split over, in shard order (the hierarchical
      reduce-scatter runs within hosts first, so its order is (local, hosts)).
    hierarchical: reduce-scatter within hosts, then across them (`allreduce='hierarchical'`).
    params, opt_state: per leaf, the dimension it is sharded along, CHUNKED or WHOLE.
    gather_dtype: the dtype fsdp gathers kernels in (None: as they are).
  """
  mode: str
  axes: tuple[str, ...] = ()
  hierarchical: bool = False
  params: Any = None
  opt_state: Any = None
  gather_dtype: Any = None

  @property
  def sharded(self) -> bool:
    return self.mode != "replicated"

  def specs(self, state) -> Any:
    """The PartitionSpec of every leaf of a TrainState, as it lies at rest."""
    if not self.sharded:
      return jax.tree.map(lambda _: P(), state)

    def spec(x, dim, at_rest: bool):
      if not at_rest or dim in (CHUNKED, WHOLE):
        return P()
      return P(*([None] * dim), self.axes)

    def specs_of(tree, dims, at_rest):
      return jax.tree.map(lambda x, d: spec(x, d, at_rest), tree, dims)

    return state.replace(
        step=P(), batch_stats=jax.tree.map(lambda _: P(), state.batch_stats),
        loss_scale=jax.tree.map(lambda _: P(), state.loss_scale),
        params=specs_of(state.params, self.params, self.mode == "fsdp"),
        opt_state=specs_of(state.opt_state, self.opt_state, self.sharded))

  # --- Inside the shard_map step. -------------------------------------------------------------

  def _index(self) -> jax.Array:
    index = 0
    for axis in self.axes:
      index = index * lax.axis_size(axis) + lax.axis_index(axis)
    return index

  def _scatter(self, x: jax.Array, dim: int) -> jax.Array:
    """The sum over the mesh of `x`, this device's slice of it along `dim`."""
    for axis in (self.axes if self.hierarchical else (self.axes,)):
      x = lax.psum_scatter(x, axis, scatter_dimension=dim, tiled=True)
    return x

  def _gather(self, x: jax.Array, dim: int) -> jax.Array:
    for axis in (reversed(self.axes) if self.hierarchical else (self.axes,)):
      x = lax.all_gather(x, axis, axis=dim, tiled=True)
    return x

  def _chunks(self, x: jax.Array) -> jax.Array:
    """A whole leaf flattened and padded to a multiple of the shard count."""
    n = math.prod(lax.axis_size(a) for a in self.axes)
    flat = x.reshape(-1)
    return jnp.pad(flat, (0, -flat.size % n))

  def mean_gradients(self, grads: Any, wire_dtype: Any) -> Any:
    """Per leaf of the parameters: this device's slice of the mean gradient (leaves without a
    shard dimension: its chunk of the flattened leaf). Crosses the devices in `wire_dtype`."""
    count = math.prod(lax.axis_size(a) for a in self.axes)

    def scatter(g, dim):
      # Divide before the sum: a half-precision sum then overflows no sooner than one term.
      x = (g.astype(jnp.float32) / count).astype(wire_dtype or g.dtype)
      x = self._scatter(self._chunks(x), 0) if dim == CHUNKED else self._scatter(x, dim)
      return x.astype(g.dtype)

    return jax.tree.map(scatter, grads, self.params)

  def whole_params(self, params: Any) -> Any:
    """The parameters whole, for the forward and backward passes (fsdp gathers them)."""
    if self.mode != "fsdp":
      return params

    def gather(p, dim):
      if dim == CHUNKED:
        return p
      # Kernels only: norm scales and biases are few bytes, and layers use them in float32.
      x = p.astype(self.gather_dtype) if self.gather_dtype and p.ndim >= 2 else p
      return self._gather(x, dim).astype(p.dtype)

    return jax.tree.map(gather, params, self.params)

  def slices(self, tree: Any, dims: Any, at_rest: bool) -> Any:
    """This device's slice of every leaf: as it is when sharded `at_rest`, else cut from the
    whole leaf (a chunk of the flattened leaf where there is no shard dimension)."""
    def cut(x, dim):
      if dim == WHOLE:
        return x
      if dim == CHUNKED:
        chunks = self._chunks(x)
        size = chunks.size // math.prod(lax.axis_size(a) for a in self.axes)
        return lax.dynamic_slice_in_dim(chunks, self._index() * size, size)
      if at_rest:
        return x
      size = x.shape[dim] // math.prod(lax.axis_size(a) for a in self.axes)
      return lax.dynamic_slice_in_dim(x, self._index() * size, size, axis=dim)

    return jax.tree.map(cut, tree, dims)

  def unslice(self, tree: Any, dims: Any, like: Any, at_rest: bool) -> Any:
    """The inverse of `slices`: leaves sharded `at_rest` stay slices, the others are gathered
    back whole (shaped as in `like`)."""
    def join(x, dim, whole):
      if dim == WHOLE or (at_rest and dim != CHUNKED):
        return x
      if dim == CHUNKED:
        return self._gather(x, 0)[:whole.size].reshape(whole.shape)
      return self._gather(x, dim)

    return jax.tree.map(join, tree, dims, like)

  def sum_over_shards(self, value: jax.Array) -> jax.Array:
    return lax.psum(value, self.axes)


REPLICATED = Layout("replicated")


def layout(mode: str, state: Any, axes: tuple[str, ...], num_shards: int,
           hierarchical: bool = False, gather_dtype: Any = None) -> Layout:
  """The layout of `state` (a TrainState of arrays or ShapeDtypeStructs) over the mesh `axes`
  of `num_shards` devices."""
  if mode == "replicated":
    return REPLICATED
  shard_axes = tuple(reversed(axes)) if hierarchical else tuple(axes)
  return Layout(mode, shard_axes, hierarchical,
                params=jax.tree.map(lambda x: _dim(x, num_shards), state.params),
                opt_state=jax.tree.map(lambda x: WHOLE if not x.shape else _dim(x, num_shards),
                                       state.opt_state),
                gather_dtype=gather_dtype)


def _dim(x, num_shards: int) -> int | str:
  dim = shard_dim(x.shape, num_shards)
  return CHUNKED if dim is None else dim


def check_config(config) -> None:
  """Raises ConfigError for a `state_sharding` or `param_gather_dtype` this run cannot use."""
  if config.state_sharding not in MODES:
    raise ConfigError(f"config key 'state_sharding': unknown {config.state_sharding!r}; "
                      f"known: {', '.join(MODES)}")
  if config.state_sharding != "replicated" and config.parallelism == "pmap":
    raise ConfigError(f"config key 'state_sharding': {config.state_sharding!r} needs "
                      f"parallelism='shard_map' (pmap keeps a whole copy per device)")
  from jaxscale import precision  # parse_dtype names the key
  try:
    precision.parse_dtype(config.param_gather_dtype, "param_gather_dtype")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.param_gather_dtype != "float32" and config.state_sharding != "fsdp":
    raise ConfigError("config key 'param_gather_dtype': parameters are gathered in another "
                      "dtype only with state_sharding='fsdp' (after a ZeRO-1 update the "
                      "gathered parameters are the float32 masters)")
