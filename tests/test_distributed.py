"""jaxscale.distributed: which run the environment describes, and the errors a user sees.

The joins themselves run in tests/test_multiprocess.py. Time budget: about 10 s.
"""
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxscale import distributed
from jaxscale.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.py")
EXPLICIT = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "2"}
# What `srun` sets in task 3 of a 4-task step on two nodes.
SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "4",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("env", [
    {},
    {"JAX_NUM_PROCESSES": "1"},  # the explicit form with one process
    {**EXPLICIT, "JAXSCALE_DISTRIBUTED": "off"},
    {**SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"},  # one task: login node or srun -n1
    {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4"},  # inside salloc/sbatch, but not in an srun step
    {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"},
])
def test_single_process_environments_are_not_initialized(env):
  assert distributed.detect(env) is None
  assert distributed.initialize(env) is None  # returns before touching jax.distributed


def test_explicit_variables():
  cluster = distributed.detect({**EXPLICIT, **SLURM_TASK, "JAXSCALE_INIT_TIMEOUT_S": "30",
                                "JAXSCALE_HEARTBEAT_TIMEOUT_S": "7"})
  # The explicit form wins over the scheduler's variables and switches JAX's detection off.
  assert cluster.initialize_kwargs() == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
      cluster_detection_method="deactivate", initialization_timeout=30,
      heartbeat_timeout_seconds=7)


def test_defaults_are_jax_timeouts():
  kwargs = distributed.detect(EXPLICIT).initialize_kwargs()
  assert (kwargs["initialization_timeout"], kwargs["heartbeat_timeout_seconds"]) == (300, 100)


def test_slurm_with_several_tasks():
  kwargs = distributed.detect(SLURM_TASK).initialize_kwargs()
  # JAX's SLURM detection picks the coordinator and the task's GPU (its local rank).
  assert kwargs["num_processes"] == 4 and kwargs["process_id"] == 3
  assert kwargs["coordinator_address"] is None and kwargs["cluster_detection_method"] == "slurm"
  assert "local_device_ids" not in kwargs
  with_address = distributed.detect({**SLURM_TASK, "JAX_COORDINATOR_ADDRESS": "gpu01:9999"})
  assert with_address.coordinator_address == "gpu01:9999"


def test_open_mpi():
  ranks = {"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "9",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
  v4 = distributed.detect({**ranks, "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.5:3491"})
  assert (v4.num_processes, v4.process_id, v4.detection) == (16, 9, "ompi")
  with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS .* Open MPI 5"):
    distributed.detect(ranks)
  v5 = distributed.detect({**ranks, "JAX_COORDINATOR_ADDRESS": "node1:61234"})
  assert v5.initialize_kwargs() == dict(
      coordinator_address="node1:61234", num_processes=16, process_id=9,
      cluster_detection_method="deactivate", local_device_ids=[1],
      initialization_timeout=300, heartbeat_timeout_seconds=100)
  per_host = distributed.detect({**ranks, "JAX_COORDINATOR_ADDRESS": "node1:61234",
                                 "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"})
  assert per_host.local_device_ids is None  # JAX reads JAX_LOCAL_DEVICE_IDS itself


def test_jax_mode_leaves_everything_to_jax():
  cluster = distributed.detect({**EXPLICIT, "JAXSCALE_DISTRIBUTED": "jax",
                                "JAXSCALE_HEARTBEAT_TIMEOUT_S": "9"})
  assert cluster.initialize_kwargs() == dict(
      coordinator_address=None, num_processes=None, process_id=None,
      cluster_detection_method=None, initialization_timeout=300, heartbeat_timeout_seconds=9)


@pytest.mark.parametrize("env, message", [
    ({**EXPLICIT, "JAX_PROCESS_ID": "4"},
     "JAX_PROCESS_ID='4' must be set to an integer in [0, 4) (JAX_NUM_PROCESSES=4)"),
    ({**EXPLICIT, "JAX_PROCESS_ID": "two"}, "JAX_PROCESS_ID='two' must be an integer >= 0"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS (host:port of process 0) must be set when JAX_NUM_PROCESSES=2"),
    ({"JAX_PROCESS_ID": "0"}, "JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not"),
    ({"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES='0' must be an integer >= 1"),
    ({**EXPLICIT, "JAXSCALE_HEARTBEAT_TIMEOUT_S": "0"},
     "JAXSCALE_HEARTBEAT_TIMEOUT_S='0' must be an integer >= 1"),
    ({"JAXSCALE_INIT_TIMEOUT_S": "soon"}, "JAXSCALE_INIT_TIMEOUT_S='soon' must be an integer"),
    ({"JAXSCALE_DISTRIBUTED": "yes"}, "JAXSCALE_DISTRIBUTED='yes' must be one of auto, off, jax"),
])
def test_bad_variables_are_named(env, message):
  with pytest.raises(ConfigError) as error:
    distributed.detect(env)
  assert message in str(error.value)


def test_split_address():
  assert distributed.split_address("node1:1234") == ("node1", 1234)
  assert distributed.split_address("[fe80::1]:8476") == ("fe80::1", 8476)
  with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS='node1' must be host:port"):
    distributed.split_address("node1")


def test_wait_for_coordinator():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 5)
  port = closed_port()
  start = time.monotonic()
  with pytest.raises(distributed.DistributedError) as error:
    distributed.wait_for_coordinator(f"127.0.0.1:{port}", 1)
  assert 1 <= time.monotonic() - start < 5
  assert str(error.value).startswith(
      f"cannot reach the JAX coordinator at 127.0.0.1:{port} within 1 s (JAXSCALE_INIT_TIMEOUT_S)")


def run_trainer(tmp_path, env):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxscale.train", f"--config={QUICKSTART}", f"--workdir={workdir}"],
      env={**os.environ, **env}, capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert not workdir.exists()
  return proc.returncode, proc.stderr.strip().splitlines()[-1]


def test_trainer_exits_3_when_the_coordinator_is_unreachable(tmp_path):
  port = closed_port()
  code, line = run_trainer(tmp_path, {
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1", "JAXSCALE_INIT_TIMEOUT_S": "2"})
  assert code == distributed.EXIT_UNREACHABLE == 3
  assert line.startswith(f"jaxscale-train: error: cannot reach the JAX coordinator at "
                         f"127.0.0.1:{port} within 2 s (JAXSCALE_INIT_TIMEOUT_S)"), line


def test_trainer_exits_2_on_a_bad_variable(tmp_path):
  code, line = run_trainer(tmp_path, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  assert code == 2
  assert line == ("jaxscale-train: error: environment variable JAX_COORDINATOR_ADDRESS (host:port "
                  "of process 0) must be set when JAX_NUM_PROCESSES=2")
