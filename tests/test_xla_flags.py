"""The GPU overlap flags: applied only for a GPU backend, never over the user's own values."""
import os
import subprocess
import sys

from jaxscale import xla_flags


def test_not_applied_without_a_gpu():
  env = {"JAX_PLATFORMS": "cpu"}
  assert xla_flags.apply_gpu_overlap_flags(env) == [] and "XLA_FLAGS" not in env


def test_applied_for_a_gpu_keeping_user_values():
  env = {"XLA_FLAGS": "--xla_gpu_all_reduce_combine_threshold_bytes=1024"}
  added = xla_flags.apply_gpu_overlap_flags(env, gpu=True)
  assert "xla_gpu_enable_latency_hiding_scheduler=true" in added
  assert not any(a.startswith("xla_gpu_all_reduce_combine") for a in added)
  assert env["XLA_FLAGS"].count("xla_gpu_all_reduce_combine_threshold_bytes") == 1
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
  assert xla_flags.apply_gpu_overlap_flags(env, gpu=True) == []  # idempotent


def test_flag_names_exist_in_this_xla():
  """XLA aborts on an unknown flag; a misspelt name would crash every GPU run."""
  env = {"XLA_FLAGS": ""}
  xla_flags.apply_gpu_overlap_flags(env, gpu=True)
  for bad in ("", " --xla_gpu_no_such_flag=true"):
    proc = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env=dict(os.environ, XLA_FLAGS=env["XLA_FLAGS"] + bad, JAX_PLATFORMS="cpu"),
        capture_output=True, timeout=120)
    assert (proc.returncode == 0) == (bad == ""), proc.stderr[-500:]
