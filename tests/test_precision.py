"""Precision policies, the loss scaler, the finite check and the non-finite guard.

Time budget: 90 s on a 2-core CPU (resnet8 on 8x8 images; each compiled step is shared by the
tests that need it).
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
import pytest

from jaxscale import allreduce, config as config_lib, models, precision, runners, tasks, train
from conftest import MEAN, STD, run_main, tiny_pieces

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "quickstart.py")
F32, BF16, F16 = (jnp.dtype(n) for n in ("float32", "bfloat16", "float16"))
GLOBAL_BATCH = 16
# Grows every step from 2**8, so two steps end at 2**10 if neither overflows.
TEST_SCALE = precision.LossScaleConfig(initial=2.0**8, growth_interval_steps=1)
# policy -> the all-reduce dtype its runs use: every exchange dtype is exercised once.
CASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def make_batches(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (GLOBAL_BATCH, 8, 8, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}
          for _ in range(num_steps)]


@functools.cache
def initial_state():
  """One float32 initial state for every runner: the policies differ in compute, not in their
  float32 master parameters, and compiling the initialization once saves seconds per runner."""
  return jax.device_get(tiny_pieces(jax.devices()[:1]).init_state())


def make_runner(parallelism, policy_name, *, allreduce="float32", loss_scale=TEST_SCALE,
                local_bn=False, mean=MEAN, std=STD):
  """(Linen module, runner) of resnet8 on 8 devices in `policy_name`, SGD-Nesterov without
  decay; `local_bn`: per-device BatchNorm statistics, running averages synchronized."""
  pieces = tiny_pieces(jax.devices(), f"parallelism={parallelism}", f"precision={policy_name}",
                       f"grad_allreduce_dtype={allreduce}", "optimizer.weight_decay=0.0",
                       f"mean=[{mean[0]}]", f"std=[{std[0]}]")
  policy = precision.parse_policy(policy_name)
  scaler = loss_scale if policy.needs_loss_scale else precision.NO_LOSS_SCALE
  changes = dict(loss_scale=scaler)
  if local_bn:
    changes.update(batch_norm=models.BatchNorm(None), sync_batch_stats=True)
  assert policy.param_dtype == F32
  state = initial_state().replace(loss_scale=precision.init_loss_scale(scaler))
  spec = dataclasses.replace(pieces.spec, **changes)
  return pieces.model.module, runners.RUNNERS[parallelism](spec, pieces.mesh, lambda rng: state)


def device_copies(tree):
  """Every device's copy of a replicated state (shard_map) or stacked state (pmap), as numpy."""
  def copies(x):
    if x.sharding.is_fully_replicated:
      return [np.asarray(s.data) for s in x.addressable_shards]
    return [np.asarray(s.data)[0] for s in x.addressable_shards]  # pmap: a slice per device
  return jax.tree.map(copies, tree)


def copy_lists(tree):
  """The leaves of `device_copies(tree)`: one list of per-device copies per leaf."""
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, list))


def assert_devices_agree(tree):
  for copies in copy_lists(device_copies(tree)):
    for other in copies[1:]:
      np.testing.assert_array_equal(other, copies[0])


def psum_elements(jaxpr):
  """{dtype name: elements summed} over every psum in a jaxpr, nested ones included."""
  totals = {}

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "psum":
        for v in eqn.invars:
          name = v.aval.dtype.name
          totals[name] = totals.get(name, 0) + int(np.prod(v.aval.shape))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
  walk(jaxpr.jaxpr)
  return totals


@functools.cache
def trained(parallelism, policy_name):
  """Two steps of `policy_name` with its CASES all-reduce dtype, as host copies:
  (model, initial state, final state, last metrics, psum elements by dtype)."""
  model, runner = make_runner(parallelism, policy_name, allreduce=CASES[policy_name])
  state = runner.init_state(jax.random.key(0))
  init = jax.device_get(runner.global_state(state))
  batches = [runner.put_batch(b) for b in make_batches(2)]
  psums = None
  if parallelism == "shard_map":
    psums = psum_elements(jax.make_jaxpr(runner.train_step)(state, batches[0], 0.1))
  for batch in batches:
    state, metrics = runner.train_step(state, batch, 0.1)
  assert_devices_agree(state)
  return (model, init, jax.device_get(runner.global_state(state)), jax.device_get(metrics),
          psums)


