"""Multi-process runs: starts `jax.distributed` from the environment, before anything uses JAX.

Which processes form the run comes from the environment, checked in this order:

1. `JAXSCALE_DISTRIBUTED=off`: single process, whatever else is set.
   `JAXSCALE_DISTRIBUTED=jax`: `jax.distributed.initialize()` with no arguments, so that JAX's own
   cluster detection decides (Cloud TPU VM pods, Kubernetes with `jax[k8s]`, SLURM, Open MPI).
2. Explicit: `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` and `JAX_COORDINATOR_ADDRESS` (host:port of
   process 0; JAX reads this one itself too). `launch/local.py` and the Kubernetes manifest set them.
3. SLURM (`srun` with more than one task) or Open MPI (`mpirun -np N`, N > 1): the process count
   and id come from the scheduler's variables, the coordinator from `JAX_COORDINATOR_ADDRESS` or,
   if unset, from JAX's detection (first node of the step, a port derived from the job id).
4. Otherwise a single process, and nothing is initialized: a plain `python -m jaxscale.train` on a
   login node or inside a one-task allocation just runs.

`JAXSCALE_INIT_TIMEOUT_S` (default 300) bounds the wait for the coordinator and for all processes
to join; `JAXSCALE_HEARTBEAT_TIMEOUT_S` (default 100) is how long a silent process counts as alive.
When a process dies, JAX's coordination service aborts every other process within the heartbeat
timeout, naming the lost one ("The following tasks are unhealthy (stopped sending heartbeats)").
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
import traceback
from typing import Any, Mapping

import jax

from jaxscale.errors import EXIT_UNREACHABLE, ConfigError, JaxscaleError
from jaxscale.metrics import log

DEFAULT_INIT_TIMEOUT_S = 300  # JAX's default
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's default
MODES = ("auto", "off", "jax")


class DistributedError(JaxscaleError, RuntimeError):
  """The processes of a multi-process run could not be joined; the message says why."""
  exit_status = EXIT_UNREACHABLE  # rerun once process 0 is up


@dataclasses.dataclass(frozen=True)
class Cluster:
  """One process's view of a multi-process run, as found in the environment."""
  source: str  # where the layout came from: "env", "slurm", "openmpi" or "jax"
  num_processes: int | None  # None: left to JAX's detection
  process_id: int | None
  coordinator_address: str | None  # host:port of process 0; None: left to JAX's detection
  detection: str | None  # JAX's `cluster_detection_method`
  local_device_ids: tuple[int, ...] | None  # None: JAX's default or $JAX_LOCAL_DEVICE_IDS
  init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S

  def initialize_kwargs(self) -> dict[str, Any]:
    """The arguments for `jax.distributed.initialize`."""
    kwargs = dict(coordinator_address=self.coordinator_address,
                  num_processes=self.num_processes, process_id=self.process_id,
                  cluster_detection_method=self.detection,
                  initialization_timeout=self.init_timeout_s,
                  heartbeat_timeout_seconds=self.heartbeat_timeout_s)
    if self.local_device_ids is not None:
      kwargs["local_device_ids"] = list(self.local_device_ids)
    return kwargs

  def describe(self) -> str:
    where = self.coordinator_address or "chosen by JAX's cluster detection"
    who = ("" if self.process_id is None
           else f"process {self.process_id} of {self.num_processes}, ")
    return (f"jax.distributed ({self.source}): {who}coordinator {where}, init timeout "
            f"{self.init_timeout_s} s, heartbeat timeout {self.heartbeat_timeout_s} s")


def _int(environ: Mapping[str, str], name: str, default: int | None = None,
         minimum: int = 0) -> int | None:
  text = environ.get(name, "").strip()
  if not text:
    return default
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise ConfigError(f"environment variable {name}={text!r} must be an integer >= {minimum}")
  return value


