"""One run per workdir: process 0 of a run holds an exclusive lock on WORKDIR/.lock while it runs.

The lock is an flock(2) on the open file, so the OS releases it when the process ends, however it ends
(an exception, a crash, SIGKILL): the file a dead run leaves behind names it but blocks nothing, and
resuming after a crash is the same command again. The file is never deleted, since removing it while
another process has it open would let two runs lock two different files.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket

from absl import logging

# The lock file's name in the workdir.
LOCK_FILE = ".lock"


class WorkdirInUse(RuntimeError):
  """A live process holds the workdir's lock."""


class WorkdirLock:
  """The held lock of `path` (fd None: the filesystem cannot lock, nothing is held); `release` or `with`."""

  def __init__(self, path: str, fd: int | None):
    self.path = path
    self._fd = fd

  def release(self) -> None:
    """Empties the lock file (a stale pid is never shown) and unlocks it; a second call does nothing."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    os.ftruncate(fd, 0)
    os.close(fd)  # closing the last descriptor of the open file releases the flock

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def acquire(workdir: str) -> WorkdirLock:
  """Locks `workdir` (an existing folder) for this process and writes its pid and host into WORKDIR/.lock.

  Raises WorkdirInUse, naming the holder's pid and host, when another process holds the lock. On a
  filesystem without flock (some FUSE mounts) it warns and returns a lock that holds nothing.
  """
  path = os.path.join(workdir, LOCK_FILE)
  # Opened without O_TRUNC: the holder's pid and host must survive a refused attempt.
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(fd)
    os.close(fd)
    raise WorkdirInUse(
      f"another run (pid {holder.get('pid', '?')}, host {holder.get('host', '?')}) is using {workdir}; "
      "wait for it to end or stop it, or give this run another --workdir."
    ) from None
  except OSError as e:
    os.close(fd)
    logging.warning("cannot lock %s (%s): a second run on this workdir would not be detected", path, e)
    return WorkdirLock(path, None)
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n")
  return WorkdirLock(path, fd)


def _read_holder(fd: int) -> dict:
  """The {"pid", "host"} the holder wrote; {} while it has not written them yet."""
  try:
    holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}
