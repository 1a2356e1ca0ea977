"""Checkpoints in one process: elastic restore, retention, async saves, integrity errors, the
preemption flag.

Time budget: 25 s on a 2-core CPU. tests/test_resume.py runs the trainer itself (kill, resume,
preemption, processes, export).
"""
import hashlib
import json
import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxscale import checkpoint, export, mesh as mesh_lib, preemption
from jaxscale.config import ConfigError, defaults, to_json, validate
from conftest import tiny_pieces

IMAGE_SHAPE = (8, 8, 3)
CONFIG_JSON = to_json(defaults())


class TinyNet(nn.Module):
  """Conv, BatchNorm, Dense: a TrainState with every kind of leaf that compiles in a blink."""
  width: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name="data" if train else None)(x)
    return nn.Dense(10)(nn.relu(x).mean((1, 2)))


def make_runner(parallelism, devices, width=4):
  return tiny_pieces(devices, f"parallelism={parallelism}", model=TinyNet(width),
                     shape=IMAGE_SHAPE).runner


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def batch(seed=0, size=16):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (size, *IMAGE_SHAPE), dtype=np.uint8),
          "label": rng.integers(0, 10, size).astype(np.int32)}


def snapshot(directory):
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def trained():
  """An 8-device shard_map state after two steps, saved as checkpoint 2 (sync)."""
  runner = make_runner("shard_map", jax.devices())
  state = runner.init_state(jax.random.key(0))
  for seed in range(2):
    state, _ = runner.train_step(state, runner.put_batch(batch(seed)), 0.1)
  return runner, state


def test_restore_onto_another_topology_and_parallelism(tmp_path, trained):
  runner8, state8 = trained
  ckpts = checkpoint.Checkpoints(str(tmp_path), CONFIG_JSON, async_save=False)
  ckpts.save(2, runner8.global_state(state8), {"data": {"position": 32}}, wait=True)

  # 8 devices -> 1 device: exact values, placed on the 1-device mesh.
  runner1 = make_runner("shard_map", jax.devices()[:1])
  target = runner1.init_state(jax.random.key(1))  # other values: the restore must replace them
  restored, meta = ckpts.restore_latest(runner1.global_state(target))
  state1 = runner1.from_global_state(restored)
  assert meta["step"] == 2 and meta["data"] == {"position": 32}
  assert_trees_equal(state1, runner8.global_state(state8))
  assert {d.id for x in jax.tree.leaves(state1) for d in x.sharding.device_set} == {0}

  # Training continues on 1 device as it would have on 8 (same global batch); the steps donate
  # their input, so they get copies.
  after8, _ = runner8.train_step(jax.tree.map(jnp.copy, state8), runner8.put_batch(batch(2)), 0.1)
  after1, _ = runner1.train_step(jax.tree.map(jnp.copy, state1), runner1.put_batch(batch(2)), 0.1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               host(after1.params), host(after8.params))

  # shard_map checkpoint -> pmap (stacked copies) -> its own checkpoint -> shard_map again.
  pmap8 = make_runner("pmap", jax.devices())
  stacked = pmap8.init_state(jax.random.key(1))
  restored, _ = ckpts.restore(2, pmap8.global_state(stacked))
  stacked = pmap8.from_global_state(restored)
  assert jax.tree.leaves(stacked)[0].shape[0] == 8
  assert_trees_equal(pmap8.global_state(stacked), state1)
  ckpts.save(3, pmap8.global_state(stacked), {"data": {"position": 48}}, wait=True)
  back, meta = ckpts.restore_latest(runner1.global_state(target))
  assert meta["step"] == 3
  assert_trees_equal(back, state1)


def test_keeps_the_last_n_and_every_kth(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), CONFIG_JSON, every_steps=1, keep=2,
                                 keep_every_steps=4)
  state = {"w": jnp.arange(4.0)}
  for step in range(1, 11):
    assert ckpts.is_due(step)
    ckpts.save(step, jax.tree.map(lambda x: x * step, state), {})
  ckpts.close()
  expected = sorted({s for s in range(1, 11) if s % 4 == 0} | {9, 10})
  assert sorted(int(name) for name in os.listdir(tmp_path)) == expected
  restored, meta = ckpts.restore_latest(state)
  np.testing.assert_array_equal(restored["w"], np.arange(4.0) * 10)
  assert not checkpoint.Checkpoints(str(tmp_path), CONFIG_JSON, every_steps=0).is_due(10)


def test_arrays_are_written_uncompressed(tmp_path):
  """With orbax's default zstd these weights took 971,770 bytes instead of 1,048,576."""
  weights = np.random.default_rng(0).normal(0, 0.02, (256, 1024)).astype(np.float32)
  ckpts = checkpoint.Checkpoints(str(tmp_path), CONFIG_JSON, async_save=False)
  ckpts.save(1, {"w": jnp.asarray(weights)}, {})
  ckpts.close()
  on_disk = sum(os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(tmp_path / "1" / "state") for f in files)
  assert on_disk >= weights.nbytes


