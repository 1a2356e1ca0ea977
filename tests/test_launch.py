"""launch/: the local launcher with stand-in processes, and the cluster scripts' rendered commands.

The scheduler commands (srun, scontrol, mpirun, gcloud) are stubs on PATH that record their
arguments and environment; what they record is then fed to `jaxscale.distributed.detect` as the
scheduler would set it for one task. Time budget: about 15 s.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from jaxscale import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
LOCAL = os.path.join(LAUNCH, "local.py")
TRAIN_ARGS = ["--config=configs/quickstart.py", "--workdir=/shared/runs/q",
              "--config.optimizer.name=lars", "--config.note=two words"]


def load_local():
  spec = importlib.util.spec_from_file_location("launch_local", LOCAL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def child(tmp_path, body: str) -> list[str]:
  """A stand-in for one process of a run: a Python script given the run's environment."""
  path = tmp_path / "child.py"
  path.write_text("import json, os, signal, sys, time\n"
                  f"OUT = {str(tmp_path)!r}\n"
                  "ID = os.environ['JAX_PROCESS_ID']\n" + textwrap.dedent(body))
  return [sys.executable, str(path)]


def launcher(tmp_path, *args):
  return [sys.executable, LOCAL, f"--log-dir={tmp_path / 'logs'}", *args]


def wait_for_files(paths, timeout=30):
  deadline = time.monotonic() + timeout
  while not all(os.path.exists(p) for p in paths):
    assert time.monotonic() < deadline, paths
    time.sleep(0.05)


# --- launch/local.py ---------------------------------------------------------------------------

