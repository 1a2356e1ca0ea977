"""A run's workdir: checked before anything is written, held by one run at a time.

`check` finds everything that would stop a run from using the workdir (a file in its place, a
file above it, no write permission or a read-only mount, a config.json of a different config)
and raises one line. `Lock` is held by the run's writer (process 0) for the run's whole life:
a second run on the same workdir gets one line naming the holder's host and pid and touches
nothing. The lock is `fcntl.lockf` on `WORKDIR/.lock`, which the kernel releases when its
process ends, however it ends, so a lock left by a dead process is simply taken over (on NFS,
this needs working POSIX locks: NFSv4, or v3 with lockd). The file is never deleted: deleting a
lock file races with the next run taking it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from jaxscale import config as config_lib
from jaxscale.errors import ConfigError, WorkdirError, WorkdirInUse
from jaxscale.metrics import log

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"


def check(workdir: str, config_json: str) -> None:
  """Raises WorkdirError (or ConfigError for another run's config) if the run cannot use it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir!r} is a file, not a directory")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"workdir {workdir!r} cannot be created: {existing!r} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {workdir!r} is not writable ({existing!r}: read-only file "
                       f"system or no permission)")
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      raise WorkdirError(f"workdir {workdir!r}: {CONFIG_FILE} cannot be read ({e}); move it "
                         f"away to start over") from None
    changed = config_lib.changed_keys(old, json.loads(config_json))
    if changed:
      raise ConfigError(f"workdir {workdir!r} holds a run of a different config (keys differ: "
                        f"{', '.join(changed)}); use another --workdir")


def write_config(workdir: str, config_json: str) -> None:
  """Writes config.json once, atomically (a reader never sees half a file)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    return
  with open(path + ".tmp", "w") as f:
    f.write(config_json + "\n")
  os.replace(path + ".tmp", path)


class Lock:
  """The workdir's lock, held from `acquire` to `release` (see the module docstring)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Creates the workdir if needed and takes the lock; WorkdirInUse if a live run has it."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise WorkdirInUse(f"workdir {os.path.dirname(self.path)!r} is in use by a run of "
                         f"{holder} (lock {self.path}); wait for it to end or use another "
                         f"--workdir") from None
    left = os.pread(fd, 400, 0).decode(errors="replace").strip()
    if left:
      log(f"taking over the workdir lock left by {left}, which no longer runs")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    """Empties the file (a clean end) and releases the lock."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass  # a full or read-only disk: the kernel still releases the lock below
    os.close(self._fd)
    self._fd = None
