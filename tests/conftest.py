"""Test set-up: 8 CPU devices, fixed before JAX starts its backend."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir holding Fashion-MNIST converted once from Debian's IDX files."""
  from jaxscale.data import fashion_mnist
  path = str(tmp_path_factory.mktemp("tfds"))
  fashion_mnist.prepare("/usr/share/datasets/fashion-mnist", path)
  return path


def run_main(args, capsys):
  """Runs `jaxscale-train` in-process; returns (exit status, last stderr line)."""
  from jaxscale import train
  with pytest.raises(SystemExit) as exit_info:
    train.main(args)
  err = capsys.readouterr().err.strip().splitlines()
  return exit_info.value.code, err[-1] if err else ""
