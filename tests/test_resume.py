"""The trainer killed, preempted and moved between topologies, in real processes on localhost.

Every run is `python -m jaxscale.train` (several processes find each other through
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID) on tiny synthetic data: resnet8,
8x8 images, 12 steps of 32, a checkpoint every 3 steps. The runs share a persistent compilation
cache, so only the first run of each topology compiles. Time budget: 75 s on a 2-core CPU.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxscale import checkpoint, config as config_lib, data, errors, export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
TOTAL_STEPS, BATCH = 12, 32
OVERRIDES = ["dataset=synthetic", "model=resnet8", "image_size=8",
             "synthetic_num_train_examples=256", "synthetic_num_eval_examples=64",
             f"global_batch_size={BATCH}", "eval_batch_size=32", f"num_train_steps={TOTAL_STEPS}",
             "checkpoint_every_steps=3", "log_every_steps=1", "progress_bar=off"]
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jit_cache"))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Run:
  """One trainer run: `processes` processes of `devices` CPU devices each, logs in files."""

  def __init__(self, workdir, jit_cache, *, processes=1, devices=4):
    self.workdir = str(workdir)
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=jit_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    command = [sys.executable, "-m", "jaxscale.train", f"--config={QUICKSTART}",
               f"--workdir={workdir}"] + [f"--config.{o}" for o in OVERRIDES]
    os.makedirs(workdir, exist_ok=True)
    self.events_before = len(train_events(workdir))
    port = free_port()
    self.procs, self.logs = [], []
    for i in range(processes):
      log = os.path.join(workdir, f"run{time.monotonic_ns()}.p{i}.log")
      if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(command, env=dict(env), cwd=ROOT, stdout=out,
                                           stderr=subprocess.STDOUT))
      self.logs.append(log)
    self.deadline = time.monotonic() + RUN_TIMEOUT_S

  def output(self, i=0) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def kill_all(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def wait_until(self, condition, what):
    """Polls `condition()` every few ms; fails if the run ends or times out first."""
    while not condition():
      if any(p.poll() is not None for p in self.procs) or time.monotonic() > self.deadline:
        self.kill_all()
        pytest.fail(f"the run ended or timed out before {what}:\n{self.output()[-3000:]}")
      time.sleep(0.005)

  def new_train_steps(self) -> list[int]:
    return [e["step"] for e in train_events(self.workdir)[self.events_before:]]

  def finish(self) -> list[int]:
    """Waits for every process; returns the exit codes."""
    try:
      return [p.wait(timeout=max(1, self.deadline - time.monotonic())) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill_all()
      pytest.fail(f"the run timed out:\n{self.output()[-3000:]}")


def events(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  return [json.loads(line) for line in lines if line.endswith("}")]  # skip a line being written


def train_events(workdir):
  return [e for e in events(workdir) if e["split"] == "train"]


def tmp_checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return [n for n in names if n.endswith(".orbax-checkpoint-tmp")]


def committed(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return [int(n) for n in names if n.isdigit()]


def final(workdir):
  """(state, meta) of the final checkpoint and the final eval event."""
  state, meta = checkpoint.read(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS)))
  return state, meta, events(workdir)[-1]


def snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jit_cache):
  """An uninterrupted run on 1 process x 4 devices."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  run = Run(workdir, jit_cache)
  assert run.finish() == [0], run.output()[-3000:]
  return workdir


def test_killed_run_resumes_bit_identical(tmp_path, jit_cache, reference):
  workdir = str(tmp_path)
  # SIGKILL while a checkpoint other than the first and the last is being written (its
  # temporary directory exists). The write may just have been committed when the signal lands;
  # then kill again.
  def writing():
    return [n for n in tmp_checkpoints(workdir) if int(n.split(".")[0]) < TOTAL_STEPS]

  for attempt in range(3):
    run = Run(workdir, jit_cache)
    run.wait_until(lambda: writing() and committed(workdir), "a second checkpoint write started")
    os.kill(run.procs[0].pid, signal.SIGKILL)
    assert run.finish() == [-signal.SIGKILL]
    left = tmp_checkpoints(workdir)
    if left:
      break
  assert left, "three kills during a save all came after the commit"
  uncommitted = int(left[0].split(".")[0])

  # Resume (never from the uncommitted step), then SIGKILL at a random step before the end.
  kill_after = random.randint(1, TOTAL_STEPS - max(committed(workdir)) - 1)
  run = Run(workdir, jit_cache)
  run.wait_until(lambda: len(run.new_train_steps()) >= kill_after, f"{kill_after} new steps")
  os.kill(run.procs[0].pid, signal.SIGKILL)
  assert run.finish() == [-signal.SIGKILL]
  resumed_from = int(run.output().split("resumed from ")[1].split()[0].rsplit("/", 1)[1])
  assert resumed_from < uncommitted, run.output()
  note = (f"killed during the save of step {uncommitted}, then {kill_after} steps after "
          f"step {resumed_from}")

  run = Run(workdir, jit_cache)
  assert run.finish() == [0], run.output()[-3000:]

  # Bit for bit: the whole final state, the eval metrics, and the loss of every step any of the
  # runs logged (each resume continued the data stream where the checkpoint left it).
  state, meta, evaluation = final(workdir)
  ref_state, ref_meta, ref_evaluation = final(reference)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=note), state, ref_state)
  assert meta["data"] == ref_meta["data"] == {"position": TOTAL_STEPS * BATCH}
  timing = ("examples_per_sec", "wall_time", "eval_time")
  assert ({k: v for k, v in evaluation.items() if k not in timing}
          == {k: v for k, v in ref_evaluation.items() if k not in timing}), note
  ref_losses = {e["step"]: e["loss"] for e in train_events(reference)}
  for event in train_events(workdir):
    assert event["loss"] == ref_losses[event["step"]], (event, note)