def detect(environ: Mapping[str, str] | None = None) -> Cluster | None:
  """The run this process belongs to, or None for a single-process run. Reads no JAX state."""
  env = os.environ if environ is None else environ
  mode = env.get("JAXSCALE_DISTRIBUTED", "auto").strip() or "auto"
  if mode not in MODES:
    raise ConfigError(f"environment variable JAXSCALE_DISTRIBUTED={mode!r} must be one of "
                      f"{', '.join(MODES)}")
  timeouts = dict(
      init_timeout_s=_int(env, "JAXSCALE_INIT_TIMEOUT_S", DEFAULT_INIT_TIMEOUT_S, minimum=1),
      heartbeat_timeout_s=_int(env, "JAXSCALE_HEARTBEAT_TIMEOUT_S", DEFAULT_HEARTBEAT_TIMEOUT_S,
                               minimum=1))
  address = env.get("JAX_COORDINATOR_ADDRESS") or None
  if mode == "off":
    return None
  if mode == "jax":
    return Cluster("jax", None, None, None, None, None, **timeouts)

  if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
    count = _int(env, "JAX_NUM_PROCESSES", minimum=1)
    if count is None:
      raise ConfigError("environment variable JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not")
    if count == 1:
      return None
    index = _int(env, "JAX_PROCESS_ID")
    if index is None or index >= count:
      raise ConfigError(f"environment variable JAX_PROCESS_ID={env.get('JAX_PROCESS_ID', '')!r} "
                        f"must be set to an integer in [0, {count}) (JAX_NUM_PROCESSES={count})")
    if address is None:
      raise ConfigError(f"environment variable JAX_COORDINATOR_ADDRESS (host:port of process 0) "
                        f"must be set when JAX_NUM_PROCESSES={count}")
    # Everything is given: JAX's cluster detection must not override it (e.g. inside SLURM).
    return Cluster("env", count, index, address, "deactivate", None, **timeouts)

  # The same variables that JAX's SlurmCluster requires; one task means a single process.
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(name in env for name in slurm) and _int(env, "SLURM_NTASKS", minimum=1) > 1:
    return Cluster("slurm", _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"), address,
                   "slurm", None, **timeouts)

  if _int(env, "OMPI_COMM_WORLD_SIZE", 1, minimum=1) > 1:
    count, index = _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK", 0)
    if "OMPI_MCA_orte_hnp_uri" in env:  # Open MPI <= 4: JAX's detection finds the coordinator
      return Cluster("openmpi", count, index, address, "ompi", None, **timeouts)
    if address is None:  # Open MPI 5 (PRRTE) exports nothing JAX can derive an address from
      raise ConfigError("environment variable JAX_COORDINATOR_ADDRESS (host:port of rank 0) must "
                        "be set under Open MPI 5 (mpirun -x JAX_COORDINATOR_ADDRESS=...)")
    # Without JAX's detection, keep its convention: rank r on a host drives that host's device r,
    # unless JAX_LOCAL_DEVICE_IDS says otherwise (one process per host with all its devices).
    local = None if env.get("JAX_LOCAL_DEVICE_IDS") else (
        _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),)
    return Cluster("openmpi", count, index, address, "deactivate", local, **timeouts)
  return None


def split_address(address: str) -> tuple[str, int]:
  """("host", port) from "host:port" or "[v6]:port"."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ConfigError(f"environment variable JAX_COORDINATOR_ADDRESS={address!r} must be "
                      f"host:port")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once a TCP connection to `address` succeeds; DistributedError after `timeout_s`.

  JAX itself aborts the whole process (no exception) when the coordinator does not answer, with
  a message that names neither the address nor the timeout; this check comes first.
  """
  host, port = split_address(address)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      reason = (f"cannot resolve host {host!r}" if isinstance(e, socket.gaierror)
                else e.strerror or type(e).__name__)
    if time.monotonic() >= deadline:
      raise DistributedError(
          f"cannot reach the JAX coordinator at {address} within {timeout_s:g} s "
          f"(JAXSCALE_INIT_TIMEOUT_S): {reason}; check that process 0 is running and that "
          f"JAX_COORDINATOR_ADDRESS names its host and a port open to this host")
    time.sleep(0.5)


_cluster: Cluster | None = None  # what `initialize` started, for `exit_after_error`


def initialize(environ: Mapping[str, str] | None = None) -> Cluster | None:
  """Joins the multi-process run the environment describes; does nothing for a single process.

  Call it before anything else touches JAX. Returns the cluster, or None when single-process.
  Raises ConfigError for a malformed variable (the message names it) and DistributedError when
  the coordinator cannot be reached within the init timeout.
  """
  global _cluster
  cluster = detect(environ)
  if cluster is None:
    return None
  if jax.distributed.is_initialized():  # e.g. by a wrapper script: keep what it set up
    _cluster = cluster
    return cluster
  if cluster.process_id == 0:
    log(cluster.describe())  # the other processes stay quiet: only process 0 writes logs
  if cluster.coordinator_address and cluster.process_id:  # process 0 hosts the coordinator
    wait_for_coordinator(cluster.coordinator_address, cluster.init_timeout_s)
  try:
    jax.distributed.initialize(**cluster.initialize_kwargs())
  except ValueError as e:  # JAXSCALE_DISTRIBUTED=jax and JAX's detection found no cluster
    raise DistributedError(f"JAXSCALE_DISTRIBUTED={cluster.source} but JAX's cluster detection "
                           f"found no multi-process environment ({e})") from None
  except RuntimeError as e:
    if "before any JAX" in str(e):
      raise DistributedError("jaxscale.distributed.initialize() must run before any JAX "
                             "operation in this process") from None
    raise
  if cluster.source == "jax":  # now JAX knows what its detection found
    cluster = dataclasses.replace(cluster, num_processes=jax.process_count(),
                                  process_id=jax.process_index())
    if cluster.process_id == 0:
      log(cluster.describe())
  _cluster = cluster
  return cluster


def exit_after_error(error: BaseException) -> None:
  """In a multi-process run, ends this process at once after an unexpected error.

  A normal exit would wait in JAX's shutdown barrier for processes that are blocked in a
  collective with this one; exiting now lets them stop within the heartbeat timeout. When the
  error is JAX's own (a failed collective, usually because another process died), this process
  first waits up to the heartbeat timeout for JAX's verdict, which names the lost process.
  Returns without doing anything in a single-process run.
  """
  if _cluster is None or not jax.distributed.is_initialized():
    return
  traceback.print_exception(error, file=sys.stderr)
  print(f"jaxscale-train: error: process {jax.process_index()} of {jax.process_count()} failed "
        f"({type(error).__name__}); stopping it so the other processes stop too",
        file=sys.stderr, flush=True)
  if isinstance(error, jax.errors.JaxRuntimeError):
    time.sleep(_cluster.heartbeat_timeout_s + 2)
  sys.stdout.flush()
  os._exit(1)
