"""Which parameters get weight decay and layer-wise (trust-ratio) adaptation.

A *mask* follows optax's convention (see `optax.masked`): either a pytree of
bools with the structure of the parameters, or a callable `params -> pytree of
bools`, or `None` (no mask: every leaf is included). `True` means the leaf is
decayed and adapted; `False` means it gets the plain base update (momentum SGD
for LARS, Adam for LAMB) with no weight decay.

Leaves are addressed by their '/'-joined path, e.g.
`"Stage_0/Block_1/BatchNorm_0/scale"` for `params["Stage_0"]["Block_1"]
["BatchNorm_0"]["scale"]`; list and tuple indices appear as numbers.

The default rule, as in the large-batch recipes (Goyal et al. 2017,
arXiv 1706.02677, sec. 5.1 on BN; You et al. 2017, arXiv 1708.03888; the MLPerf
ResNet-50 LARS reference, which skips `batch_normalization` and `bias`):
a leaf is decayed and adapted iff its name is neither `bias` nor `scale` and it
has at least 2 dimensions. That excludes biases and the BatchNorm / LayerNorm /
GroupNorm `scale` and `bias` parameters (and any other 0-D or 1-D leaf), and
includes convolution and dense kernels and embeddings.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

__all__ = [
    "DEFAULT",
    "MaskOrFn",
    "default_decay_mask",
    "default_decay_predicate",
    "mask_from_patterns",
    "mask_from_predicate",
    "path_str",
    "resolve",
]

MaskOrFn = Any | Callable[[optax.Params], Any] | None
"""A pytree of bools, a callable `params -> pytree of bools`, or None (all)."""

Predicate = Callable[[str, Any], bool]
"""`(path_str, leaf) -> bool`: True if the leaf is decayed and adapted."""

_EXCLUDED_NAMES = frozenset({"bias", "scale"})


def path_str(path: Sequence[Any]) -> str:
  """The '/'-joined form of a `jax.tree_util` key path, e.g. `"Conv_0/kernel"`."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def default_decay_predicate(path: str, leaf: Any) -> bool:
  """The default rule: True iff the leaf's name is not `bias`/`scale` and `ndim >= 2`.

  Args:
    path: The leaf's '/'-joined path; its last component is the leaf's name.
    leaf: The parameter (an array, or anything with `ndim` / usable by `np.ndim`).

  Returns:
    Whether the leaf gets weight decay and trust-ratio adaptation.
  """
  name = path.rsplit("/", 1)[-1]
  ndim = getattr(leaf, "ndim", None)
  if ndim is None:
    ndim = np.ndim(leaf)
  return name not in _EXCLUDED_NAMES and ndim >= 2


def mask_from_predicate(predicate: Predicate) -> Callable[[optax.Params], Any]:
  """A mask function that applies `predicate(path_str, leaf)` to every leaf.

  Example, excluding the classifier as well as the default exclusions::

    mask = mask_from_predicate(
        lambda p, x: default_decay_predicate(p, x) and not p.startswith("Dense_0/"))

  Args:
    predicate: `(path, leaf) -> bool`; `path` is '/'-joined, see `path_str`.

  Returns:
    A callable `params -> pytree of bools`, usable wherever optax takes a mask.
  """

  def mask_fn(params: optax.Params) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(predicate(path_str(path), leaf)), params)

  return mask_fn


def mask_from_patterns(exclude: Sequence[str]) -> Callable[[optax.Params], Any]:
  """A mask that is False for leaves whose path matches any of the `exclude` regexes.

  Patterns are matched with `re.search` against the '/'-joined path, so they may
  match anywhere; anchor them (`^...$`) to match whole paths. Every leaf that
  matches no pattern is True, whatever its name or shape: to keep the default
  exclusions too, add e.g. `r"(^|/)(bias|scale)$"`, or combine predicates with
  `mask_from_predicate`.

  Args:
    exclude: Regular expressions, e.g. `[r"BatchNorm_\\d+/", r"/bias$"]`.

  Returns:
    A callable `params -> pytree of bools`.
  """
  if isinstance(exclude, str):
    exclude = [exclude]
  compiled = [re.compile(p) for p in exclude]
  return mask_from_predicate(lambda path, _: not any(c.search(path) for c in compiled))


def default_decay_mask(params: optax.Params) -> Any:
  """The default mask: `default_decay_predicate` applied to every leaf.

  Args:
    params: A parameter pytree (e.g. a Flax module's `variables["params"]`), or
      updates with the same structure and shapes.

  Returns:
    A pytree of bools: True for kernels/embeddings (decayed and adapted), False
    for biases, normalization `scale`/`bias` and every other leaf with ndim < 2.
  """
  return mask_from_predicate(default_decay_predicate)(params)


class _Default:
  """The `mask` default of `lars` and `lamb`: `default_decay_mask`. A plain object, not a
  function, so that `optax.inject_hyperparams` keeps it as a static argument instead of taking
  a callable for a schedule of the step count."""

  def __repr__(self) -> str:
    return "masks.DEFAULT"


DEFAULT = _Default()


def resolve(mask: MaskOrFn) -> MaskOrFn:
  """`default_decay_mask` for `DEFAULT`, any other mask as it is."""
  return default_decay_mask if mask is DEFAULT else mask