def test_preempted_run_moves_between_topologies(tmp_path, jit_cache, reference):
  workdir = str(tmp_path)
  # 1 process x 4 devices, SIGINT after two steps: saves and exits with EXIT_PREEMPTED.
  run = Run(workdir, jit_cache)
  run.wait_until(lambda: len(run.new_train_steps()) >= 2, "two steps")
  run.procs[0].send_signal(signal.SIGINT)
  assert run.finish() == [errors.EXIT_PREEMPTED], run.output()[-3000:]
  first_stop = max(run.new_train_steps())
  assert f"preempted: saved step {first_stop} " in run.output()

  # 2 processes x 2 devices resume; SIGTERM to process 1 only: both stop at the same step.
  run = Run(workdir, jit_cache, processes=2, devices=2)
  run.wait_until(lambda: len(run.new_train_steps()) >= 1, "a step on 2 processes")
  run.procs[1].send_signal(signal.SIGTERM)
  assert run.finish() == [errors.EXIT_PREEMPTED] * 2, run.output(0)[-3000:]
  second_stop = max(run.new_train_steps())
  assert f"resumed from {workdir}/checkpoints/{first_stop} " in run.output(0)
  for i in (0, 1):
    assert f"preempted: saved step {second_stop} " in run.output(i), run.output(i)[-3000:]
  assert first_stop < second_stop < TOTAL_STEPS

  # Back to 1 process x 4 devices, to the end.
  run = Run(workdir, jit_cache)
  assert run.finish() == [0], run.output()[-3000:]
  assert f"resumed from {workdir}/checkpoints/{second_stop} " in run.output()

  # The data position carried over every move: each step's loss is the reference's (up to the
  # order in which a cross-process all-reduce sums), and the stream ends where it should.
  state, meta, evaluation = final(workdir)
  ref_state, ref_meta, ref_evaluation = final(reference)
  assert meta["data"] == ref_meta["data"] == {"position": TOTAL_STEPS * BATCH}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state, ref_state)
  np.testing.assert_allclose(evaluation["loss"], ref_evaluation["loss"], rtol=1e-5)
  ref_losses = {e["step"]: e["loss"] for e in train_events(reference)}
  steps = [e["step"] for e in train_events(workdir)]
  assert sorted(set(steps)) == list(range(1, TOTAL_STEPS + 1))
  for event in train_events(workdir):
    np.testing.assert_allclose(event["loss"], ref_losses[event["step"]], rtol=1e-5)


def test_unreadable_checkpoint_stops_the_run_with_one_error(tmp_path, jit_cache, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  latest = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS))
  shutil.rmtree(os.path.join(latest, "state", "d"))
  older = snapshot(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS - 3)))
  run = Run(workdir, jit_cache)
  assert run.finish() == [errors.EXIT_IO]
  last_line = run.output().strip().splitlines()[-1]
  assert last_line.startswith(f"jaxscale-train: error: checkpoint {latest} cannot be read (")
  assert snapshot(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS - 3))) == older


def test_export_reproduces_the_eval(tmp_path, reference, capsys):
  output = str(tmp_path / "model.msgpack")
  export.main(["--workdir", reference, "--output", output])
  assert capsys.readouterr().out.strip() == output
  exported = export.load(output)
  assert exported.step == TOTAL_STEPS

  config = config_lib.load(QUICKSTART, OVERRIDES)
  source = data.load_dataset(config).eval
  images = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.array([source[i]["label"] for i in range(len(source))])
  logits = np.asarray(exported.logits(images), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  evaluation = events(reference)[-1]
  assert evaluation["split"] == "eval" and evaluation["num_examples"] == len(source)
  assert np.mean(logits.argmax(-1) == labels) == evaluation["accuracy"]
  np.testing.assert_allclose(-log_probs[np.arange(len(labels)), labels].mean(),
                             evaluation["loss"], rtol=1e-5)