def test_local_sets_each_process_layout_devices_and_log(tmp_path):
  command = child(tmp_path, """
      keys = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS",
              "JAX_PLATFORMS"]
      print(json.dumps({k: os.environ.get(k) for k in keys}))
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
  runs = [subprocess.run(launcher(tmp_path, "--num-processes=3", "--devices-per-process=2", "--",
                                  *command), env=env, capture_output=True, text=True, timeout=60)
          for _ in range(2)]  # the second launch appends to the same logs
  for proc in runs:
    assert proc.returncode == 0, proc.stderr
    assert "all 3 processes exited with code 0" in proc.stderr
  seen = []
  for i in range(3):
    lines = (tmp_path / "logs" / f"process_{i}.log").read_text().splitlines()
    assert [line.startswith("=== ") for line in lines] == [True, False, True, False]
    seen.append(json.loads(lines[-1]))
  assert {s["JAX_COORDINATOR_ADDRESS"] for s in seen} == {seen[0]["JAX_COORDINATOR_ADDRESS"]}
  assert seen[0]["JAX_COORDINATOR_ADDRESS"].startswith("127.0.0.1:")
  assert [(s["JAX_NUM_PROCESSES"], s["JAX_PROCESS_ID"]) for s in seen] == [
      ("3", "0"), ("3", "1"), ("3", "2")]
  for s in seen:
    assert s["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
    assert s["JAX_PLATFORMS"] == "cpu"
  assert json.dumps(seen[0]) in runs[1].stderr  # process 0's output is also on the terminal
  assert json.dumps(seen[1]) not in runs[1].stderr


def test_local_gpu_mode_splits_visible_gpus(monkeypatch):
  local = load_local()
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
  for n, d, expected in [(2, 2, ["4,5", "6,7"]), (4, 1, ["4", "5", "6", "7"]), (1, 4, ["4,5,6,7"])]:
    args, command = local.parse_args([f"--num-processes={n}", f"--devices-per-process={d}",
                                      "--platform=gpu", "--", "python", "train.py"])
    assert command == ["python", "train.py"]
    envs = [local.process_env({}, i, args, 1234) for i in range(n)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == expected
    assert all("XLA_FLAGS" not in e and "JAX_PLATFORMS" not in e for e in envs)


@pytest.mark.parametrize("args, message", [
    (["--num-processes=2"], "no command: put it after --"),
    (["--devices-per-process=0", "--", "true"], "must be >= 1"),
    (["--platform=gpu", "--num-processes=3", "--", "true"],
     "3 processes x 1 GPUs need 3 GPUs; CUDA_VISIBLE_DEVICES lists 2"),
])
def test_local_bad_arguments_exit_2(tmp_path, args, message):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1")
  proc = subprocess.run(launcher(tmp_path, *args), env=env, capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_local_stops_everything_when_one_process_fails(tmp_path):
  command = child(tmp_path, """
      open(os.path.join(OUT, f"pid-{ID}"), "w").write(str(os.getpid()))
      if ID == "1":
        print("process 1 gives up", flush=True)
        sys.exit(3)
      time.sleep(60)
      """)
  start = time.monotonic()
  proc = subprocess.run(launcher(tmp_path, "--num-processes=3", "--grace-period-s=5", "--",
                                 *command), capture_output=True, text=True, timeout=60)
  assert time.monotonic() - start < 20
  assert proc.returncode == 3, proc.stderr
  assert "process 1 (pid " in proc.stderr and "exited with code 3; stopping the other" in proc.stderr
  assert "process 1 gives up" in proc.stderr  # the failed process's last log lines
  assert "failed: process 1 exited with code 3" in proc.stderr.splitlines()[-1]
  for i in (0, 2):  # stopped by the launcher
    with pytest.raises(ProcessLookupError):
      os.kill(int((tmp_path / f"pid-{i}").read_text()), 0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_local_forwards_signals_to_every_process(tmp_path, signum):
  command = child(tmp_path, """
      def stop(signum, frame):
        open(os.path.join(OUT, f"got-{ID}"), "w").write(signal.Signals(signum).name)
        sys.exit(75)  # like jaxscale-train after saving a checkpoint
      signal.signal(signal.SIGTERM, stop)
      signal.signal(signal.SIGINT, stop)
      open(os.path.join(OUT, f"ready-{ID}"), "w").close()
      time.sleep(60)
      """)
  proc = subprocess.Popen(launcher(tmp_path, "--num-processes=2", "--quiet", "--", *command),
                          stderr=subprocess.PIPE, text=True)
  try:
    wait_for_files([tmp_path / f"ready-{i}" for i in range(2)])
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 75, stderr
  assert "failed" not in stderr
  assert stderr.strip().splitlines()[-1].endswith(
      "preempted: every process saved and exited with 75; rerun the same command to resume")
  for i in range(2):
    assert (tmp_path / f"got-{i}").read_text() == signum.name


def test_local_kills_processes_that_ignore_sigterm(tmp_path):
  command = child(tmp_path, """
      signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as JAX's preemption notifier does
      open(os.path.join(OUT, f"pid-{ID}"), "w").write(str(os.getpid()))
      time.sleep(60)
      """)
  proc = subprocess.Popen(launcher(tmp_path, "--num-processes=2", "--grace-period-s=1", "--quiet",
                                   "--", *command), stderr=subprocess.PIPE, text=True)
  try:
    wait_for_files([tmp_path / f"pid-{i}" for i in range(2)])
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert time.monotonic() - start < 10
  assert proc.returncode == 128 + signal.SIGKILL, stderr
  assert "killing the processes still running after 1 s" in stderr
  for i in range(2):
    with pytest.raises(ProcessLookupError):
      os.kill(int((tmp_path / f"pid-{i}").read_text()), 0)


# --- cluster scripts ---------------------------------------------------------------------------

STUB = """#!{python}
import json, os, sys
with open(os.path.join({out!r}, "{name}.json"), "w") as f:
  json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
             "env": {{k: v for k, v in os.environ.items() if k.startswith(("JAX", "PYTHON"))}}}}, f)
"""


def stubs(tmp_path, *names, scontrol_hosts=()):
  """A bin dir with recording stubs for `names` (and `scontrol show hostnames`)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name in names:
    (bin_dir / name).write_text(STUB.format(python=sys.executable, out=str(tmp_path), name=name))
    (bin_dir / name).chmod(0o755)
  if scontrol_hosts:
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(scontrol_hosts) + "\n")
    (bin_dir / "scontrol").chmod(0o755)
  return f"{bin_dir}:{os.environ['PATH']}"


