"""Precise BN (Wu & Johnson 2021, arXiv 2105.07576): BatchNorm statistics recomputed with the
final weights, from batches of training data."""
from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from jaxscale import data
from jaxscale.metrics import log
from jaxscale.runners import Runner


_add_trees = jax.jit(functools.partial(jax.tree.map, jnp.add))


def precise_batch_stats(runner: Runner, state: Any, batches: Iterable[dict]) -> Any:
  """PreciseBN (Wu & Johnson 2021, arXiv 2105.07576): population statistics, weights fixed.

  Replaces every BatchNorm layer's running mean by the mean of its per-batch means over
  `batches` (this process's numpy parts of global batches), and its running variance by the
  mean of the per-batch variances, as the paper's PreciseBN does. Unlike the running averages
  of training, these come from the final weights alone, however few steps an epoch has.

  Args:
    runner: the runner that trained `state`.
    state: the state in the runner's device layout.
    batches: at least one batch.

  Returns:
    `state` with the new statistics, in the runner's device layout.
  """
  total, count = None, 0
  for batch in batches:
    stats = runner.batch_stats_step(state, runner.put_batch(batch))
    total = stats if total is None else _add_trees(total, stats)
    count += 1
  if not count:
    raise ValueError("precise_batch_stats needs at least one batch")
  averaged = jax.tree.map(lambda x: x / count, total)
  return runner.from_global_state(runner.global_state(state).replace(batch_stats=averaged))


def from_stream(pieces, state: Any) -> Any:
  """`precise_batch_stats` over `config.precise_bn_batches` training batches at the batch size
  in force, from a stream of its own (seed + 1): the training stream's position, and with it
  exact resume, is untouched."""
  config, size = pieces.config, pieces.batches.size_at(pieces.loader.position)
  loader = data.TrainLoader(pieces.dataset.train, seed=config.seed + 1,
                            workers=config.data_workers, prefetch=config.prefetch_batches,
                            transform=pieces.train_transform)
  state = precise_batch_stats(pieces.runner, state,
                              (loader.next_batch(size) for _ in range(config.precise_bn_batches)))
  if jax.process_index() == 0 and pieces.loader.position >= pieces.total_examples:
    log(f"precise BN: statistics from {config.precise_bn_batches} batches of {size}")
  return state
