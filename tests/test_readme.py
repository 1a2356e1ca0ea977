"""README matches the project: its Python example runs, CI runs its test command verbatim."""
import os
import re

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_optim_example_runs_and_masks_norm_parameters():
  namespace = {}
  exec(re.findall(r"```python\n(.*?)```", README, re.S)[0], namespace)
  tx = namespace["tx"]
  params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))}, "BatchNorm_0": {"scale": jnp.ones(4)}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(2):  # step 0 of the warmup has a zero rate
    updates, state = tx.update(grads, state, params)
  assert float(jnp.abs(updates["Conv_0"]["kernel"]).max()) > 0


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
  test_command = next(c for c in commands[:2] if "pytest" in c)
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert test_command.strip() in ci
