"""XLA options that overlap gradient reductions with the backward pass and fuse small ones (GPU).

Set through XLA_FLAGS before JAX starts its backend, only where a GPU backend is expected (they
do nothing for CPU and TPU), never overriding a value the user already put in XLA_FLAGS. The
trainer logs what it applied. `config.xla_gpu_overlap=False` turns them off.
"""
from __future__ import annotations

import importlib.util
import os
from typing import MutableMapping

GPU_OVERLAP_FLAGS = {
    # Schedule asynchronous collectives around compute: the all-reduce of one layer's gradients
    # runs while the backward pass of the layers before it computes (Fujitsu's overlap).
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # Combine the many small per-parameter all-reduces into buckets of up to 64 MiB (Fujitsu
    # packed gradients into MB-sized buckets): fewer, larger messages amortize latency.
    "xla_gpu_all_reduce_combine_threshold_bytes": str(64 * 2**20),
    # Run collectives on the highest-priority stream so compute kernels do not delay them.
    "xla_gpu_enable_highest_priority_async_stream": "true",
}


def gpu_expected(environ: MutableMapping[str, str] = os.environ) -> bool:
  """True when JAX will start a CUDA backend: a CUDA plugin is installed and not excluded."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and not any(p in platforms for p in ("cuda", "gpu")):
    return False
  return any(importlib.util.find_spec(name) is not None
             for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def apply_gpu_overlap_flags(environ: MutableMapping[str, str] = os.environ,
                            gpu: bool | None = None) -> list[str]:
  """Appends GPU_OVERLAP_FLAGS to XLA_FLAGS; returns the `name=value` items it added."""
  if not (gpu_expected(environ) if gpu is None else gpu):
    return []
  current = environ.get("XLA_FLAGS", "")
  added = [f"{name}={value}" for name, value in GPU_OVERLAP_FLAGS.items()
           if f"--{name}=" not in current]
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *(f"--{item}" for item in added)]).strip()
  return added
