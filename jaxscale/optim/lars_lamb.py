"""Layer-wise adaptive large-batch optimizers: LARS and LAMB.

Both exclude, by default, biases and normalization parameters from weight decay
*and* from the trust ratio (see `jaxscale.optim.masks`): those leaves get the
plain base update (momentum SGD for LARS, Adam for LAMB).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxscale.optim import masks

__all__ = ["lamb", "lars", "scale_by_lars_trust_ratio", "scale_by_trust_ratio"]

AxisName = str | tuple[str, ...] | None


def _norm(x: jax.Array, axis_name: AxisName = None) -> jax.Array:
  """The Frobenius norm of a leaf in float32; with `axis_name`, of the leaf whose slices the
  devices along those mesh axes hold (the sharded weight update, `jaxscale/sharding.py`)."""
  sum_sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
  return jnp.sqrt(sum_sq if axis_name is None else jax.lax.psum(sum_sq, axis_name))


def _maybe_masked(inner: optax.GradientTransformation,
                  mask: masks.MaskOrFn) -> optax.GradientTransformation:
  mask = masks.resolve(mask)
  return inner if mask is None else optax.masked(inner, mask)


def scale_by_lars_trust_ratio(
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
  r"""Adds L2 weight decay and scales by the LARS local learning rate, per leaf.

  For each leaf `w` with gradient `g` (You et al. 2017, arXiv 1708.03888,
  Algorithm 1; the MLPerf ResNet-50 LARS reference uses the same formula)::

    ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
    u     = ratio * (g + weight_decay * w)

  with `ratio = 1` where `||w|| = 0` or `||g|| = 0` (as in the MLPerf reference
  and `optax.scale_by_trust_ratio`). Norms are Frobenius norms over the whole
  leaf, computed in float32.

  Note the denominator is the paper's `||g|| + wd * ||w||`, not `||g + wd * w||`
  as in `optax.lars`; the two agree when `weight_decay == 0`.

  Args:
    weight_decay: The L2 coefficient `wd` (beta in the paper).
    trust_coefficient: `eta` in the paper (0.001 there).
    eps: Added to the denominator; 0 in the paper.
    axis_name: Mesh axes over which each leaf is sliced (inside `shard_map`): the norms are
      summed over them, so the ratio is the whole layer's. None: each device holds whole leaves.

  Returns:
    A stateless `optax.GradientTransformation`; `update` requires `params`.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lars_trust_ratio needs the current parameters: "
                       "pass `params` to `update`")

    def scale(g, w):
      w_norm, g_norm = _norm(w, axis_name), _norm(g, axis_name)
      ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
      ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
      return (ratio * (g + weight_decay * w)).astype(g.dtype)

    return jax.tree.map(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_trust_ratio(axis_name: AxisName = None) -> optax.GradientTransformation:
  r"""Scales each leaf's update by the LAMB trust ratio `||w|| / ||u||`, per leaf.

  As `optax.scale_by_trust_ratio` with its defaults (You et al., arXiv 1904.00962): ratio 1
  where `||w|| = 0` or `||u|| = 0`; norms in float32. With `axis_name`, each device holds a
  slice of every leaf and the norms are summed over those mesh axes (the sharded update).

  Returns:
    A stateless `optax.GradientTransformation`; `update` requires `params`.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_trust_ratio needs the current parameters: pass `params`")

    def scale(u, w):
      w_norm, u_norm = _norm(w, axis_name), _norm(u, axis_name)
      ratio = jnp.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
      return (ratio * u).astype(u.dtype)

    return jax.tree.map(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    mask: masks.MaskOrFn = masks.DEFAULT,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LARS: momentum SGD with a layer-wise trust ratio (You et al., arXiv 1708.03888).

  Per leaf, with `lr_t = learning_rate(t)` (You et al., Algorithm 1)::

    ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
    v     = momentum * v + lr_t * ratio * (g + weight_decay * w)
    w     = w - v                     # nesterov: w - (momentum * v + lr_t * ratio * (...))

  The learning rate is applied inside the momentum buffer, as in the paper and
  `optax.lars`. Leaves where `mask` is False get neither weight decay nor the
  ratio: `v = momentum * v + lr_t * g` (plain momentum SGD). See
  `scale_by_lars_trust_ratio` for the zero-norm convention.

  Args:
    learning_rate: A float or an optax schedule `step -> rate`.
    momentum: Momentum coefficient `m`.
    nesterov: Whether to use Nesterov momentum.
    weight_decay: L2 coefficient, applied (with the ratio) to masked-in leaves.
    trust_coefficient: `eta` in the paper.
    eps: Added to the trust-ratio denominator.
    mask: Which leaves get decay and the trust ratio: a bool pytree, a callable
      `params -> bool pytree`, or None for all leaves. Default (`masks.DEFAULT`):
      kernels only (`masks.default_decay_mask`). Under `optax.inject_hyperparams`,
      name a callable mask in `static_args`.
    axis_name: See `scale_by_lars_trust_ratio`; with it, give `mask` as a bool pytree
      computed from the whole parameters (a slice's shape is not the layer's).

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires `params`.
  """
  return optax.chain(
      _maybe_masked(scale_by_lars_trust_ratio(weight_decay, trust_coefficient, eps, axis_name),
                    mask),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum, nesterov=nesterov),
  )


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: masks.MaskOrFn = masks.DEFAULT,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LAMB: Adam with a layer-wise trust ratio (You et al., arXiv 1904.00962, Alg. 2).

  Per leaf, at step `t` (1-based), with `lr_t = learning_rate(t - 1)`::

    m = b1 * m + (1 - b1) * g;        v = b2 * v + (1 - b2) * g**2
    r = (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)
    u = r + weight_decay * w
    w = w - lr_t * (||w|| / ||u||) * u

  with ratio 1 where `||w|| = 0` or `||u|| = 0`; the paper's scaling function
  `phi` is the identity, as in `optax.lamb`. Leaves where `mask` is False get
  neither weight decay nor the ratio: `w = w - lr_t * r` (plain Adam).

  Args:
    learning_rate: A float or an optax schedule `step -> rate`.
    b1: Decay of the first moment.
    b2: Decay of the second moment.
    eps: Added to the Adam denominator `sqrt(v_hat)`.
    weight_decay: Decoupled weight decay, added to the Adam update before the
      trust ratio (so its effective size is `lr_t * ratio * weight_decay`).
    mask: Which leaves get decay and the trust ratio: a bool pytree, a callable
      `params -> bool pytree`, or None for all leaves. Default (`masks.DEFAULT`):
      kernels only (`masks.default_decay_mask`). Under `optax.inject_hyperparams`,
      name a callable mask in `static_args`.
    axis_name: See `scale_by_trust_ratio`; with it, give `mask` as a bool pytree computed
      from the whole parameters.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` requires `params`.
  """
  # float32 from the start: optax would compute `1 - b1` and friends in float64 for Python
  # floats, but in float32 under `optax.inject_hyperparams`; this way both give the same bits.
  b1, b2, eps, weight_decay = (jnp.asarray(x, jnp.float32) for x in (b1, b2, eps, weight_decay))
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=masks.resolve(mask)),
      _maybe_masked(scale_by_trust_ratio(axis_name), mask),
      optax.scale_by_learning_rate(learning_rate),
  )
