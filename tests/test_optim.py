"""Tests for jaxscale.optim: expected values are computed by hand with NumPy."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxscale import optim


class TinyResNet(nn.Module):
  """Conv-BN stem, one residual block, Dense head: the leaf kinds of a ResNet."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    y = nn.Conv(4, (3, 3))(x)  # with a bias
    y = nn.BatchNorm(use_running_average=not train)(y)
    x = nn.relu(x + y)
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


EXPECTED_DEFAULT_MASK = {
    "Conv_0": {"kernel": True},
    "BatchNorm_0": {"scale": False, "bias": False},
    "Conv_1": {"kernel": True, "bias": False},
    "BatchNorm_1": {"scale": False, "bias": False},
    "Dense_0": {"kernel": True, "bias": False},
}
KERNELS = [("Conv_0", "kernel"), ("Conv_1", "kernel"), ("Dense_0", "kernel")]
NON_KERNELS = [("BatchNorm_0", "scale"), ("BatchNorm_0", "bias"), ("Conv_1", "bias"),
               ("BatchNorm_1", "scale"), ("BatchNorm_1", "bias"), ("Dense_0", "bias")]


@pytest.fixture(scope="module")
def params():
  variables = TinyResNet().init(jax.random.PRNGKey(0), jnp.ones((1, 6, 6, 2)))
  # BN biases init to 0 and scales to 1, biases to 0: perturb so that every norm is
  # generic (a zero parameter would hit the ratio-1 convention).
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def grads_like(params, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def leaf(tree, path):
  return np.asarray(tree[path[0]][path[1]], np.float64)


def norm(x):
  return float(np.sqrt(np.sum(np.square(x))))


# ----------------------------------------------------------------------------- masks


def test_default_mask_on_resnet_tree(params):
  assert optim.default_decay_mask(params) == EXPECTED_DEFAULT_MASK


def test_default_predicate_rule():
  assert optim.default_decay_predicate("Block_0/Conv_0/kernel", np.zeros((3, 3, 2, 4)))
  assert not optim.default_decay_predicate("Dense_0/bias", np.zeros((4, 4)))  # by name
  assert not optim.default_decay_predicate("LayerNorm_0/scale", np.zeros((2, 4)))
  assert not optim.default_decay_predicate("Dense_0/kernel", np.zeros((4,)))  # 1-D
  assert not optim.default_decay_predicate("temperature", np.float32(1.0))  # 0-D


def test_path_str_nested_and_sequences():
  tree = {"Stage_0": {"Block_1": {"BatchNorm_0": {"scale": 1.0}}}, "heads": [2.0, 3.0]}
  paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert sorted(paths) == ["Stage_0/Block_1/BatchNorm_0/scale", "heads/0", "heads/1"]


def test_mask_from_predicate(params):
  mask = optim.mask_from_predicate(
      lambda p, x: optim.default_decay_predicate(p, x) and not p.startswith("Dense_0/"))
  expected = {**EXPECTED_DEFAULT_MASK, "Dense_0": {"kernel": False, "bias": False}}
  assert mask(params) == expected


def test_mask_from_patterns(params):
  mask = optim.mask_from_patterns(exclude=[r"BatchNorm_\d+/", r"^Conv_1/bias$"])
  assert mask(params) == {
      "Conv_0": {"kernel": True},
      "BatchNorm_0": {"scale": False, "bias": False},
      "Conv_1": {"kernel": True, "bias": False},
      "BatchNorm_1": {"scale": False, "bias": False},
      "Dense_0": {"kernel": True, "bias": True},
  }


# ----------------------------------------------------------------------- LARS / LAMB

LR, WD, TC, MOM = 0.5, 0.01, 0.001, 0.9


def lars_ratio(w, g):
  return TC * norm(w) / (norm(g) + WD * norm(w))


def test_lars_two_steps_match_hand_computation(params):
  g1, g2 = grads_like(params, 10), grads_like(params, 11)
  tx = optim.lars(LR, momentum=MOM, weight_decay=WD, trust_coefficient=TC)
  state = tx.init(params)
  u1, state = tx.update(g1, state, params)
  p2 = optax.apply_updates(params, u1)
  u2, state = tx.update(g2, state, p2)
  for path in KERNELS:
    w1, a, b = leaf(params, path), leaf(g1, path), leaf(g2, path)
    v1 = LR * lars_ratio(w1, a) * (a + WD * w1)
    w2 = w1 - v1
    v2 = MOM * v1 + LR * lars_ratio(w2, b) * (b + WD * w2)
    np.testing.assert_allclose(leaf(u1, path), -v1, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(leaf(u2, path), -v2, rtol=1e-4, atol=1e-9)
    # The trust ratio is really in effect: it is far from 1.
    assert lars_ratio(w1, a) < 0.01
  # Biases and BN parameters: plain momentum SGD (no decay, no ratio).
  sgd = optax.sgd(LR, momentum=MOM)
  s = sgd.init(params)
  s1, s = sgd.update(g1, s)
  s2, s = sgd.update(g2, s)
  for path in NON_KERNELS:
    a, b = leaf(g1, path), leaf(g2, path)
    np.testing.assert_allclose(leaf(u1, path), -LR * a, rtol=1e-5)
    np.testing.assert_allclose(leaf(u2, path), -LR * (MOM * a + b), rtol=1e-5)
    np.testing.assert_allclose(leaf(u2, path), leaf(s2, path), rtol=1e-5)


def test_lars_nesterov_and_jit_with_schedule(params):
  g = grads_like(params, 12)
  sched = lambda step: 0.5 / (1.0 + step)  # noqa: E731  lr 0.5, then 0.25
  tx = optim.lars(sched, momentum=MOM, nesterov=True, weight_decay=WD,
                  trust_coefficient=TC)
  update = jax.jit(tx.update)
  state = tx.init(params)
  u1, state = update(g, state, params)
  u2, state = update(g, state, params)  # same params and grads: same ratio
  path = KERNELS[1]
  w, a = leaf(params, path), leaf(g, path)
  d = lars_ratio(w, a) * (a + WD * w)
  v1 = 0.5 * d
  np.testing.assert_allclose(leaf(u1, path), -(MOM * v1 + 0.5 * d), rtol=1e-4)
  v2 = MOM * v1 + 0.25 * d
  np.testing.assert_allclose(leaf(u2, path), -(MOM * v2 + 0.25 * d), rtol=1e-4)


def test_lars_eps_and_zero_norm_convention(params):
  g = grads_like(params, 13)
  zero_kernel = {**params, "Dense_0": {
      **params["Dense_0"], "kernel": jnp.zeros_like(params["Dense_0"]["kernel"])}}
  tx = optim.lars(LR, weight_decay=WD, trust_coefficient=TC, eps=0.5)
  u, _ = tx.update(g, tx.init(zero_kernel), zero_kernel)
  # ||w|| = 0: ratio 1, the update is lr * (g + wd * 0).
  np.testing.assert_allclose(leaf(u, KERNELS[2]), -LR * leaf(g, KERNELS[2]), rtol=1e-5)
  w, a = leaf(params, KERNELS[0]), leaf(g, KERNELS[0])
  ratio = TC * norm(w) / (norm(a) + WD * norm(w) + 0.5)
  np.testing.assert_allclose(leaf(u, KERNELS[0]), -LR * ratio * (a + WD * w), rtol=1e-4)


def test_lars_mask_none_adapts_every_leaf(params):
  g = grads_like(params, 14)
  tx = optim.lars(LR, weight_decay=WD, trust_coefficient=TC, mask=None)
  u, _ = tx.update(g, tx.init(params), params)
  for path in NON_KERNELS + KERNELS:
    w, a = leaf(params, path), leaf(g, path)
    np.testing.assert_allclose(leaf(u, path), -LR * lars_ratio(w, a) * (a + WD * w),
                               rtol=1e-4)


def test_lars_mask_as_pytree_and_predicate(params):
  g = grads_like(params, 15)
  explicit = {**EXPECTED_DEFAULT_MASK, "Dense_0": {"kernel": False, "bias": False}}
  predicate = optim.mask_from_predicate(lambda p, x: x.ndim == 4)  # convolutions only
  for mask in (explicit, predicate):
    tx = optim.lars(LR, momentum=MOM, weight_decay=WD, trust_coefficient=TC, mask=mask)
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(leaf(u, KERNELS[2]), -LR * leaf(g, KERNELS[2]), rtol=1e-5)
    w, a = leaf(params, KERNELS[0]), leaf(g, KERNELS[0])
    np.testing.assert_allclose(leaf(u, KERNELS[0]), -LR * lars_ratio(w, a) * (a + WD * w),
                               rtol=1e-4)


def test_lars_in_chain_with_clipping(params):
  g = grads_like(params, 16, scale=10.0)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optim.lars(LR, weight_decay=WD, trust_coefficient=TC))
  u, _ = tx.update(g, tx.init(params), params)
  gnorm = math.sqrt(sum(norm(np.asarray(x)) ** 2 for x in jax.tree.leaves(g)))
  assert gnorm > 1.0
  for path in KERNELS[:1] + NON_KERNELS[:1]:
    w, a = leaf(params, path), leaf(g, path) / gnorm
    expected = (-LR * lars_ratio(w, a) * (a + WD * w) if path in KERNELS else -LR * a)
    np.testing.assert_allclose(leaf(u, path), expected, rtol=1e-4)


B1, B2, EPS = 0.9, 0.999, 1e-6


def test_lamb_two_steps_match_hand_computation(params):
  g1, g2 = grads_like(params, 20), grads_like(params, 21)
  tx = optim.lamb(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
  state = tx.init(params)
  u1, state = tx.update(g1, state, params)
  p2 = optax.apply_updates(params, u1)
  u2, state = tx.update(g2, state, p2)

  def adam_dirs(a, b):
    r1 = a / (np.abs(a) + EPS)  # m_hat = g, v_hat = g**2 at step 1
    m = (1 - B1) * (B1 * a + b) / (1 - B1 ** 2)
    v = (1 - B2) * (B2 * a ** 2 + b ** 2) / (1 - B2 ** 2)
    return r1, m / (np.sqrt(v) + EPS)

  for path in KERNELS:
    w1, (r1, r2) = leaf(params, path), adam_dirs(leaf(g1, path), leaf(g2, path))
    d1 = r1 + WD * w1
    w2 = w1 - LR * norm(w1) / norm(d1) * d1
    d2 = r2 + WD * w2
    np.testing.assert_allclose(leaf(u1, path), -LR * norm(w1) / norm(d1) * d1, rtol=1e-4)
    np.testing.assert_allclose(leaf(u2, path), -LR * norm(w2) / norm(d2) * d2, rtol=1e-4)
  adam = optax.adam(LR, b1=B1, b2=B2, eps=EPS)
  s = adam.init(params)
  _, s = adam.update(g1, s)
  a2, s = adam.update(g2, s)
  for path in NON_KERNELS:
    r1, r2 = adam_dirs(leaf(g1, path), leaf(g2, path))
    np.testing.assert_allclose(leaf(u1, path), -LR * r1, rtol=1e-4)
    np.testing.assert_allclose(leaf(u2, path), -LR * r2, rtol=1e-4)
    np.testing.assert_allclose(leaf(u2, path), leaf(a2, path), rtol=1e-5)


def test_lamb_in_chain_under_jit(params):
  g = grads_like(params, 22)
  tx = optax.chain(optax.clip_by_global_norm(1e3), optim.lamb(LR, weight_decay=WD))
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  w, a = leaf(params, KERNELS[1]), leaf(g, KERNELS[1])
  d = a / (np.abs(a) + EPS) + WD * w
  np.testing.assert_allclose(leaf(u, KERNELS[1]), -LR * norm(w) / norm(d) * d, rtol=1e-4)


def test_lars_requires_params(params):
  tx = optim.lars(LR)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize("factory, kwargs", [
    (optim.lars, dict(momentum=0.9, nesterov=True, weight_decay=1e-4)),
    (optim.lamb, dict(weight_decay=0.01)),
])
def test_inject_hyperparams_keeps_the_masks_and_equals_the_plain_optimizer(params, factory,
                                                                           kwargs):
  plain = factory(5.0, **kwargs)
  injected = optax.inject_hyperparams(factory)(learning_rate=5.0, **kwargs)
  assert "mask" not in injected.init(params).hyperparams  # static, not a "schedule"

  @jax.jit
  def three_steps(params):
    out = []
    for tx in (plain, injected):
      p, state = params, tx.init(params)
      for seed in range(3):
        updates, state = tx.update(grads_like(params, seed), state, p)
        p = optax.apply_updates(p, updates)
      out.append(p)
    return out

  a, b = three_steps(params)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # bit for bit
  # The comparison can fail: without the masks, BatchNorm parameters get the trust ratio.
  unmasked = factory(5.0, **kwargs, mask=None)
  updates, _ = unmasked.update(grads_like(params, 0), unmasked.init(params), params)
  masked, _ = plain.update(grads_like(params, 0), plain.init(params), params)
  assert not np.allclose(leaf(updates, ("BatchNorm_0", "scale")),
                         leaf(masked, ("BatchNorm_0", "scale")))


def test_multisteps_composes_with_lars(params):
  """optax.MultiSteps over 2 micro-steps: one LARS step on the mean gradient."""
  accumulated = optax.MultiSteps(optim.lars(LR, weight_decay=1e-4), every_k_schedule=2)
  state = accumulated.init(params)
  g1, g2 = grads_like(params, 1), grads_like(params, 2)
  first, state = accumulated.update(g1, state, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(first))  # not yet
  second, _ = accumulated.update(g2, state, params)
  direct = optim.lars(LR, weight_decay=1e-4)
  expected, _ = direct.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2),
                              direct.init(params), params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), second,
               expected)


