"""Evaluation during training, time to target accuracy, the best checkpoint, jaxscale-plot.

Time budget: about 90 s on a 2-core CPU (resnet8 on 8x8 synthetic images).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxscale import checkpoint, config as config_lib, evaluation, export, plot, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TINY = ["dataset=synthetic", "image_size=8", "synthetic_num_train_examples=64",
        "synthetic_num_eval_examples=32", "synthetic_num_classes=4", "eval_batch_size=16",
        "global_batch_size=16", "progress_bar=off", "checkpoint_async=False",
        "log_every_steps=1", "compilation_cache_dir="]


def tiny(*overrides):
  return config_lib.load(QUICKSTART, [*TINY, *overrides])


def events(workdir, split=None):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    out = [json.loads(line) for line in f if line.endswith("}\n")]
  return [e for e in out if split is None or e["split"] == split]


def test_cadence_counts_examples_so_it_agrees_with_batch_growth():
  evals = evaluation.Evals(every_examples=0.5 * 64)  # every half epoch of 64 examples
  # Batches of 16 for an epoch, then 32: the stream's positions after each step.
  positions = [16, 32, 48, 64, 96, 128, 160]
  due = [step for step, (before, after) in enumerate(zip([0] + positions, positions), 1)
         if evals.due(step, after, before, final=False)]
  assert due == [2, 4, 5, 6, 7]  # at 32, 64, 96, 128 and 160 examples
  steps = evaluation.Evals(every_steps=3)
  assert [s for s in range(1, 8) if steps.due(s, 0, 0, final=s == 7)] == [3, 6, 7]
  steps.last_step = 7
  assert not steps.due(7, 0, 0, final=True)  # never twice at one step


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("plain"))
  return workdir, train.run(tiny("num_train_steps=8"), workdir)


def test_periodic_evals_change_nothing_in_training(plain_run, tmp_path):
  workdir, plain = plain_run
  result = train.run(tiny("num_train_steps=8", "eval_every_epochs=0.5"), str(tmp_path))
  evals = events(tmp_path, "eval")
  assert [e["step"] for e in evals] == [2, 4, 6, 8]  # 32 examples apart, and the last step
  for e in evals:
    assert e["num_examples"] == 32 and e["global_batch_size"] == 16
    assert e["epoch"] == e["step"] * 16 / 64
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result["state"].params),
               jax.device_get(plain["state"].params))
  assert [e["loss"] for e in events(tmp_path, "train")] == [
      e["loss"] for e in events(workdir, "train")]
  assert result["accuracy"] == plain["accuracy"]


def test_evals_with_a_batch_schedule_fall_on_example_counts(tmp_path):
  train.run(tiny("num_epochs=2.5", "batch_schedule=0:16,1:32", "eval_every_epochs=0.5"),
            str(tmp_path))
  evals = events(tmp_path, "eval")
  assert [(e["step"], e["epoch"], e["global_batch_size"]) for e in evals] == [
      (2, 0.5, 16), (4, 1.0, 16), (5, 1.5, 32), (6, 2.0, 32), (7, 2.5, 32)]


def test_target_reached_stops_the_run_and_a_rerun_does_not_train(tmp_path, capsys):
  # Chance is 0.25 on 4 classes: the first eval at or above 0.01 reaches the target.
  config = tiny("num_train_steps=20", "eval_every_steps=2", "target_accuracy=0.01",
                "checkpoint_every_steps=100")
  result = train.run(config, str(tmp_path))
  target = events(tmp_path, "eval")[-1]
  assert target["step"] == 2 and target["target_reached"] is True
  assert target["steps_to_target"] == 2 and target["epochs_to_target"] == 0.5
  assert 0 < target["time_to_target_without_eval"] < target["time_to_target"]
  assert max(e["step"] for e in events(tmp_path, "train")) == 2  # stopped at the target
  assert result["step"] == 2 and checkpoint.latest_step_dir(str(tmp_path)).endswith("/2")
  assert "target 0.01 reached at step 2 (epoch 0.50)" in capsys.readouterr().err
  before = events(tmp_path)
  again = train.run(config, str(tmp_path))
  assert events(tmp_path) == before  # nothing trained, nothing evaluated again
  assert again["time_to_target"] == target["time_to_target"]


def test_target_not_reached_is_reported(tmp_path, capsys):
  train.run(tiny("num_train_steps=4", "eval_every_steps=2", "target_accuracy=1.0"),
            str(tmp_path))
  final = events(tmp_path, "eval")[-1]
  assert final["step"] == 4 and final["target_reached"] is False
  assert "target 1 not reached, best " in capsys.readouterr().err


def test_best_checkpoint_is_kept_besides_the_last_and_exported(tmp_path, monkeypatch):
  accuracies = iter([0.5, 0.9, 0.6, 0.7, 0.4])
  real = evaluation.Evals.record

  def scripted(self, step, epoch, result, clock):  # evals with known accuracies
    return real(self, step, epoch, {**result, "accuracy": next(accuracies)}, clock)

  monkeypatch.setattr(evaluation.Evals, "record", scripted)
  train.run(tiny("num_train_steps=10", "eval_every_steps=2", "checkpoint_keep=2",
                 "checkpoint_every_steps=2", "checkpoint_keep_best=True"), str(tmp_path))
  kept = sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit())
  assert kept == [4, 8, 10]  # the best eval (0.9 at step 4) and the last two
  path = export.export(str(tmp_path), best=True, output=str(tmp_path / "best.msgpack"))
  assert export.load(path).step == 4
  assert export.load(export.export(str(tmp_path))).step == 10


def test_kill_right_after_an_eval_resumes_bit_identical(tmp_path, plain_run):
  overrides = ["num_train_steps=8", "eval_every_steps=4", "checkpoint_every_steps=4"]
  reference = str(tmp_path / "reference")
  train.run(tiny(*overrides), reference)
  workdir = str(tmp_path / "killed")
  command = [sys.executable, "-m", "jaxscale.train", f"--config={QUICKSTART}",
             f"--workdir={workdir}", *[f"--config.{o}" for o in [*TINY, *overrides]]]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not (os.path.exists(os.path.join(workdir, "metrics.jsonl"))
             and any(e["step"] == 4 for e in events(workdir, "eval"))):
    assert proc.poll() is None and time.monotonic() < deadline, "no eval at step 4"
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  train.run(tiny(*overrides), workdir)
  state, _ = checkpoint.read(os.path.join(workdir, "checkpoints", "8"))
  ref_state, _ = checkpoint.read(os.path.join(reference, "checkpoints", "8"))
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  assert events(workdir, "eval")[-1]["accuracy"] == events(reference, "eval")[-1]["accuracy"]


def test_plot_draws_one_and_two_runs_and_refuses_a_bad_workdir(plain_run, tmp_path, capsys):
  workdir, _ = plain_run
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other)
  for runs, x in (([workdir], "step"), ([workdir, other], "epoch")):
    out = str(tmp_path / f"{len(runs)}.png")
    plot.main([*runs, "--out", out, "--x", x])
    with open(out, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for bad, message in ((str(tmp_path / "nowhere"), "does not exist"),
                       (str(tmp_path), "has no metrics.jsonl")):
    with pytest.raises(SystemExit) as exit_info:
      plot.main([bad, "--out", str(tmp_path / "x.png")])
    line = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in line
    assert line.startswith("jaxscale-plot: error: workdir ") and message in line


def test_plot_without_matplotlib_names_the_extra(plain_run, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
  with pytest.raises(SystemExit):
    plot.main([plain_run[0], "--out", str(tmp_path / "x.png")])
  assert capsys.readouterr().err.strip() == (
      "jaxscale-plot: error: matplotlib is not installed; pip install 'jaxscale[plot]'")
