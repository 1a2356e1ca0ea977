#!/usr/bin/env python3
"""Starts one multi-process jaxscale run on this machine: N processes with D devices each.

    python launch/local.py --num-processes 2 --devices-per-process 2 -- \\
        python -m jaxscale.train --config=configs/quickstart.py --workdir=/tmp/run

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a port the OS says is free),
JAX_NUM_PROCESSES and JAX_PROCESS_ID, which `jaxscale.distributed.initialize` reads, and its
devices: D CPU devices (`--platform cpu`, for testing) or D GPUs of this node (`--platform gpu`,
CUDA_VISIBLE_DEVICES: one process per GPU with D=1, or all GPUs in one process with N=1).
Output goes to one log per process in --log-dir; process 0's is also copied to this terminal.

SIGTERM and SIGINT are forwarded to every process; those still running after --grace-period-s
are killed. When a process fails, the others are stopped the same way and the launcher exits
non-zero naming it. Exit status: 0 when every process exits 0; 75 when every process was
preempted (saved a checkpoint and exited 75: rerun to resume); otherwise the status of the first
process that failed (128 + N when killed by signal N); 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

POLL_S = 0.1


def log(message: str) -> None:
  print(f"[launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
  """A TCP port that was free a moment ago (the OS picks it; process 0 binds it soon after)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


PREEMPTED = 75  # jaxscale-train's status after saving a checkpoint on SIGTERM/SIGINT


def exit_status(returncode: int) -> int:
  """A Popen return code as a shell exit status: -N (killed by signal N) becomes 128 + N."""
  return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  if returncode == PREEMPTED:
    return f"was preempted (exit {PREEMPTED}: a checkpoint was saved)"
  return f"exited with code {returncode}"


def process_env(base: dict[str, str], index: int, args: argparse.Namespace,
                port: int) -> dict[str, str]:
  """The environment of process `index`: the run's layout and its own devices."""
  env = dict(base)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(args.num_processes), JAX_PROCESS_ID=str(index))
  d = args.devices_per_process
  if args.platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={d}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(d)
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(args.gpus[index * d:(index + 1) * d])
  return env


class Run:
  """The child processes, their logs, and stopping them all."""

  def __init__(self, command: list[str], args: argparse.Namespace):
    self.grace_period_s = args.grace_period_s
    self.stopping_since: float | None = None
    self.killed = False
    os.makedirs(args.log_dir, exist_ok=True)
    port = args.port or free_port()
    self.log_paths = [os.path.join(args.log_dir, f"process_{i}.log")
                      for i in range(args.num_processes)]
    self.procs: list[subprocess.Popen] = []
    self._echo_threads: list[threading.Thread] = []
    log(f"{args.num_processes} processes x {args.devices_per_process} {args.platform} devices, "
        f"coordinator 127.0.0.1:{port}, logs in {args.log_dir}")
    try:
      for i in range(args.num_processes):
        self._start(i, command, args, port)
    except OSError:
      self.signal_all(signal.SIGKILL)  # never leave a partial run behind
      raise

  def _start(self, i: int, command: list[str], args: argparse.Namespace, port: int) -> None:
    logfile = open(self.log_paths[i], "ab")  # a relaunch (resume) appends, never overwrites
    logfile.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} process {i}: "
                  f"{shlex.join(command)}\n".encode())
    logfile.flush()
    echo = i == 0 and not args.quiet
    # A session of its own: a terminal's Ctrl-C reaches the launcher only, which forwards it;
    # killing the process group also reaches whatever the command started.
    try:
      proc = subprocess.Popen(command, env=process_env(dict(os.environ), i, args, port),
                              stdout=subprocess.PIPE if echo else logfile,
                              stderr=subprocess.STDOUT, start_new_session=True)
    except OSError:
      logfile.close()
      raise
    if echo:
      thread = threading.Thread(target=_tee, args=(proc.stdout, logfile), daemon=True)
      thread.start()
      self._echo_threads.append(thread)
    else:
      logfile.close()
    self.procs.append(proc)

  def signal_all(self, signum: int) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, signum)
        except ProcessLookupError:
          pass

  def stop(self, signum: int = signal.SIGTERM) -> None:
    """Asks every running process to stop; `poll` kills them after the grace period."""
    if self.stopping_since is None:
      self.stopping_since = time.monotonic()
    self.signal_all(signum)

  def poll(self) -> bool:
    """Kills what outlived the grace period; True while any process runs."""
    running = None in [proc.poll() for proc in self.procs]  # polls every process
    if (running and not self.killed and self.stopping_since is not None
        and time.monotonic() - self.stopping_since > self.grace_period_s):
      log(f"killing the processes still running after {self.grace_period_s:g} s")
      self.signal_all(signal.SIGKILL)
      self.killed = True
    return running

  def tail(self, index: int, lines: int = 10) -> str:
    with open(self.log_paths[index], "rb") as f:
      text = f.read()[-8192:].decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])

  def close(self) -> None:
    for thread in self._echo_threads:
      thread.join(timeout=5)