# ------------------------------------------------------------------------- schedules


def values(schedule, steps):
  jitted = jax.jit(schedule)
  out = [float(jitted(jnp.int32(s))) for s in steps]
  np.testing.assert_allclose(out, [float(schedule(s)) for s in steps], rtol=1e-6)
  return out


def test_warmup_polynomial():
  s = optim.warmup_polynomial(2.0, 10, 110, power=2.0, end_value=0.1)
  expected = [0.0, 1.0, 2.0, 0.1 + 1.9 * 0.25, 0.1 + 1.9 * 0.01, 0.1, 0.1]
  np.testing.assert_allclose(values(s, [0, 5, 10, 60, 100, 110, 500]), expected, rtol=1e-5)
  s = optim.warmup_polynomial(1.0, 4, 8, power=1.0, init_value=0.2)
  np.testing.assert_allclose(values(s, [0, 2, 4, 6, 8]), [0.2, 0.6, 1.0, 0.5, 0.0],
                             rtol=1e-6, atol=1e-7)


def test_warmup_cosine():
  s = optim.warmup_cosine(1.0, 10, 110, end_value=0.0)
  expected = [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0, 0.0]
  np.testing.assert_allclose(values(s, [0, 5, 10, 35, 60, 110, 1000]), expected,
                             rtol=1e-5, atol=1e-7)
  s = optim.warmup_cosine(1.0, 0, 100, end_value=0.2)
  np.testing.assert_allclose(values(s, [0, 50, 100]), [1.0, 0.6, 0.2], rtol=1e-5)


