"""Sharded training state: `optimizer` (ZeRO-1) and `fsdp` against `replicated`.

The same 3 steps in every mode must give the same parameters, optimizer state and BatchNorm
statistics (relative difference <= 1e-5) with SGD, LARS and LAMB, through fp16 skips,
accumulation and the hierarchical mesh; checkpoints move between modes and topologies; the
compiled step reduce-scatters and all-gathers instead of all-reducing the gradient.
Time budget: about 2 minutes on a 2-core CPU (resnet8 on 8x8 images).
"""
import functools
import os
import re

import jax
import numpy as np
import pytest

from jaxscale import checkpoint, config as config_lib, optim, sharding, train
from conftest import make_batches, max_relative_difference, tiny_pieces, train_on

MODES = ("optimizer", "fsdp")


@functools.cache
def pieces(mode, *overrides, num_devices=8):
  return tiny_pieces(jax.devices()[:num_devices], f"state_sharding={mode}", *overrides)


@functools.cache
def trained(mode, *overrides):
  return train_on(pieces(mode, *overrides), make_batches(3))


def assert_same_state(state, reference):
  for field in ("params", "opt_state", "batch_stats"):
    assert max_relative_difference(getattr(state, field), getattr(reference, field)) <= 1e-5, field
  assert int(state.step) == int(reference.step) == 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("optimizer", ["sgd", "lars", "lamb"])
def test_sharded_modes_match_replicated(mode, optimizer):
  state, metrics = trained(mode, f"optimizer.name={optimizer}")
  reference, ref_metrics = trained("replicated", f"optimizer.name={optimizer}")
  assert_same_state(state, reference)
  for key in ("loss", "accuracy", "grad_sq_norm_global"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5)


def test_comparison_catches_a_trust_ratio_of_the_shard():
  """LARS with norms of each device's slice instead of the layer's: the test sees it."""
  reference, _ = trained("replicated", "optimizer.name=lars")
  p = pieces("optimizer", "optimizer.name=lars")
  mask = optim.default_decay_mask(jax.eval_shape(p.init_state).params)
  wrong = p.with_spec(make_optimizer=lambda lr: optim.build_optimizer(
      p.config.optimizer, lr, mask=mask))  # no axis_name: each slice's own norms
  state, _ = train_on(wrong, make_batches(3))
  assert max_relative_difference(state.params, reference.params) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_accumulation_and_hierarchical_mesh(mode):
  reference, _ = trained("replicated", "grad_accum_steps=2")
  assert_same_state(trained(mode, "grad_accum_steps=2")[0], reference)
  hierarchical = ("mesh=2x4", "allreduce=hierarchical", "bn_group_size=4")
  reference, _ = trained("replicated", *hierarchical)
  assert_same_state(trained(mode, *hierarchical)[0], reference)


@functools.cache
def fp16_steps(mode):
  """A finite fp16 step, then one whose float16 inputs overflow (127500 > 65504)."""
  p = pieces(mode, "precision=fp16", "mean=[0.0]", "std=[0.002]", "loss_scale.initial=256.0")
  good, bad = make_batches(2)
  good["image"] %= 4  # at most 1500 in float16
  bad["image"] = np.full_like(bad["image"], 255)
  runner, state = p.runner, p.init_state()
  state, _ = runner.train_step(state, runner.put_batch(good), 0.1)
  before = jax.device_get(state)
  state, metrics = runner.train_step(state, runner.put_batch(bad), 0.1)
  return before, jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("mode", MODES)
def test_fp16_overflow_skips_the_step_in_every_shard(mode):
  before, after, metrics = fp16_steps(mode)
  assert not bool(metrics["finite"]) and int(metrics["skipped_steps"]) == 1
  for field in ("params", "opt_state", "batch_stats"):  # the skipped step changed nothing
    jax.tree.map(np.testing.assert_array_equal, getattr(after, field), getattr(before, field))
  ref_before, _, ref_metrics = fp16_steps("replicated")
  assert float(metrics["loss_scale"]) == float(ref_metrics["loss_scale"])
  assert max_relative_difference(before.params, ref_before.params) <= 1e-5