def test_async_save_writes_the_state_of_its_step(tmp_path, trained, monkeypatch):
  """The steps after an async save donate the state it was given; the checkpoint is unchanged."""
  runner, state8 = trained
  state = jax.tree.map(jnp.copy, state8)  # the steps donate it: the fixture's state stays
  ckpts = checkpoint.Checkpoints(str(tmp_path), CONFIG_JSON)
  release, orbax_save = threading.Event(), ckpts._manager.save

  def late_save(*args, **kwargs):  # orbax's save starts after the steps below, as a slow one would
    assert release.wait(60)
    return orbax_save(*args, **kwargs)

  monkeypatch.setattr(ckpts._manager, "save", late_save)
  given = runner.global_state(state)
  expected = host(jax.tree.map(jnp.copy, given))  # host views of `given` would stop donation
  ckpts.save(2, given, {"data": {"position": 32}})
  for seed in range(3):
    state, _ = runner.train_step(state, runner.put_batch(batch(seed)), 0.1)
  assert all(x.is_deleted() for x in jax.tree.leaves(given))  # donated to the steps
  release.set()
  ckpts.wait()
  restored, meta = ckpts.restore(2, runner.global_state(state))
  assert meta["step"] == 2 and meta["data"] == {"position": 32}
  assert_trees_equal(restored, expected)
  assert not np.array_equal(host(state.params)["Dense_0"]["kernel"],
                            expected.params["Dense_0"]["kernel"])  # the steps changed it
  ckpts.close()


def test_a_failed_background_save_is_raised_by_the_next_call(tmp_path, monkeypatch):
  ckpts = checkpoint.Checkpoints(str(tmp_path), CONFIG_JSON)
  state = {"w": jnp.arange(4.0)}
  orbax_save = ckpts._manager.save

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  def failed(step, kept="no earlier checkpoint exists"):
    return (rf"^checkpoint {tmp_path}/{step} could not be written \(OSError: \[Errno 28\] No "
            rf"space left on device\); {kept}$")

  monkeypatch.setattr(ckpts._manager, "save", full_disk)
  ckpts.save(1, state, {})
  with pytest.raises(checkpoint.CheckpointIOError, match=failed(1)):
    ckpts.wait()
  ckpts.wait()  # raised once
  ckpts.save(2, state, {})
  with pytest.raises(checkpoint.CheckpointIOError, match=failed(2)):
    ckpts.save(3, state, {})  # raised before step 3 is started
  monkeypatch.setattr(ckpts._manager, "save", orbax_save)
  ckpts.save(2, state, {}, wait=True)  # the failed step can be saved again
  assert ckpts.latest_step() == 2
  monkeypatch.setattr(ckpts._manager, "save", full_disk)
  ckpts.save(4, state, {})
  with pytest.raises(checkpoint.CheckpointIOError,
                     match=failed(4, "the latest complete checkpoint is step 2")):
    ckpts.close()
  assert sorted(os.listdir(tmp_path)) == ["2"]


def test_mismatched_model_or_config_is_one_clear_error(tmp_path, trained):
  runner8, state8 = trained
  ckpts = checkpoint.Checkpoints(str(tmp_path), CONFIG_JSON, async_save=False)
  for step in (1, 2):
    ckpts.save(step, runner8.global_state(state8), {}, wait=True)
  before = snapshot(tmp_path)
  path = os.path.join(str(tmp_path), "2")

  other = make_runner("shard_map", jax.devices()[:1], width=8)
  with pytest.raises(checkpoint.CheckpointError) as error:
    ckpts.restore_latest(other.global_state(other.init_state(jax.random.key(0))))
  message = str(error.value)
  assert message.startswith(f"checkpoint {path} does not match this run's state: ")
  assert ("differ: batch_stats/BatchNorm_0/mean (checkpoint (4,) float32, run (8,) float32)"
          in message)
  assert "\n" not in message

  changed = defaults()
  changed.model = "resnet20"  # the trainer's config check, before any array is compared
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoint .*/2 was written by a different config \(keys differ: "
                           r"model\)"):
    checkpoint.Checkpoints(str(tmp_path), to_json(changed)).restore_latest(state8)
  assert snapshot(tmp_path) == before


def test_missing_files_are_one_clear_error_and_older_checkpoints_stay(tmp_path, trained):
  runner8, state8 = trained
  ckpts = checkpoint.Checkpoints(str(tmp_path), CONFIG_JSON, async_save=False)
  for step in (1, 2):
    ckpts.save(step, runner8.global_state(state8), {}, wait=True)
  before = {k: v for k, v in snapshot(tmp_path).items() if k.startswith("1/")}
  shutil.rmtree(tmp_path / "2" / "state" / "d")  # the array data of step 2 (the ocdbt root)

  target = runner8.global_state(runner8.init_state(jax.random.key(1)))
  with pytest.raises(checkpoint.CheckpointError) as error:
    ckpts.restore_latest(target)
  assert str(error.value).startswith(f"checkpoint {tmp_path / '2'} cannot be read (")
  assert "\n" not in str(error.value)
  assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith("1/")} == before
  restored, _ = ckpts.restore(1, target)
  assert_trees_equal(restored, state8)


def test_export_without_a_checkpoint_is_one_clear_error(tmp_path, capsys):
  os.makedirs(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp")  # an uncommitted write
  with pytest.raises(SystemExit) as exit_info:
    export.main(["--workdir", str(tmp_path)])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip() == (
      f"jaxscale-export: error: no complete checkpoint in {tmp_path / 'checkpoints'}")


def test_preemption_flag_is_read_one_boundary_later(trained):
  previous = signal.getsignal(signal.SIGTERM)
  watch = preemption.PreemptionWatch(mesh_lib.create_mesh("data"))
  try:
    assert not watch.stop_requested()
    assert not watch.stop_requested()  # the answer of the boundary before: no signal yet
    os.kill(os.getpid(), signal.SIGTERM)
    assert not watch.stop_requested()  # dispatched before the signal
    assert watch.stop_requested()
    assert watch.stop_requested(now=True)
  finally:
    watch.close()
  assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("key", ["checkpoint_every_steps", "checkpoint_keep",
                                 "checkpoint_keep_every_steps"])
def test_negative_checkpoint_keys_are_refused(key):
  config = defaults()
  config.dataset = "synthetic"
  config[key] = -1
  with pytest.raises(ConfigError, match=f"config key '{key}' must be >= 0, got -1"):
    validate(config, 8)