def recorded(tmp_path, name):
  return json.loads((tmp_path / f"{name}.json").read_text())


def clean_env(**extra):
  """This environment without any scheduler or JAX variables, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX", "PMI", "PROJECT", "HOSTS"))}
  return {**env, **extra}


@pytest.mark.parametrize("script", ["slurm.sbatch", "mpirun.sh", "tpu_vm.sh"])
def test_scripts_parse_and_print_usage(script):
  path = os.path.join(LAUNCH, script)
  assert subprocess.run(["bash", "-n", path], timeout=10).returncode == 0
  proc = subprocess.run(["bash", path], env=clean_env(), capture_output=True, text=True,
                        timeout=10)
  assert proc.returncode == 2 and proc.stderr.startswith("usage:"), proc.stderr


def sbatch_options(path):
  with open(path) as f:
    return [line.split(None, 1)[1].strip() for line in f if line.startswith("#SBATCH ")]


@pytest.mark.parametrize("tasks_per_node, local_ids", [
    ("1", "0,1,2,3,4,5,6,7"),  # one process per node with all its GPUs
    ("8", None),  # one process per GPU: JAX's SLURM default (GPU = node-local rank)
])
def test_slurm_script_renders_srun(tmp_path, tasks_per_node, local_ids):
  assert {"--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@120"} <= set(
      sbatch_options(os.path.join(LAUNCH, "slurm.sbatch")))
  path = stubs(tmp_path, "srun", scontrol_hosts=("node003", "node004"))
  env = clean_env(PATH=path, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[003-004]",
                  SLURM_NNODES="2", SLURM_NTASKS_PER_NODE=tasks_per_node, SLURM_GPUS_ON_NODE="8")
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), *TRAIN_ARGS], env=env,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  srun = recorded(tmp_path, "srun")
  assert srun["argv"] == ["--kill-on-bad-exit=1", "--export=ALL", "python", "-m",
                          "jaxscale.train", *TRAIN_ARGS]
  address = f"node003:{61440 + 4242 % 4096}"
  assert srun["env"]["JAX_COORDINATOR_ADDRESS"] == address
  assert srun["env"].get("JAX_LOCAL_DEVICE_IDS") == local_ids
  # Task 5 of the step, as srun would start it on the second node.
  tasks = 2 * int(tasks_per_node)
  task_env = {**srun["env"], "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[003-004]",
              "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(tasks - 1),
              "SLURM_LOCALID": str(int(tasks_per_node) - 1)}
  cluster = distributed.detect(task_env)
  assert (cluster.source, cluster.num_processes, cluster.process_id, cluster.coordinator_address,
          cluster.detection) == ("slurm", tasks, tasks - 1, address, "slurm")


@pytest.mark.parametrize("per_host, np_, slots, local_ids", [
    ("1", 2, "a:1,b:1", "0,1,2,3,4,5,6,7"),
    ("8", 16, "a:8,b:8", None),
])
def test_mpirun_script_renders_mpirun(tmp_path, per_host, np_, slots, local_ids):
  env = clean_env(PATH=stubs(tmp_path, "mpirun"), HOSTS="a,b", GPUS_PER_HOST="8",
                  PROCESSES_PER_HOST=per_host, JAXSCALE_HEARTBEAT_TIMEOUT_S="30")
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "mpirun.sh"), *TRAIN_ARGS], env=env,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  argv = recorded(tmp_path, "mpirun")["argv"]
  assert argv[:6] == ["-np", str(np_), "--host", slots, "--map-by", "slot"]
  exports = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
  assert "JAX_COORDINATOR_ADDRESS=a:61234" in exports and "JAXSCALE_HEARTBEAT_TIMEOUT_S" in exports
  assert (f"JAX_LOCAL_DEVICE_IDS={local_ids}" in exports) == (local_ids is not None)
  assert argv[-len(TRAIN_ARGS) - 3:] == ["python", "-m", "jaxscale.train", *TRAIN_ARGS]
  # Rank 9 under Open MPI 5, with what mpirun exported.
  rank_env = {"OMPI_COMM_WORLD_SIZE": str(np_), "OMPI_COMM_WORLD_RANK": "1",
              "OMPI_COMM_WORLD_LOCAL_RANK": "1" if per_host == "8" else "0",
              **dict(e.split("=", 1) for e in exports if "=" in e)}
  cluster = distributed.detect(rank_env)
  assert (cluster.num_processes, cluster.process_id, cluster.coordinator_address) == (
      np_, 1, "a:61234")
  assert cluster.local_device_ids == ((1,) if per_host == "8" else None)


def test_tpu_vm_script_runs_the_same_command_on_all_workers(tmp_path):
  env = clean_env(PATH=stubs(tmp_path, "gcloud", "python3"), PROJECT="my-project",
                  JAXSCALE_INIT_TIMEOUT_S="900")
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "my-tpu", "us-central2-b",
                         *TRAIN_ARGS], env=env, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  argv = recorded(tmp_path, "gcloud")["argv"]
  assert argv[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b",
                       "--project=my-project", "--worker=all"]
  assert argv[-1].startswith("--command=")
  # Run the remote command here, as a worker's shell would, with ~/jaxscale in a temp HOME.
  (tmp_path / "home" / "jaxscale").mkdir(parents=True)
  remote = subprocess.run(["bash", "-c", argv[-1][len("--command="):]], timeout=30,
                          env=dict(env, HOME=str(tmp_path / "home")), capture_output=True, text=True)
  assert remote.returncode == 0, remote.stderr
  python = recorded(tmp_path, "python3")
  assert python["argv"] == ["-m", "jaxscale.train", *TRAIN_ARGS]  # quoting survived
  assert python["cwd"] == str(tmp_path / "home" / "jaxscale")
  assert python["env"]["JAXSCALE_DISTRIBUTED"] == "jax"
  assert python["env"]["JAXSCALE_INIT_TIMEOUT_S"] == "900"
  assert distributed.detect(python["env"]).source == "jax"


def test_jobset_manifest():
  with open(os.path.join(LAUNCH, "k8s", "jobset.yaml")) as f:
    service, jobset = yaml.safe_load_all(f)
  assert service["kind"] == "Service" and jobset["kind"] == "JobSet"
  name = jobset["metadata"]["name"]
  assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
  assert service["spec"]["selector"] == {"jobset.sigs.k8s.io/jobset-name": name}
  network = jobset["spec"]["network"]
  assert network["enableDNSHostnames"] and network["subdomain"] == service["metadata"]["name"]
  [workers] = jobset["spec"]["replicatedJobs"]
  job = workers["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
  [container] = job["template"]["spec"]["containers"]
  assert container["command"][:3] == ["python", "-m", "jaxscale.train"]
  env = {e["name"]: e for e in container["env"]}
  assert int(env["JAX_NUM_PROCESSES"]["value"]) == job["parallelism"] * workers["replicas"]
  assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
      "metadata.annotations['batch.kubernetes.io/job-completion-index']")
  # Process 0 is pod <jobset>-<replicatedJob>-0-0, named through the headless service.
  host, port = distributed.split_address(env["JAX_COORDINATOR_ADDRESS"]["value"])
  assert host == f"{name}-{workers['name']}-0-0.{network['subdomain']}"
  assert port in [p["port"] for p in service["spec"]["ports"]]
  assert port in [p["containerPort"] for p in container["ports"]]
  mounts = {m["name"] for m in container["volumeMounts"]}
  assert mounts <= {v["name"] for v in job["template"]["spec"]["volumes"]}
  # Pod 1 as Kubernetes starts it.
  pod_env = {k: e.get("value") for k, e in env.items()} | {"JAX_PROCESS_ID": "1",
                                                           "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
  cluster = distributed.detect(pod_env)
  assert (cluster.source, cluster.num_processes, cluster.process_id) == ("env", 2, 1)


def test_readme_covers_every_launcher():
  with open(os.path.join(LAUNCH, "README.md")) as f:
    readme = f.read()
  for name in ("local.py", "slurm.sbatch", "mpirun.sh", "tpu_vm.sh", "k8s/jobset.yaml"):
    assert f"launch/{name}" in readme, name