def per_device_bytes(tree):
  """Bytes of `tree` on device 0 (the addressable shards it holds)."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


@pytest.mark.parametrize("mode", MODES)
def test_sharded_parts_take_a_device_share(mode):
  p = pieces(mode)
  state, replicated = p.init_state(), pieces("replicated").init_state()
  layout = p.spec.layout
  opt_bytes, full = per_device_bytes(state.opt_state), per_device_bytes(replicated.opt_state)
  chunked = sum(x.nbytes for x, d in zip(jax.tree.leaves(replicated.opt_state),
                                         jax.tree.leaves(layout.opt_state))
                if d in (sharding.CHUNKED, sharding.WHOLE))
  assert opt_bytes <= (full - chunked) / 8 + chunked
  assert opt_bytes < full / 4
  params = per_device_bytes(state.params)
  if mode == "fsdp":
    assert params < per_device_bytes(replicated.params) / 4
  else:
    assert params == per_device_bytes(replicated.params)


def collectives(pieces):
  """{op: [elements of each instance]} in the compiled train step."""
  runner = pieces.runner
  state = pieces.init_state()
  batch = runner.put_batch(make_batches(1)[0])
  text = runner.train_step.lower(state, batch, 0.1).compile().as_text()
  found = {}
  for line in text.splitlines():
    match = re.search(r" (all-reduce|reduce-scatter|all-gather)(-start)?\(", line)
    if match and " = " in line:
      result_type = line.split(" = ", 1)[1][:match.start() - line.index(" = ") - 3]
      shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", result_type)
      size = sum(int(np.prod([int(n) for n in s.split(",") if n] or [1])) for s in shapes)
      found.setdefault(match.group(1), []).append(size)
  return found


def test_optimizer_mode_reduce_scatters_and_never_all_reduces_the_gradient():
  num_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      pieces("replicated").init_state).params))
  replicated = collectives(pieces("replicated"))
  assert sum(replicated["all-reduce"]) >= num_params  # the whole gradient
  assert not replicated.get("reduce-scatter")
  sharded = collectives(pieces("optimizer"))
  # Each device's 1/8 of the gradient comes out of a reduce-scatter, the new parameters out of
  # an all-gather; what is still all-reduced (BatchNorm statistics, norms, metrics) is small.
  assert sum(sharded["reduce-scatter"]) >= 0.9 * num_params / 8  # XLA may all-reduce a tiny one
  assert sum(sharded["all-gather"]) >= num_params
  assert sum(sharded["all-reduce"]) < num_params / 20, sharded["all-reduce"]


def save(state, directory, step=3):
  ckpts = checkpoint.Checkpoints(directory, config_lib.to_json(config_lib.defaults()),
                                 async_save=False)
  ckpts.save(step, state, {"data": {"position": 48}}, wait=True)
  return ckpts


@pytest.mark.parametrize("source, target", [
    ("fsdp", "replicated"), ("replicated", "fsdp"), ("optimizer", "fsdp"), ("fsdp", "optimizer")])
def test_checkpoints_restore_across_modes_and_topologies(tmp_path, source, target):
  trained_state, _ = trained(source)
  p = pieces(source)
  state = p.runner.from_global_state(jax.device_put(trained_state, jax.tree.map(
      lambda x: x.sharding, p.init_state())))
  ckpts = save(state, str(tmp_path))
  for num_devices in (8, 1, 4):
    q = pieces(target, num_devices=num_devices)
    restored, meta = ckpts.restore_latest(q.runner.global_state(q.init_state()))
    assert meta["data"] == {"position": 48}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
                 jax.device_get(trained_state))
    expected = q.spec.layout.specs(jax.eval_shape(q.init_state))
    assert jax.tree.map(lambda x: x.sharding.spec, restored) == expected
  assert checkpoint.read(ckpts.path(3))[0]["params"].keys() == trained_state.params.keys()


@pytest.mark.parametrize("overrides, message", [
    (["parallelism=pmap", "state_sharding=fsdp"], "config key 'state_sharding': 'fsdp' needs "
                                                  "parallelism='shard_map'"),
    (["state_sharding=zero3"], "config key 'state_sharding': unknown 'zero3'; known: "
                               "replicated, optimizer, fsdp"),
    (["state_sharding=optimizer", "param_gather_dtype=bfloat16"],
     "config key 'param_gather_dtype': parameters are gathered in another dtype only with "
     "state_sharding='fsdp'"),
])
def test_bad_sharding_config_is_one_line(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    tiny_pieces(None, *overrides)


def test_fsdp_gathers_in_bf16_with_the_same_result_in_bf16_compute():
  reference, _ = trained("fsdp", "precision=bf16")
  state, _ = trained("fsdp", "precision=bf16", "param_gather_dtype=bfloat16")
  jax.tree.map(np.testing.assert_array_equal, state.params, reference.params)


def test_a_resumed_run_may_change_the_mode(tmp_path):
  """`state_sharding` chooses how a run executes, not what it computes."""
  workdir = str(tmp_path)
  base = ["dataset=synthetic", "image_size=8", "synthetic_num_train_examples=64",
          "synthetic_num_eval_examples=16", "eval_batch_size=16", "global_batch_size=16",
          "progress_bar=off", "checkpoint_async=False", "checkpoint_every_steps=2",
          "compilation_cache_dir="]
  quickstart = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quickstart.py")
  train.run(config_lib.load(quickstart, [*base, "num_train_steps=2"]), workdir)
  train.run(config_lib.load(quickstart, [*base, "num_train_steps=2",
                                         "state_sharding=fsdp"]), workdir)  # nothing to do
  with pytest.raises(config_lib.ConfigError, match="keys differ: num_train_steps"):
    train.run(config_lib.load(quickstart, [*base, "num_train_steps=4"]), workdir)
