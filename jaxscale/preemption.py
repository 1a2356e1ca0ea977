"""Preemption: SIGTERM and SIGINT make every process of a run stop at the same step boundary.

The trainer then saves a checkpoint there, waits for the write, and exits with
`errors.EXIT_PREEMPTED` (75, sysexits' EX_TEMPFAIL): rerunning the same command resumes.
"""
from __future__ import annotations

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxscale.errors import EXIT_PREEMPTED, JaxscaleError
from jaxscale.metrics import log


class Preempted(JaxscaleError):
  """The run stopped after a preemption signal, with a complete checkpoint at `step`."""

  exit_status = EXIT_PREEMPTED

  def __init__(self, step: int, path: str, then: str = "resume"):
    super().__init__(f"preempted: saved step {step} to {path}; rerun the same command to {then}")
    self.step, self.path = step, path


class PreemptionWatch:
  """SIGTERM and SIGINT set a flag; `stop_requested` gives all processes one answer per boundary.

  The answer is a max over every device's copy of its process's flag, computed as a tiny
  collective on the mesh and read one step boundary later: the host never waits for more than
  the step in flight, and since every process reads the result of the same collective, all stop
  at the same step. A second SIGINT interrupts at once. The handlers are installed on creation
  (from the main thread; signals reach no other) and put back by `close`.
  """

  def __init__(self, mesh: Mesh):
    self._signal = None  # the name of the first signal received
    self._logged = False
    self._num_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    self._sharding = NamedSharding(mesh, P(mesh.axis_names))
    self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._pending = None
    self._previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous_handlers[signum] = signal.signal(signum, self._handle)

  def close(self) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}

  def _handle(self, signum, frame) -> None:  # no I/O here: it may interrupt a write to stderr
    if self._signal and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self._signal = self._signal or signal.Signals(signum).name

  def _dispatch(self) -> jax.Array:
    if self._signal and not self._logged:
      log(f"received {self._signal}: saving a checkpoint at the next step boundary")
      self._logged = True
    flags = np.full((self._num_local,), self._signal is not None, np.int32)
    return self._any(jax.make_array_from_process_local_data(self._sharding, flags))

  def stop_requested(self, *, now: bool = False) -> bool:
    """Call at every step boundary, on every process: True when the run should stop here.

    `now` reads a fresh answer instead of the one from the previous boundary (after the loop).
    """
    previous, self._pending = self._pending, self._dispatch()
    if now:
      previous, self._pending = self._pending, None
    return previous is not None and bool(previous.addressable_data(0))
