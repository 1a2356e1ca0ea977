"""Fault injection: every fault of docs/faults.md is one line, a documented exit status, and
nothing lost.

Damaged checkpoint bytes, two runs on one workdir, a refused run beside old checkpoints, values
that pass type checks and ruin a run, SIGTERM during the final eval, unusable workdirs (a file,
a read-only mount, a full disk), broken config files and damaged dataset files. The runs are
resnet8 on 8x8 synthetic images (a few steps each); the mounts need root and are skipped
without it. Time budget: about 90 s on a 2-core CPU.
"""
import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxscale import checkpoint, errors, train
from conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TINY = ["dataset=synthetic", "image_size=8", "synthetic_num_train_examples=64",
        "synthetic_num_eval_examples=32", "synthetic_num_classes=4", "eval_batch_size=16",
        "global_batch_size=16", "progress_bar=off", "checkpoint_async=False",
        "log_every_steps=1", "compilation_cache_dir=", "checkpoint_keep=10"]
IDX_DIR = "/usr/share/datasets/fashion-mnist"
TIMEOUT_S = 120


def args(workdir, *overrides):
  return ["--config", QUICKSTART, "--workdir", str(workdir),
          *[f"--config.{o}" for o in [*TINY, *overrides]]]


def start(workdir, *overrides, log):
  """`jaxscale-train` in its own process, stdout and stderr into `log`."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  with open(log, "w") as out:
    return subprocess.Popen([sys.executable, "-m", "jaxscale.train", *args(workdir, *overrides)],
                            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def finish(proc, log) -> tuple[int, str]:
  """(exit status, whole output) of a process from `start`, killed at the timeout."""
  try:
    code = proc.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f"the run timed out:\n{open(log).read()[-3000:]}")
  with open(log) as f:
    return code, f.read()


def wait_for(condition, proc, what):
  deadline = time.monotonic() + TIMEOUT_S
  while not condition():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"the run ended or timed out before {what}")
    time.sleep(0.002)


def train_steps(workdir) -> list[int]:
  from test_evaluation import events
  path = os.path.join(workdir, "metrics.jsonl")
  return [e["step"] for e in events(workdir, "train")] if os.path.exists(path) else []


def snapshot(directory) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


def assert_one_line(line, code, expected_code, *parts):
  assert code == expected_code, line
  assert line.startswith("jaxscale-train: error: "), line
  for part in parts:
    assert part in line, line
  assert "<bound method" not in line and "Traceback" not in line


# Damaged checkpoints.

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 2, 4 and 6."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  train.main(args(workdir, "num_train_steps=6", "checkpoint_every_steps=2"))
  return workdir


def largest_data_file(step_dir) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  return max(files, key=os.path.getsize)


def flip_every_97th_byte(path):
  data = bytearray(open(path, "rb").read())
  data[::97] = bytes(b ^ 0xFF for b in data[::97])
  open(path, "wb").write(bytes(data))


def random_bytes(path):
  size = os.path.getsize(path)
  open(path, "wb").write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())


@pytest.mark.parametrize("damage", [flip_every_97th_byte, random_bytes])
def test_damaged_checkpoint_is_one_line_naming_it_and_the_previous_one(
    tmp_path, capsys, finished, damage):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  latest = os.path.join(workdir, "checkpoints", "6")
  damage(largest_data_file(latest))
  before = snapshot(workdir)
  code, line = run_main(args(workdir, "num_train_steps=6", "checkpoint_every_steps=2"), capsys)
  assert_one_line(line, code, errors.EXIT_IO, f"checkpoint {latest}", "step 4",
                  "--config.checkpoint_skip_damaged=True")
  assert snapshot(workdir) == before  # nothing deleted, nothing written
  with pytest.raises((checkpoint.DamagedCheckpoint, checkpoint.CheckpointIOError),
                     match=f"checkpoint {latest}"):
    checkpoint.read(latest)


def test_skip_damaged_moves_it_aside_and_resumes_from_the_previous_one(tmp_path, finished):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  latest = os.path.join(workdir, "checkpoints", "6")
  damaged_file = largest_data_file(latest)
  flip_every_97th_byte(damaged_file)
  damaged = open(damaged_file, "rb").read()
  train.main(args(workdir, "num_train_steps=6", "checkpoint_every_steps=2",
                  "checkpoint_skip_damaged=True"))
  aside = os.path.join(workdir, "damaged", "6")
  assert open(damaged_file.replace(latest, aside), "rb").read() == damaged
  assert train_steps(workdir)[-2:] == [5, 6]  # retrained from step 4
  state, _ = checkpoint.read(os.path.join(workdir, "checkpoints", "6"))
  expected, _ = checkpoint.read(os.path.join(finished, "checkpoints", "6"))
  jax.tree.map(np.testing.assert_array_equal, state, expected)


# One run per workdir.

def test_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  overrides = ["num_train_steps=40", "checkpoint_every_steps=2"]
  first = start(workdir, *overrides, log=str(tmp_path / "first.log"))
  wait_for(lambda: len(train_steps(workdir)) >= 1, first, "the first train step")
  first.send_signal(signal.SIGSTOP)  # holds the lock, makes no progress
  try:
    before = snapshot(workdir)
    code, line = run_main(args(workdir, *overrides), capsys)
    assert_one_line(line, code, errors.EXIT_USAGE,
                    f"in use by a run of host {socket.gethostname()} pid {first.pid}")
    assert snapshot(workdir) == before
  finally:
    first.kill()
    first.wait()
  train.main(args(workdir, *overrides))
  err = capsys.readouterr().err
  assert f"taking over the workdir lock left by host {socket.gethostname()} pid {first.pid}" in err
  assert train_steps(workdir)[-1] == 40
  assert open(os.path.join(workdir, ".lock")).read() == ""  # released at the end


def test_refused_run_writes_no_config(tmp_path, capsys, finished):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  os.remove(os.path.join(workdir, "config.json"))
  code, line = run_main(args(workdir, "num_train_steps=6", "checkpoint_every_steps=2",
                             "model=resnet18"), capsys)
  assert_one_line(line, code, errors.EXIT_USAGE, "was written by a different config (keys "
                  "differ: model)")
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  train.main(args(workdir, "num_train_steps=6", "checkpoint_every_steps=2"))  # the original
  assert os.path.exists(os.path.join(workdir, "config.json"))


# Values that pass their type and ruin the run.

@pytest.mark.parametrize("override, message", [
    ("learning_rate=1e999", "config key 'learning_rate' must be finite, got inf"),
    ("optimizer.weight_decay=nan", "config key 'optimizer.weight_decay' must be finite, got nan"),
    ("global_batch_size=128", "config key 'global_batch_size': a batch of 128 is larger than "
                              "the 64 training examples"),
])
def test_out_of_range_values_are_refused_at_start(tmp_path, capsys, override, message):
  workdir = tmp_path / "run"
  code, line = run_main(args(workdir, override), capsys)
  assert_one_line(line, code, errors.EXIT_USAGE, message)
  assert not workdir.exists()


# Signals during the final eval.

def test_sigterm_during_the_final_eval_exits_75_and_a_rerun_only_evaluates(tmp_path):
  workdir = str(tmp_path / "run")
  overrides = ["num_train_steps=2", "synthetic_num_eval_examples=4096", "eval_batch_size=8",
               "precise_bn_batches=0"]
  log = str(tmp_path / "run.log")
  proc = start(workdir, *overrides, log=log)
  wait_for(lambda: 2 in train_steps(workdir), proc, "the last step")  # then the eval starts
  proc.send_signal(signal.SIGTERM)
  code, output = finish(proc, log)
  assert code == errors.EXIT_PREEMPTED, output[-2000:]
  assert output.strip().splitlines()[-1] == (
      f"jaxscale-train: preempted: saved step 2 to {workdir}/checkpoints/2; rerun the same "
      f"command to evaluate")
  steps = train_steps(workdir)
  train.main(args(workdir, *overrides))
  from test_evaluation import events
  assert train_steps(workdir) == steps  # nothing trained again
  assert events(workdir, "eval")[-1]["step"] == 2


# Workdirs that cannot be used.

def mount_tmpfs(path, *options):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")


def remount(path, *options):
  subprocess.run(["mount", "-o", ",".join(["remount", *options]), str(path)], check=True)


@pytest.fixture
def mounts():
  mounted = []
  yield mounted
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_file_for_workdir_or_above_it(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("x")
  code, line = run_main(args(path), capsys)
  assert_one_line(line, code, errors.EXIT_IO, f"workdir {str(path)!r} is a file")
  code, line = run_main(args(path / "run"), capsys)
  assert_one_line(line, code, errors.EXIT_IO, f"{str(path)!r} is a file")
  assert path.read_text() == "x"


def test_read_only_workdirs(tmp_path, capsys, mounts):
  read_only = tmp_path / "ro"
  mount_tmpfs(read_only, "size=1m", "ro")
  mounts.append(read_only)
  code, line = run_main(args(read_only / "run"), capsys)
  assert_one_line(line, code, errors.EXIT_IO, "is not writable", "read-only")
  finished = tmp_path / "finished"
  mount_tmpfs(finished, "size=8m")
  mounts.append(finished)
  train.main(args(finished, "num_train_steps=1"))
  remount(finished, "ro")
  before = snapshot(finished)
  code, line = run_main(args(finished, "num_train_steps=1"), capsys)
  assert_one_line(line, code, errors.EXIT_IO, "is not writable")
  assert snapshot(finished) == before


@pytest.mark.parametrize("asynchronous", [True, False])
def test_full_disk_during_a_checkpoint_names_the_step_and_a_rerun_resumes(
    tmp_path, mounts, asynchronous):
  workdir = tmp_path / "small"
  mount_tmpfs(workdir, "size=1200k")  # one checkpoint (about 0.7 MB) fits, not two
  mounts.append(workdir)
  overrides = ["num_train_steps=3", "checkpoint_every_steps=1",
               f"checkpoint_async={asynchronous}"]
  log = str(tmp_path / "run.log")
  code, output = finish(start(workdir, *overrides, log=log), log)
  last = output.strip().splitlines()[-1]
  assert_one_line(last, code, errors.EXIT_IO, f"checkpoint {workdir}/checkpoints/2 could not be "
                  f"written", "No space left on device", "the latest complete checkpoint is step 1")
  assert "Traceback" not in output
  remount(workdir, "size=16m")
  train.main(args(workdir, *overrides))
  assert train_steps(workdir)[-2:] == [2, 3]


# Config files that do not load.

@pytest.mark.parametrize("text, message", [
    ("def get_config(:\n", "syntax error at line 1"),
    ("import no_such_module_here\n", "failed to load: ModuleNotFoundError"),
    ("def get_config():\n  return None\n", "get_config() returned a NoneType"),
])
def test_broken_config_file(tmp_path, capsys, text, message):
  path = tmp_path / "config.py"
  path.write_text(text)
  code, line = run_main(["--config", str(path), "--workdir", str(tmp_path / "run")], capsys)
  assert_one_line(line, code, errors.EXIT_USAGE, f"config file {str(path)!r}", message)
  assert not (tmp_path / "run").exists()


# Damaged or missing dataset files.

def truncate_gz(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def truncate_plain(path):
  with gzip.open(path) as f:
    data = f.read()
  os.remove(path)
  path = path[:-3]
  open(path, "wb").write(data[:len(data) - 100])
  return path


@pytest.mark.parametrize("damage, why", [
    (truncate_gz, "broken gzip stream"),
    (random_bytes, "broken gzip stream"),
    (truncate_plain, "bytes of data for shape (10000,)"),
])
def test_damaged_idx_file_is_one_line_naming_it(tmp_path, capsys, damage, why):
  idx_dir = tmp_path / "idx"
  shutil.copytree(IDX_DIR, idx_dir)
  path = str(idx_dir / "t10k-labels-idx1-ubyte.gz")
  path = damage(path) or path
  code, line = run_main(args(tmp_path / "run", "dataset=fashion_mnist", "image_size=28",
                             f"fashion_mnist_idx_dir={idx_dir}", f"data_dir={tmp_path / 'tfds'}"),
                        capsys)
  assert_one_line(line, code, errors.EXIT_IO, f"Fashion-MNIST file {path} is damaged", why,
                  "fashion_mnist_idx_dir")


def test_no_dataset_files_offline_is_one_line_at_once(tmp_path, capsys, monkeypatch):
  from jaxscale.data import sources
  monkeypatch.setattr(sources, "network_reachable", lambda *a, **k: False)
  (tmp_path / "idx").mkdir()
  start_time = time.monotonic()
  code, line = run_main(args(tmp_path / "run", "dataset=fashion_mnist", "image_size=28",
                             f"fashion_mnist_idx_dir={tmp_path / 'idx'}",
                             f"data_dir={tmp_path / 'tfds'}"), capsys)
  assert_one_line(line, code, errors.EXIT_IO, "fashion_mnist_idx_dir", "data_dir", "no network")
  assert time.monotonic() - start_time < 30


def test_missing_eval_split_names_the_key(tmp_path, capsys, tfds_dir):
  code, line = run_main(args(tmp_path / "run", "dataset=fashion_mnist", "image_size=28",
                             f"data_dir={tfds_dir}", "eval_split=validation"), capsys)
  assert_one_line(line, code, errors.EXIT_USAGE, "config key 'eval_split'", "'validation'")
