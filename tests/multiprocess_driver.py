"""Test helper: one process of a multi-process run of the real `jaxscale.train.main`, recorded.

    python tests/multiprocess_driver.py OUT_DIR --config=... --workdir=... [--config.k=v ...]

`train.main` joins the run from the JAX_* variables the launcher sets, as it would from the CLI.
Around it, this records what the process did and writes OUT_DIR/process_<i>.json: the indices of
the train and eval records it read, and the mesh as rows of process indices. After the run, the
final parameters and BatchNorm statistics are gathered on every process
(`multihost_utils.process_allgather`) and process 0 writes them to OUT_DIR/params.npz.
With MULTIPROCESS_DRIVER_FAIL=<i>, process i raises an error before its third training step,
while the others wait for it in the step's collectives.
"""
import dataclasses
import json
import os
import sys
import threading
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxscale import build, data, train


class RecordingSource(Sequence):
  """A source that notes every index read from it (grain reads from a background thread)."""

  def __init__(self, source, reads: list):
    self._source, self._reads, self._lock = source, reads, threading.Lock()

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    with self._lock:
      self._reads.append(int(index))
    return self._source[index]


def record(out: dict) -> None:
  """Wraps what `train.run` calls, so that `out` receives the reads, the mesh and the result."""
  load_dataset, create_mesh, run = data.load_dataset, build.create_mesh, train.run
  out.update(train_reads=[], eval_reads=[])

  def recording_load_dataset(config):
    dataset = load_dataset(config)
    return dataclasses.replace(dataset, train=RecordingSource(dataset.train, out["train_reads"]),
                               eval=RecordingSource(dataset.eval, out["eval_reads"]))

  def recording_create_mesh(*args, **kwargs):
    mesh = create_mesh(*args, **kwargs)
    out.setdefault("mesh", mesh)
    return mesh

  def recording_run(config, workdir):
    out["result"] = run(config, workdir)
    return out["result"]

  data.load_dataset, build.create_mesh, train.run = (
      recording_load_dataset, recording_create_mesh, recording_run)
  if os.environ.get("MULTIPROCESS_DRIVER_FAIL") == os.environ.get("JAX_PROCESS_ID"):
    data.TrainLoader = FailingLoader  # (jax.process_index() would start JAX too early here)


class FailingLoader(data.TrainLoader):

  def next_batch(self, global_batch_size):
    if self.position == 2 * global_batch_size:
      raise RuntimeError(f"injected failure in process {jax.process_index()}")
    return super().next_batch(global_batch_size)


def main(out_dir: str, argv: list[str]) -> None:
  out = {}
  record(out)
  train.main(argv)
  mesh, state = out["mesh"], out["result"]["state"]
  rows = mesh.devices.reshape(-1, mesh.devices.shape[-1])
  info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_device_count": jax.local_device_count(), "mesh_axes": list(mesh.axis_names),
          "mesh_rows": [[d.process_index for d in row] for row in rows],
          "train_reads": out["train_reads"], "eval_reads": out["eval_reads"]}
  with open(os.path.join(out_dir, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(info, f)
  tree = {"params": state.params, "batch_stats": state.batch_stats}
  gathered = multihost_utils.process_allgather(tree, tiled=True)  # a collective: all call it
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(gathered)}
    np.savez(os.path.join(out_dir, "params.npz"), **flat)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