# --- Policies and config. ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("fp32", (F32, F32, F32)),
    ("bf16", (F32, BF16, F32)),
    ("fp16", (F32, F16, F32)),
    ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32)),
    ("compute=float16, output=bfloat16", (F32, F16, BF16)),
    ("params=bf16,compute=bf16", (BF16, BF16, F32)),
])
def test_parse_policy(text, expected):
  policy = precision.parse_policy(text)
  assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == expected
  assert precision.parse_policy(str(policy)) == policy
  assert policy.needs_loss_scale == (F16 in expected)


@pytest.mark.parametrize("override, message", [
    ("precision=fp8", "config key 'precision': cannot read 'fp8'"),
    ("precision=params=float32,compute=int8", "config key 'precision': unknown dtype 'int8'"),
    ("precision=compute=bfloat16,compute=float16", "config key 'precision': cannot read"),
    ("grad_allreduce_dtype=float8", "config key 'grad_allreduce_dtype': unknown dtype 'float8'"),
    ("loss_scale.initial=1e9", "config key 'loss_scale': need 0 < min <= initial <= max"),
    ("loss_scale.backoff_factor=2", "config key 'loss_scale.backoff_factor' must be in (0, 1]"),
    ("loss_scale.growth_factor=0.5", "config key 'loss_scale.growth_factor' must be >= 1"),
    ("max_nonfinite_steps=0", "config key 'max_nonfinite_steps' must be >= 1"),
])
def test_bad_precision_config_is_one_line_error(tmp_path, capsys, override, message):
  workdir = tmp_path / "run"
  code, line = run_main(["--config", QUICKSTART,
                         "--workdir", str(workdir), f"--config.{override}",
                         "--config.dataset=synthetic"], capsys)
  assert code == 2 and line.startswith("jaxscale-train: error: ") and message in line, line
  assert not workdir.exists()


def test_guard_needs_room_for_the_scaler_to_back_off(tmp_path, capsys):
  code, line = run_main(["--config", QUICKSTART,
                         "--workdir", str(tmp_path / "w"), "--config.dataset=synthetic",
                         "--config.precision=fp16", "--config.max_nonfinite_steps=15"], capsys)
  # 2**15 -> 1 takes 15 halvings: the guard must allow at least 16 non-finite steps in a row.
  assert code == 2 and "'max_nonfinite_steps': 15 would stop the run" in line, line


# --- The loss scaler. ----------------------------------------------------------------------------

def reference_scaler(finite_flags, config):
  """The scaler's rule in plain Python, one step at a time."""
  scale, good, skipped, out = config.initial, 0, 0, []
  for finite in finite_flags:
    if finite:
      good += 1
      if good >= config.growth_interval_steps:
        scale, good = min(scale * config.growth_factor, config.max), 0
    else:
      scale, good, skipped = max(scale * config.backoff_factor, config.min), 0, skipped + 1
    out.append((scale, good, skipped))
  return out


@pytest.mark.parametrize("config", [
    precision.LossScaleConfig(),
    precision.LossScaleConfig(initial=4.0, growth_interval_steps=3, min=1.0, max=64.0),
    precision.LossScaleConfig(initial=8.0, growth_factor=4.0, growth_interval_steps=1,
                              backoff_factor=0.25, min=0.5, max=512.0),
    precision.NO_LOSS_SCALE,
])
def test_loss_scale_follows_the_rule_and_stays_in_bounds(config):
  rng = np.random.default_rng(0)
  # Long finite runs (growth up to the max) and non-finite bursts (backoff to the min).
  flags = np.concatenate([np.ones(40, bool), np.zeros(30, bool), rng.random(200) < 0.8,
                          np.ones(50000, bool)])  # 24 growths of 2000 steps

  def body(state, finite):
    state = precision.update_loss_scale(state, finite, config)
    return state, (state.scale, state.finite_steps, state.skipped_steps)

  _, (scales, good, skipped) = jax.jit(lambda f: jax.lax.scan(
      body, precision.init_loss_scale(config), f))(flags)
  expected = np.array(reference_scaler(flags, config))
  np.testing.assert_array_equal(scales, expected[:, 0].astype(np.float32))
  np.testing.assert_array_equal(good, expected[:, 1])
  np.testing.assert_array_equal(skipped, expected[:, 2])
  assert scales.max() <= config.max and scales.min() >= config.min
  if config != precision.NO_LOSS_SCALE:  # the bounds are actually reached
    assert scales.max() == config.max and scales.min() == config.min