def test_warmup_piecewise():
  s = optim.warmup_piecewise(1.0, 5, [10, 20], factor=0.1)
  expected = [0.0, 0.4, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
  np.testing.assert_allclose(values(s, [0, 2, 5, 9, 10, 19, 20, 1000]), expected, rtol=1e-5)


def test_constant_schedules():
  np.testing.assert_allclose(values(optim.constant(0.3), [0, 7, 10**6]), [0.3] * 3,
                             rtol=1e-6)
  np.testing.assert_allclose(values(optim.warmup_constant(0.3, 3), [0, 1, 3, 100]),
                             [0.0, 0.1, 0.3, 0.3], rtol=1e-5)


def test_schedules_reject_negative_steps():
  with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
    optim.warmup_cosine(1.0, -1, 10)


def test_scale_learning_rate():
  assert optim.scale_learning_rate(0.1, 1024, 256, "linear") == pytest.approx(0.4)
  assert optim.scale_learning_rate(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
  assert optim.scale_learning_rate(0.1, 1024, 256, "none") == pytest.approx(0.1)
  assert optim.scale_learning_rate(0.1, 64, 256, "linear") == pytest.approx(0.025)
  with pytest.raises(ValueError) as e:
    optim.scale_learning_rate(0.1, 1024, 256, "cubic")
  assert str(e.value) == ("unknown learning-rate scaling rule 'cubic'; "
                          "known: linear, none, sqrt")


# --------------------------------------------------------------------------- builders


def opt_config(**overrides):
  c = optim.default_optimizer_config()
  c.update(overrides)
  return c


def test_default_configs():
  assert optim.default_optimizer_config().to_dict() == {
      "name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0,
      "trust_coefficient": 0.001, "eps": None, "b1": 0.9, "b2": 0.999}
  assert optim.default_schedule_config().to_dict() == {
      "name": "cosine", "warmup_epochs": 1.0, "power": 2.0, "end_value_factor": 0.0,
      "boundaries_epochs": [30.0, 60.0, 80.0], "decay_factor": 0.1}


def test_build_sgd_decays_kernels_only(params):
  g = grads_like(params, 30)
  tx = optim.build_optimizer(opt_config(name="sgd", weight_decay=WD, nesterov=False), LR)
  u, _ = tx.update(g, tx.init(params), params)
  for path in KERNELS:
    np.testing.assert_allclose(leaf(u, path),
                               -LR * (leaf(g, path) + WD * leaf(params, path)), rtol=1e-5)
  for path in NON_KERNELS:
    np.testing.assert_allclose(leaf(u, path), -LR * leaf(g, path), rtol=1e-5)


def test_build_lars_and_lamb_match_direct(params):
  g = grads_like(params, 31)
  tx = optim.build_optimizer(
      opt_config(name="lars", weight_decay=WD, nesterov=False, trust_coefficient=TC), LR)
  u, _ = tx.update(g, tx.init(params), params)
  w, a = leaf(params, KERNELS[0]), leaf(g, KERNELS[0])
  np.testing.assert_allclose(leaf(u, KERNELS[0]), -LR * lars_ratio(w, a) * (a + WD * w),
                             rtol=1e-4)
  np.testing.assert_allclose(leaf(u, NON_KERNELS[0]), -LR * leaf(g, NON_KERNELS[0]),
                             rtol=1e-5)
  tx = optim.build_optimizer(opt_config(name="lamb", weight_decay=WD), LR)
  u, _ = tx.update(g, tx.init(params), params)
  d = a / (np.abs(a) + 1e-6) + WD * w  # eps None -> LAMB's 1e-6
  np.testing.assert_allclose(leaf(u, KERNELS[0]), -LR * norm(w) / norm(d) * d, rtol=1e-4)


def test_build_adamw_default_eps_and_mask(params):
  g = jax.tree.map(lambda x: jnp.full_like(x, 1e-8), params)  # |g| == eps: r = 1/2
  tx = optim.build_optimizer(opt_config(name="adamw", weight_decay=WD), LR)
  u, _ = tx.update(g, tx.init(params), params)
  for path in NON_KERNELS:
    np.testing.assert_allclose(leaf(u, path), -LR * 0.5, rtol=1e-3)
  for path in KERNELS:
    np.testing.assert_allclose(leaf(u, path), -LR * (0.5 + WD * leaf(params, path)),
                               rtol=1e-3)
  tx = optim.build_optimizer(opt_config(name="adamw", eps=0.0), LR)
  u, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(leaf(u, NON_KERNELS[0]), -LR, rtol=1e-5)


def test_build_optimizer_errors():
  with pytest.raises(ValueError) as e:
    optim.build_optimizer(opt_config(name="foo"), 0.1)
  assert str(e.value) == ("unknown optimizer 'foo' (config key optimizer.name); "
                          "known: adamw, lamb, lars, sgd")
  with pytest.raises(ValueError, match=r"^config key optimizer.momentum must be in"):
    optim.build_optimizer(opt_config(name="lars", momentum=1.5), 0.1)


def sched_config(**overrides):
  c = optim.default_schedule_config()
  c.update(overrides)
  return c


def test_build_schedule_each_name():
  kw = dict(base_learning_rate=2.0, steps_per_epoch=10.0, total_steps=100)
  s = optim.build_schedule(sched_config(name="constant", warmup_epochs=0.5), **kw)
  np.testing.assert_allclose(values(s, [0, 5, 99]), [0.0, 2.0, 2.0], rtol=1e-6)
  s = optim.build_schedule(sched_config(name="cosine", warmup_epochs=1.0,
                                        end_value_factor=0.1), **kw)
  np.testing.assert_allclose(values(s, [0, 10, 55, 100]), [0.0, 2.0, 1.1, 0.2], rtol=1e-5)
  s = optim.build_schedule(sched_config(name="poly", warmup_epochs=1.0, power=2.0), **kw)
  np.testing.assert_allclose(values(s, [5, 10, 55, 100]), [1.0, 2.0, 0.5, 0.0],
                             rtol=1e-5, atol=1e-7)
  s = optim.build_schedule(sched_config(name="steps", warmup_epochs=0.0,
                                        boundaries_epochs=[3.0, 6.5], decay_factor=0.5),
                           **kw)
  np.testing.assert_allclose(values(s, [0, 29, 30, 64, 65]), [2.0, 2.0, 1.0, 1.0, 0.5],
                             rtol=1e-6)


def test_build_schedule_errors():
  kw = dict(base_learning_rate=0.1, steps_per_epoch=1.0, total_steps=10)
  with pytest.raises(ValueError) as e:
    optim.build_schedule(sched_config(name="linear"), **kw)
  assert str(e.value) == ("unknown learning-rate schedule 'linear' (config key "
                          "lr_schedule.name); known: constant, cosine, poly, steps")
  with pytest.raises(ValueError, match=r"^config key lr_schedule.warmup_epochs must be"):
    optim.build_schedule(sched_config(warmup_epochs=-1.0), **kw)


def test_configs_embed_in_a_trainer_config():
  c = ml_collections.ConfigDict()
  c.optimizer = optim.default_optimizer_config()
  c.lr_schedule = optim.default_schedule_config()
  c.optimizer.name = "lamb"
  c.optimizer.eps = 1e-5
  assert isinstance(optim.build_optimizer(c.optimizer, optim.constant(0.1)),
                    optax.GradientTransformation)
  assert callable(optim.build_schedule(c.lr_schedule, base_learning_rate=0.1,
                                       steps_per_epoch=1.0, total_steps=10))
