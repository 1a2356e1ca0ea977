"""Multi-process training on localhost through the real jax.distributed and the real trainer.

Runs of 2 processes x 2 CPU devices and 4 x 2 (started by launch/local.py, each process running
`train.main` inside tests/multiprocess_driver.py) are compared with a single-process run over 8
devices with the same global batch: BatchNorm statistics and gradients are means over the whole
global batch, so every layout takes the same steps up to float rounding.
A 2 x 2 run with the state sharded (fsdp) matches too, and its checkpoint reads back whole.
A run loses a process to SIGKILL and must not hang. Time budget: about 130 s on 2 cores.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxscale import checkpoint


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
DRIVER = os.path.join(ROOT, "tests", "multiprocess_driver.py")
LAUNCHER = os.path.join(ROOT, "launch", "local.py")
STEPS, BATCH, NUM_TRAIN, NUM_EVAL, EVAL_BATCH = 6, 16, 512, 100, 16
OVERRIDES = [
    "dataset=synthetic", "image_size=8", f"synthetic_num_train_examples={NUM_TRAIN}",
    f"synthetic_num_eval_examples={NUM_EVAL}",  # 100 = 6 x 16 + 4: the last batch is padded
    f"global_batch_size={BATCH}", f"eval_batch_size={EVAL_BATCH}", f"num_train_steps={STEPS}",
    "log_every_steps=2", "progress_bar=off", "lr_schedule.warmup_epochs=0.0"]
FAST_COMPILE = "--xla_backend_optimization_level=0"  # compiling is most of these runs' time
RUN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
  """A persistent compilation cache: the fault run reuses what the 2 x 2 run compiled."""
  path = str(tmp_path_factory.mktemp("jit_cache"))
  return {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def read_events(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jit_cache):
  """One process with 8 devices: its params, metrics and the train records it read, in order."""
  workdir, out, _ = launch(tmp_path_factory.mktemp("reference"), jit_cache, 1, 8)
  [info] = process_info(out, 1)
  return {"params": dict(np.load(os.path.join(out, "params.npz"))),
          # The first read is `build`'s look at record 0 (its fields, shapes and dtypes).
          "events": read_events(workdir), "train_order": info["train_reads"][1:STEPS * BATCH + 1]}


def launch(tmp_path, jit_cache, num_processes, devices, extra=(), env=None, check=True,
           grace_period_s=5):
  """Runs the driver under launch/local.py; returns (workdir, out_dir, log_dir) or the process."""
  workdir, out, logs = (str(tmp_path / name) for name in ("run", "out", "logs"))
  os.makedirs(out)
  command = [sys.executable, LAUNCHER, f"--num-processes={num_processes}",
             f"--devices-per-process={devices}", f"--log-dir={logs}", f"--grace-period-s={grace_period_s}",
             "--quiet", "--", sys.executable, DRIVER, out, f"--config={QUICKSTART}",
             f"--workdir={workdir}", *(f"--config.{o}" for o in [*OVERRIDES, *extra])]
  env = dict(os.environ, JAXSCALE_HEARTBEAT_TIMEOUT_S="20", XLA_FLAGS=FAST_COMPILE, **jit_cache,
             **(env or {}))
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, env=env)
  try:
    proc.stdout, proc.stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.terminate()  # the launcher stops its processes (SIGTERM, then SIGKILL after 5 s)
    proc.communicate(timeout=30)
    raise
  if not check:
    return proc
  logs_text = "\n".join(open(os.path.join(logs, f"process_{i}.log")).read()[-3000:]
                        for i in range(num_processes))
  assert proc.returncode == 0, proc.stderr[-3000:] + logs_text
  return workdir, out, logs


def process_info(out, num_processes):
  return [json.load(open(os.path.join(out, f"process_{i}.json"))) for i in range(num_processes)]


def assert_same_training(workdir, out, reference):
  params = dict(np.load(os.path.join(out, "params.npz")))
  assert params.keys() == reference["params"].keys()
  for key, value in reference["params"].items():
    np.testing.assert_allclose(params[key], value, rtol=2e-4, atol=2e-5, err_msg=key)
  events = read_events(workdir)
  train_events = [e for e in events if e["split"] == "train"]
  ref_train = [e for e in reference["events"] if e["split"] == "train"]
  # Only process 0 writes: each event once (all processes share this workdir).
  assert [e["step"] for e in train_events] == [2, 4, 6]
  assert [e["split"] for e in events] == ["train"] * 3 + ["eval"]
  np.testing.assert_allclose([e["loss"] for e in train_events], [e["loss"] for e in ref_train],
                             rtol=1e-4)
  evaluation, ref_eval = events[-1], reference["events"][-1]
  assert evaluation["num_examples"] == NUM_EVAL  # every eval example once, padding masked
  np.testing.assert_allclose(evaluation["loss"], ref_eval["loss"], rtol=1e-4)
  assert evaluation["accuracy"] == ref_eval["accuracy"]
  tensorboard = os.listdir(os.path.join(workdir, "tensorboard"))
  assert len([f for f in tensorboard if f.startswith("events.out.tfevents")]) == 1, tensorboard


def test_two_processes_hosts_mesh_equal_single_process(tmp_path, jit_cache, reference):
  # Hierarchical all-reduce across the two processes against the flat single-process reference.
  workdir, out, logs = launch(tmp_path, jit_cache, 2, 2, extra=["mesh=hosts",
                                                               "allreduce=hierarchical"])
  assert_same_training(workdir, out, reference)
  infos = process_info(out, 2)
  for info in infos:  # hosts x local: row p holds exactly the devices of process p
    assert info["process_count"] == 2 and info["local_device_count"] == 2
    assert info["mesh_axes"] == ["hosts", "local"]
    assert info["mesh_rows"] == [[0, 0], [1, 1]]
  # Only process 0 logs; the others stay quiet.
  log0, log1 = (open(os.path.join(logs, f"process_{i}.log")).read() for i in range(2))
  assert "step 6" in log0 and "done at step 6: eval accuracy" in log0
  assert "[jaxscale" not in log1, log1[-2000:]


def test_two_processes_sharded_state_equal_single_process(tmp_path, jit_cache, reference):
  # Parameters and optimizer state sharded over both processes' devices; each process writes
  # its own shards, and the checkpoint reads back whole, checksums included.
  workdir, out, _ = launch(tmp_path, jit_cache, 2, 2, extra=["state_sharding=fsdp"])
  assert_same_training(workdir, out, reference)
  state, meta = checkpoint.read(os.path.join(workdir, "checkpoints", str(STEPS)))
  assert meta["checksums"]  # verified by read()
  params = dict(np.load(os.path.join(out, "params.npz")))
  for path, leaf in jax.tree_util.tree_leaves_with_path({"params": state["params"]}):
    np.testing.assert_array_equal(leaf, params[jax.tree_util.keystr(path)])


def test_four_processes_read_own_shards_and_equal_single_process(tmp_path, jit_cache, reference):
  workdir, out, _ = launch(tmp_path, jit_cache, 4, 2)
  assert_same_training(workdir, out, reference)
  infos = process_info(out, 4)
  assert [info["mesh_rows"] for info in infos] == [[[0, 0, 1, 1, 2, 2, 3, 3]]] * 4
  # Train: process p read exactly its quarter of every global batch (prefetching may have read
  # a little further ahead, still only from its own quarter), and nothing another process read.
  order, local = reference["train_order"], BATCH // 4
  assert len(order) == STEPS * BATCH
  reads = [set(info["train_reads"][1:]) for info in infos]  # [0]: build's look at record 0
  for p, read in enumerate(reads):
    own = {order[s * BATCH + p * local + i] for s in range(STEPS) for i in range(local)}
    assert own <= read, p
    for q in range(p):
      assert not read & reads[q], (p, q)
  # Eval: together the processes read each eval example once; padding slots read index 0.
  eval_reads = np.concatenate([info["eval_reads"] for info in infos])
  counts = np.bincount(eval_reads, minlength=NUM_EVAL)
  assert len(counts) == NUM_EVAL and (counts[1:] == 1).all() and counts[0] >= 1


def test_lost_process_stops_the_others_within_heartbeat_timeout(tmp_path, jit_cache):
  heartbeat_s = 4
  workdir = str(tmp_path / "run")
  with socket.socket() as s:  # a port the OS says is free
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  args = [sys.executable, "-m", "jaxscale.train", f"--config={QUICKSTART}", f"--workdir={workdir}",
          *(f"--config.{o}" for o in OVERRIDES), "--config.num_train_steps=1000000",
          "--config.log_every_steps=1", "--config.mesh=hosts"]  # the 2 x 2 run's programs
  procs, logs = [], []
  for i in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), JAXSCALE_HEARTBEAT_TIMEOUT_S=str(heartbeat_s),
               XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", **jit_cache)
    logs.append(open(tmp_path / f"process_{i}.log", "w+"))
    procs.append(subprocess.Popen(args, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                  cwd=ROOT))
  try:
    deadline = time.monotonic() + 150
    while "] step 3 " not in (tmp_path / "process_0.log").read_text():  # training is under way
      assert procs[0].poll() is None and procs[1].poll() is None, (
          (tmp_path / "process_0.log").read_text()[-3000:])
      assert time.monotonic() < deadline, "the run did not start training in time"
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    code = procs[0].wait(timeout=heartbeat_s + 60)
    elapsed = time.monotonic() - killed_at
  finally:
    for proc in procs:  # only what this test started
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  survivor_log = (tmp_path / "process_0.log").read_text()
  assert code != 0
  # JAX's coordination service names the lost process: task 1.
  assert re.search(r"unhealthy \(stopped sending heartbeats\):\s*1\b", survivor_log), (
      survivor_log[-3000:])
  assert elapsed < heartbeat_s + 20, elapsed  # the heartbeat timeout plus slack for a busy CPU


def test_error_in_one_process_ends_the_run(tmp_path, jit_cache):
  # Process 1 fails in the trainer; it must exit at once (not wait in JAX's shutdown barrier
  # for process 0, which waits in a collective for it), and the launcher ends the run.
  start = time.monotonic()
  proc = launch(tmp_path, jit_cache, 2, 2, extra=["mesh=hosts"], check=False,
                env={"MULTIPROCESS_DRIVER_FAIL": "1"}, grace_period_s=1)
  assert time.monotonic() - start < 100  # a hang would last JAX's shutdown timeout (300 s)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "process 1 (pid " in proc.stderr and "exited with code 1" in proc.stderr
  log1 = (tmp_path / "logs" / "process_1.log").read_text()
  assert "RuntimeError: injected failure in process 1" in log1
  assert "jaxscale-train: error: process 1 of 2 failed (RuntimeError)" in log1


def test_config_error_in_every_process_exits_2(tmp_path, jit_cache):
  # A config that every process rejects ends the run cleanly, with the error in process 0's log.
  proc = launch(tmp_path, jit_cache, 2, 1, extra=["parallelism=pmap"], check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  log0 = (tmp_path / "logs" / "process_0.log").read_text()
  assert ("jaxscale-train: error: config key 'parallelism': 'pmap' runs on one process only; use "
          "shard_map") in log0