@pytest.mark.parametrize("policy_name, wire, scaled", [
    ("fp32", "float32", False), ("bf16", "bfloat16", False), ("fp16", "float32", True),
    ("bf16", "float16", True),  # float16 on the wire needs the scale too
])
def test_loss_scaling_where_float16_appears(policy_name, wire, scaled):
  config = config_lib.defaults()
  config.precision, config.grad_allreduce_dtype = policy_name, wire
  config.loss_scale.initial = 1024.0
  scaler = precision.loss_scale_config(config)
  assert scaler == (precision.LossScaleConfig(initial=1024.0) if scaled
                    else precision.NO_LOSS_SCALE)


def test_default_scale_is_inside_float16_range():
  config = precision.LossScaleConfig()
  assert config.initial <= float(jnp.finfo(jnp.float16).max) < config.max
  assert config.backoff_steps() == 15


# --- Cross-device pieces. ------------------------------------------------------------------------

def test_half_precision_mean_does_not_overflow_where_the_terms_fit():
  """8 x 10000 overflows float16 (max 65504) if summed first; the mean is 10000.

  Under `vmap` the named-axis sum really runs in float16 on a CPU (the CPU's all-reduce would
  compute in float32 and hide an overflow that a GPU's float16 NCCL sum would hit).
  """
  values = np.full((8, 3), 10000.0, np.float32)
  values[:, 1] = np.arange(8) * 1000.0

  def mean(reduce):
    return np.asarray(jax.jit(jax.vmap(reduce, axis_name="data"))(values))

  sum_first = mean(lambda g: lax.pmean(g.astype(jnp.float16), "data").astype(jnp.float32))
  assert np.isinf(sum_first[:, 0]).all()  # what the test guards against
  out = mean(lambda g: allreduce.mean_gradients(g, ("data",), "flat", jnp.float16))
  np.testing.assert_allclose(out, np.broadcast_to(values.mean(0), out.shape), rtol=1e-3)


def test_guard_reads_one_step_late_and_counts_only_consecutive_steps():
  guard = precision.NonFiniteGuard(max_steps=3)
  for step, finite in enumerate([True, False, False, True, False, False, False], start=1):
    assert guard.observe(step, np.bool_(finite))  # step 7 is pending, step 6 was the 2nd
  assert guard.error is None and guard.streak == 2
  assert not guard.flush() and not guard.observe(8, np.bool_(True))  # tripped for good
  assert "3 steps in a row (steps 5-7;" in str(guard.error)


# --- Policies in the train step. -----------------------------------------------------------------

@pytest.mark.parametrize("policy_name", list(CASES))
def test_dtypes_where_they_belong(policy_name):
  model, _, state, metrics, _ = trained("shard_map", policy_name)
  policy = precision.parse_policy(policy_name)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {policy.param_dtype}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state)} == {policy.param_dtype}
  assert {x.dtype for x in jax.tree.leaves(state.batch_stats)} == {F32}
  assert metrics["loss"].dtype == F32 and state.loss_scale.scale.dtype == F32
  images = tasks.normalize(make_batches(1)[0]["image"], MEAN, STD, policy.compute_dtype)
  logits, inter = jax.eval_shape(  # dtypes only: traced, not compiled
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True),
      {"params": state.params, "batch_stats": state.batch_stats}, images)
  activations = {k: v["__call__"][0] for k, v in inter["intermediates"].items()
                 if k.startswith(("conv_init", "bn_init", "BasicBlock"))}
  assert len(activations) == 5
  assert {x.dtype for x in activations.values()} == {policy.compute_dtype}
  assert logits.dtype == F32


@pytest.mark.parametrize("policy_name", list(CASES))
def test_gradients_cross_devices_in_the_configured_dtype(policy_name):
  _, _, state, _, psums = trained("shard_map", policy_name)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  wire = CASES[policy_name]
  assert psums.get(wire, 0) >= num_params
  assert sum(psums.values()) < 2 * num_params  # nothing else large crosses the devices
  if wire != "float32":
    assert psums[wire] == num_params


@pytest.mark.parametrize("policy_name", list(CASES))
def test_shard_map_and_pmap_agree(policy_name):
  _, _, ref, ref_metrics, _ = trained("shard_map", policy_name)
  _, _, state, metrics, _ = trained("pmap", policy_name)
  assert int(state.step) == int(ref.step) == 2
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
                               atol=1e-7)
  for key in ("loss", "accuracy", "loss_scale", "skipped_steps", "finite"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5)