def _tee(stream, logfile) -> None:
  """Copies process 0's output to its log and to this terminal, line by line."""
  with logfile:
    for line in iter(stream.readline, b""):
      logfile.write(line)
      logfile.flush()
      sys.stderr.buffer.write(line)
      sys.stderr.flush()


def supervise(run: Run) -> int:
  """Waits for the processes; returns the launcher's exit status."""
  first_failure: tuple[int, int] | None = None  # (process index, return code)
  received: list[int] = []

  def on_signal(signum, frame):
    if received and signum == signal.SIGINT:  # a second Ctrl-C: no more waiting
      run.signal_all(signal.SIGKILL)
    received.append(signum)
    log(f"received {signal.Signals(signum).name}: forwarding it to all processes")
    run.stop(signum)

  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, on_signal)
  while run.poll():
    if first_failure is None:
      for i, proc in enumerate(run.procs):
        if proc.returncode not in (None, 0):
          first_failure = (i, proc.returncode)
          if run.stopping_since is None:
            log(f"process {i} (pid {proc.pid}) {describe(proc.returncode)}; stopping the other "
                f"processes. Last lines of {run.log_paths[i]}:\n{run.tail(i)}")
            run.stop()
          break
    time.sleep(POLL_S)
  run.close()
  if first_failure is None:  # all ended: look for a failure that happened in the last poll
    first_failure = next(((i, p.returncode) for i, p in enumerate(run.procs) if p.returncode),
                         None)
  if first_failure is None:
    log(f"all {len(run.procs)} processes exited with code 0")
    return 0
  index, code = first_failure
  statuses = ", ".join(f"{i}={exit_status(p.returncode)}" for i, p in enumerate(run.procs))
  if all(p.returncode == PREEMPTED for p in run.procs):
    log(f"preempted: every process saved and exited with {PREEMPTED}; rerun the same command "
        f"to resume")
    return PREEMPTED
  log(f"failed: process {index} {describe(code)} (log: {run.log_paths[index]}); statuses: "
      f"{statuses}")
  return exit_status(code)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="launch/local.py", usage="%(prog)s [options] -- COMMAND [ARGS...]",
      description="Run N processes of a multi-process JAX program on this machine.")
  parser.add_argument("--num-processes", type=int, default=2, help="processes (default 2)")
  parser.add_argument("--devices-per-process", type=int, default=1,
                      help="devices per process (default 1)")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                      help="cpu: D host devices per process; gpu: D GPUs per process")
  parser.add_argument("--log-dir", default=None,
                      help="where process_<i>.log go (default logs/local-<date>-<time>)")
  parser.add_argument("--port", type=int, default=0,
                      help="coordinator port (default: a free one)")
  parser.add_argument("--grace-period-s", type=float, default=30.0,
                      help="seconds between SIGTERM and SIGKILL when stopping (default 30)")
  parser.add_argument("--quiet", action="store_true",
                      help="do not copy process 0's output to this terminal")
  if "--" in argv:
    split = argv.index("--")
    argv, command = argv[:split], argv[split + 1:]
  else:
    command = []
  args = parser.parse_args(argv)
  if not command:
    parser.error("no command: put it after --, e.g. -- python -m jaxscale.train ...")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num-processes and --devices-per-process must be >= 1")
  if not 0 <= args.port < 65536:
    parser.error(f"--port {args.port} is not a TCP port")
  args.gpus = []
  if args.platform == "gpu":  # this node's GPUs, as CUDA_VISIBLE_DEVICES lists them (or 0..N*D-1)
    need = args.num_processes * args.devices_per_process
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    args.gpus = visible.split(",") if visible else [str(i) for i in range(need)]
    if len(args.gpus) < need:
      parser.error(f"{args.num_processes} processes x {args.devices_per_process} GPUs need "
                   f"{need} GPUs; CUDA_VISIBLE_DEVICES lists {len(args.gpus)}")
  if args.log_dir is None:
    args.log_dir = os.path.join("logs", time.strftime("local-%Y%m%d-%H%M%S"))
  return args, command


def main(argv: list[str] | None = None) -> int:
  args, command = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    run = Run(command, args)
  except OSError as e:  # e.g. the command does not exist
    log(f"error: cannot start {command[0]!r}: {e.strerror or e}")
    return 2
  return supervise(run)


if __name__ == "__main__":
  sys.exit(main())
