"""The trainer end to end: bad input is refused up front, a short run learns and writes its outputs."""
import json
import os
import subprocess
import sys

import pytest

from jaxscale import train
from conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")


@pytest.mark.parametrize("override, message", [
    ("--config.not_a_key=1", "unknown config key 'not_a_key'"),
    ("--config.optimizer.nope=1", "unknown config key 'optimizer.nope'"),
    ("--config.global_batch_size=100",
     "config key 'global_batch_size': 100 is not divisible by the 8 data-parallel devices"),
    ("--config.model=resnet7", "config key 'model': unknown model 'resnet7'; known: "),
    ("--config.dataset=no_such_set", "config key 'dataset': unknown dataset 'no_such_set'"),
    ("--config.optimizer.name=adagrad",
     "unknown optimizer 'adagrad' (config key optimizer.name); known: adamw, lamb, lars, sgd"),
    ("--config.global_batch_size=0", "config key 'global_batch_size' must be positive, got 0"),
    ("--config.num_epochs=-1", "config key 'num_epochs' must be positive, got -1.0"),
    ("--config.eval_batch_size=-8", "config key 'eval_batch_size' must be positive, got -8"),
    ("--config.parallelism=xmap", "config key 'parallelism': unknown 'xmap'"),
    ("--config.global_batch_size=big", "config key 'global_batch_size' must be of type int"),
    ("--config.mesh=3x3", "config key 'mesh': '3x3' needs 9 devices, there are 8"),
    ("--config.batch_schedule=0:128,0:256", "config key 'batch_schedule': stage start epochs"),
    ("--config.batch_schedule=0:100", "batch size 100 of stage '0:100' is not a positive"),
    ("--config.profile_steps=5:2", "config key 'profile_steps': '5:2' is not 'A:B'"),
    ("--config.precise_bn_batches=-1", "config key 'precise_bn_batches' must be >= 0, got -1"),
    ("--config.precise_bn_batches=2.5", "config key 'precise_bn_batches' must be of type int"),
    ("--config.bn_momentum_epochs=-0.5", "config key 'bn_momentum_epochs' must be >= 0, got -0.5"),
])
def test_bad_config_is_one_line_error_and_writes_nothing(tmp_path, capsys, override, message):
  workdir = tmp_path / "run"
  code, last_line = run_main(["--config", QUICKSTART, "--workdir", str(workdir), override], capsys)
  assert code == 2
  assert last_line.startswith("jaxscale-train: error: ") and message in last_line
  assert not workdir.exists()


def test_unknown_key_in_config_file(tmp_path, capsys):
  path = tmp_path / "bad.py"
  path.write_text("from jaxscale.config import defaults\n"
                  "def get_config():\n  c = defaults()\n  c.lerning_rate = 0.1\n  return c\n")
  code, line = run_main(["--config", str(path), "--workdir", str(tmp_path / "w")], capsys)
  assert code == 2 and f"unknown config key 'lerning_rate' in {path}" in line


def test_missing_config_file(tmp_path, capsys):
  code, line = run_main(["--config", str(tmp_path / "nope.py"), "--workdir", "x"], capsys)
  assert code == 2 and "nope.py' does not exist" in line


def test_short_run_learns_and_writes_outputs(tmp_path, tfds_dir):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "jaxscale.train", f"--config={QUICKSTART}",
          f"--workdir={workdir}", f"--config.data_dir={tfds_dir}", "--config.num_train_steps=120",
          "--config.log_every_steps=40", "--config.lr_schedule.warmup_epochs=0.1"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_events = [e for e in events if e["split"] == "train"]
  assert [e["step"] for e in train_events] == [40, 80, 120]
  for event in events:
    for field in ("step", "epoch", "split", "loss", "accuracy", "global_batch_size",
                  "learning_rate", "examples_per_sec", "wall_time"):
      assert field in event, field
  final = events[-1]
  assert final["split"] == "eval" and final["num_examples"] == 10000
  assert final["accuracy"] > 0.5, final  # chance is 0.1
  assert train_events[-1]["loss"] < train_events[0]["loss"]
  assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 120
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  summary = proc.stderr.strip().splitlines()[-1]
  assert "eval accuracy" in summary and "wall time" in summary
  assert "tensorflow" not in proc.stderr.lower() or "No module" not in proc.stderr

  # The same workdir with a different config is refused, and nothing in it changes.
  before = (workdir / "metrics.jsonl").read_text()
  proc = subprocess.run(args + ["--config.learning_rate=0.3"], env=env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 2
  assert "holds a run of a different config (keys differ: learning_rate)" in proc.stderr
  assert (workdir / "metrics.jsonl").read_text() == before


def test_profile_steps_writes_a_trace(tmp_path):
  from jaxscale import config as config_lib
  config = config_lib.load(QUICKSTART, [
      "dataset=synthetic", "image_size=8", "synthetic_num_train_examples=64",
      "synthetic_num_eval_examples=16", "eval_batch_size=16", "global_batch_size=16",
      "num_train_steps=4", "profile_steps=1:3", "progress_bar=off"])
  train.run(config, str(tmp_path))
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith((".xplane.pb", ".trace.json.gz")) for f in traces), traces


def test_pmap_needs_the_1d_mesh(tmp_path, capsys):
  code, line = run_main(["--config", QUICKSTART, "--workdir", str(tmp_path / "w"),
                         "--config.parallelism=pmap", "--config.mesh=2x4"], capsys)
  assert code == 2 and "config key 'mesh': parallelism='pmap' supports only mesh='data'" in line
  assert not (tmp_path / "w").exists()


def test_changed_keys_tolerates_keys_added_later_at_their_default():
  from jaxscale import config as config_lib
  new = json.loads(config_lib.to_json(config_lib.defaults()))
  old = json.loads(config_lib.to_json(config_lib.defaults()))
  del old["grad_accum_steps"], old["optimizer"]["trust_coefficient"]  # a workdir from before
  assert config_lib.changed_keys(old, new) == []
  new["grad_accum_steps"], new["optimizer"]["trust_coefficient"] = 2, 0.01  # not the defaults
  new["learning_rate"] = 0.5
  assert config_lib.changed_keys(old, new) == [
      "grad_accum_steps", "learning_rate", "optimizer.trust_coefficient"]
