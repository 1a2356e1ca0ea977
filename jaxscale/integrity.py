"""Checksums of a checkpoint's arrays: computed on the devices at save, checked at restore.

orbax's atomic commit guarantees that a listed checkpoint was written completely; it cannot
tell whether its bytes changed afterwards (a bad disk, a partial copy, a stray write). So every
checkpoint's meta carries, per array, the checksum

    sum_i bits(x_i) * (2 i + 1)   mod 2**32

over the flattened array, `bits` being the element's bit pattern as an unsigned integer. The
weights are odd, hence invertible mod 2**32: a change to any one element always changes the
checksum, and a change to several is missed with probability about 2**-32. Integer addition
mod 2**32 is associative, so the value does not depend on how the array is sharded or in which
order the devices reduce it: a checkpoint written on 8 devices checks on 1. It costs one pass
over the state on the devices (one jitted program), and the host fetches one integer per array.
`numpy_checksums` computes the same values on the host, for `checkpoint.read`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def path_name(path) -> str:
  """'params/Conv_0/kernel' for a pytree key path."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return "/".join(name(k) for k in path)


def _bits(x, xp):
  """The elements' bit patterns as uint32 (a view for 32-bit types, widened for smaller)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  unsigned = _UNSIGNED.get(np.dtype(x.dtype).itemsize)
  if unsigned is None:
    raise ValueError(f"no checksum for dtype {x.dtype} (64-bit arrays are not checkpointed "
                     f"with x64 off)")
  if xp is np:
    return np.ascontiguousarray(x).view(unsigned).astype(np.uint32).ravel()
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _device_checksums(arrays: list[jax.Array]) -> list[jax.Array]:
  sums = []
  for x in arrays:
    bits = _bits(x, jnp)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
    sums.append(jnp.sum(bits * weights, dtype=jnp.uint32))
  return sums


def checksums(tree: Any) -> dict[str, Any]:
  """{leaf path: checksum} of the jax.Arrays in `tree`, as device scalars (dispatched only:
  `jax.device_get` the result when it is needed, so the caller does not wait for the state)."""
  named = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
           if isinstance(x, jax.Array)]
  groups: dict[frozenset, list[tuple[str, jax.Array]]] = {}
  for name, x in named:  # one program per device set: a jit takes arrays of one mesh
    groups.setdefault(frozenset(x.sharding.device_set), []).append((name, x))
  result = {}
  for items in groups.values():
    for (name, _), value in zip(items, _device_checksums([x for _, x in items])):
      result[name] = value
  return result


def numpy_checksums(tree: Any) -> dict[str, int]:
  """`checksums` of a tree of host arrays (numpy), the same values without devices."""
  result = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, (np.ndarray, np.generic)):
      bits = _bits(np.asarray(x), np).astype(np.uint64)
      weights = (np.arange(bits.size, dtype=np.uint64) * 2 + 1) % 2**32  # as uint32 wraps
      result[path_name(path)] = int(np.sum((bits * weights) % 2**32) % 2**32)
  return result


def mismatches(expected: dict[str, int], actual: dict[str, Any]) -> list[str]:
  """The leaf paths whose checksum differs from the one recorded (or that lack one)."""
  return sorted(name for name, value in expected.items()
                if name not in actual or int(actual[name]) != int(value))