@pytest.mark.parametrize("policy_name", ["bf16", "fp16"])
def test_half_precision_trains_like_fp32(policy_name):
  """The same two steps move the parameters as float32's do, up to half-precision rounding.

  On a random-label batch the gradients carry little signal and much cancellation: computed in
  bfloat16 (float16) they differ from float32's by about 12% (6%) already on one device, 25%
  (17%) here after two steps. A missing unscale would be off by 2**8, a sum for a mean by 8x.
  """
  _, init, ref, _, _ = trained("shard_map", "fp32")
  _, _, state, metrics, _ = trained("shard_map", policy_name)
  assert int(metrics["skipped_steps"]) == 0
  assert float(metrics["loss_scale"]) == (2.0**10 if policy_name == "fp16" else 1.0)
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float32))
                                      for x in jax.tree.leaves(tree)])
  delta, ref_delta = flat(state.params) - flat(init.params), flat(ref.params) - flat(init.params)
  assert np.linalg.norm(delta - ref_delta) <= 0.4 * np.linalg.norm(ref_delta)


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_overflow_on_one_device_skips_the_step_everywhere(parallelism):
  """float16 inputs overflow on device 0 only (per-device BatchNorm keeps the others finite);
  the all-reduce spreads it, and every device skips the step and backs the scale off."""
  mean, std = (0.0,), (2e-3,)
  model, runner = make_runner(parallelism, "fp16", local_bn=True, mean=mean, std=std)
  state = runner.init_state(jax.random.key(0))
  good, bad = make_batches(2)
  good["image"] %= 4  # at most 3 / 2e-3 = 1500 in float16
  bad["image"] = np.zeros_like(bad["image"])
  bad["image"][:GLOBAL_BATCH // 8] = 255  # device 0's examples: 127500 -> inf in float16
  if parallelism == "pmap":  # the premise: alone, only device 0's loss is non-finite
    variables = jax.device_get(runner.global_state(state))
    local_loss = jax.jit(lambda images, labels: tasks.cross_entropy(model.apply(
        {"params": variables.params, "batch_stats": variables.batch_stats},
        tasks.normalize(images, mean, std, F16), train=True, mutable=["batch_stats"])[0],
        labels).mean())
    finite = [bool(np.isfinite(local_loss(x, y))) for x, y in zip(
        np.split(bad["image"], 8), np.split(bad["label"], 8))]
    assert finite == [False] + [True] * 7

  state, metrics = runner.train_step(state, runner.put_batch(good), 0.1)
  assert bool(metrics["finite"])
  before = device_copies(state)
  state, metrics = runner.train_step(state, runner.put_batch(bad), 0.1)
  after = device_copies(state)
  assert_devices_agree(state)
  assert not bool(metrics["finite"]) and int(metrics["skipped_steps"]) == 1
  assert float(metrics["loss_scale"]) == 2.0**9 * 0.5  # grew once, then backed off
  for field in ("params", "opt_state", "batch_stats"):
    for copies_before, copies_after in zip(copy_lists(getattr(before, field)),
                                           copy_lists(getattr(after, field))):
      for copy_before, copy_after in zip(copies_before, copies_after):
        np.testing.assert_array_equal(copy_before, copy_after)  # bit for bit, every device
  state, metrics = runner.train_step(state, runner.put_batch(good), 0.1)
  assert bool(metrics["finite"]) and int(metrics["skipped_steps"]) == 1


# --- The guard in a run. -------------------------------------------------------------------------

def test_nonfinite_run_stops_with_its_message(tmp_path, capsys):
  """A constant learning rate of 1e30: step 1 applies, every later step is non-finite."""
  workdir = tmp_path / "run"
  code, line = run_main(
      ["--config", QUICKSTART, "--workdir", str(workdir), "--config.dataset=synthetic",
       "--config.image_size=8", "--config.synthetic_num_train_examples=256",
       "--config.global_batch_size=16", "--config.num_train_steps=50",
       "--config.log_every_steps=1", "--config.lr_schedule.name=constant",
       "--config.lr_schedule.warmup_epochs=0", "--config.learning_rate=1e30",
       "--config.max_nonfinite_steps=3"], capsys)
  assert code == 1, line
  assert line.startswith("jaxscale-train: error: the loss or gradients were non-finite for "
                         "3 steps in a row (steps 2-4;"), line
  events = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [e["step"] for e in events] == [1, 2, 3, 4]  # stopped at once: no step 5, no eval
  assert [e["skipped_steps"] for e in events] == [0, 1, 2, 3]
  assert [e["loss_scale"] for e in events] == [1.0] * 4


def test_throughput_benchmark_rejects_a_bad_policy_before_measuring():
  benchmark = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "resnet50_throughput.py")
  proc = subprocess.run([sys.executable, benchmark, "--policies", "bf16,fp8"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "argument --policies: config key 'precision': cannot read 'fp8'" in proc.stderr
  assert "| bf16 |" not in proc.stdout  # nothing measured first
