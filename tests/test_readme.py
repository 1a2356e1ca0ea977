"""README matches the project: its examples run, CI runs its test command verbatim."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BASH = re.findall(r"```bash\n(.*?)\n```", README, re.S)


def test_optim_example_runs_and_masks_norm_parameters():
  example = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "tx =" in b)
  namespace = {}
  exec(example, namespace)
  tx = namespace["tx"]
  params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))}, "BatchNorm_0": {"scale": jnp.ones(4)}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(2):  # step 0 of the warmup has a zero rate
    updates, state = tx.update(grads, state, params)
  assert float(jnp.abs(updates["Conv_0"]["kernel"]).max()) > 0


def test_ci_runs_the_readme_test_command():
  test_command = next(c for c in BASH[:2] if "pytest" in c)
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert test_command.strip() in ci


def test_guide_cli_command_runs_as_written(tmp_path, tfds_dir):
  """`jaxscale-train --config=examples/custom_model/config.py ...` from a fresh clone's root,
  shortened to 30 steps (the whole epoch is measured in README)."""
  command = next(c for c in BASH if "examples/custom_model/config.py" in c)
  args = shlex.split(command.replace("workdirs/custom", str(tmp_path / "custom")))
  assert args[0] == "jaxscale-train"
  args = [sys.executable, "-m", "jaxscale.train", *args[1:], "--config.num_train_steps=30",
          "--config.eval_every_epochs=0.0", f"--config.data_dir={tfds_dir}",
          "--config.progress_bar=off"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH="")  # the model is found through the config's directory alone
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "models:SmallCNN (classification) on fashion_mnist" in proc.stderr
  events = [json.loads(l) for l in open(tmp_path / "custom" / "metrics.jsonl")]
  assert events[-1]["split"] == "eval" and events[-1]["accuracy"] > 0.5  # chance: 0.1


def test_guide_python_example_runs(tmp_path, monkeypatch):
  command = next(c for c in BASH if "train_numpy.py" in c)
  path = os.path.join(ROOT, shlex.split(command)[1])
  monkeypatch.syspath_prepend(os.path.dirname(path))  # as `python FILE` would
  spec = importlib.util.spec_from_file_location("train_numpy", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = module.main(str(tmp_path / "numpy"), steps=30)
  assert result["num_examples"] == 10000 and result["accuracy"] > 0.5
