"""One run per workdir: the lock file `<workdir>/run.lock` a training run holds while it writes there.

Two runs writing into one workdir (a notebook cell run again while the first is still going, two
terminals) would interleave their checkpoints and history. `WorkdirLock.acquire` creates the lock
file with `O_CREAT | O_EXCL`, which exactly one creator wins on a local disk, on NFS (v3 and later)
and on FUSE mounts such as Colab's Drive, where `flock` may not be enforced; the file names its
holder (pid, host, when it started). A second run finds it and stops with one line naming the
holder. A lock whose holder is gone (its pid no longer runs on this host) is taken over, saying
so; a holder on another host is never judged from here, so its lock stays until that run ends or
someone who knows it is gone deletes the file (the message says which).

A process that must end at once (SIGTERM in a multi-process run: `rendezvous.py`) releases the
locks it holds with `release_held`.

What it cannot see: two hosts that do not share the filesystem's view of the file (two machines
syncing a folder, not mounting it), and two hosts with the same host name. Reading only (evaluate)
takes no lock.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
from collections.abc import Callable

LOCK_FILE = "run.lock"
# Attempts at the exclusive create: each lost race (a lock taken over or released by another run
# in between) is one more.
_ATTEMPTS = 3
# The locks this process holds now (`release_held`).
_HELD: set[WorkdirLock] = set()


class WorkdirLockedError(ValueError):
    """Another run holds the workdir's lock."""


class WorkdirLock:
    """The lock of one workdir, held from `acquire` to `release`."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._held: bytes | None = None  # what this process wrote into the lock file

    def acquire(self, *, say: Callable[[str], None]) -> None:
        """Creates the workdir (if need be) and its lock file; raises WorkdirLockedError while a
        live run holds it, and takes over (saying so with `say`) a lock whose holder is gone."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        mine = json.dumps(_this_process()).encode()
        found = None
        for _ in range(_ATTEMPTS):
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                found = _read(self.path)
                if found is None:  # released meanwhile
                    continue
                holder = _holder(found)
                if holder is None or not _is_gone(holder):
                    raise WorkdirLockedError(self._in_use(holder)) from None
                if _take_over(self.path, found):
                    say(
                        f"taking over {self.path} from {_describe(holder)}, which is no longer "
                        "running"
                    )
                continue
            with os.fdopen(descriptor, "wb") as file:
                file.write(mine)
                file.flush()
                os.fsync(file.fileno())
            self._held = mine
            _HELD.add(self)
            return
        raise WorkdirLockedError(self._in_use(_holder(found) if found else None))

    def release(self) -> None:
        """Deletes the lock file if this process holds it (a no-op otherwise)."""
        if self._held is not None and _read(self.path) == self._held:
            self.path.unlink(missing_ok=True)
        self._held = None
        _HELD.discard(self)

    def _in_use(self, holder: dict | None) -> str:
        who = (
            _describe(holder)
            if holder is not None
            else "a process it does not name (the file is empty or unreadable)"
        )
        return (
            f"--workdir {self.workdir} is in use by another run: {who} holds {self.path}; wait "
            f"for it to end or choose another --workdir (once that run is known to be gone, "
            f"delete {self.path})"
        )


def release_held() -> None:
    """Releases every lock this process holds: for a process about to end without unwinding."""
    for lock in list(_HELD):
        lock.release()


def _this_process() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
        "process_start": _process_start(os.getpid()),
    }


def _describe(holder: dict) -> str:
    return f"pid {holder['pid']} on host {holder['host']} (started {holder['started']})"


def _read(path: pathlib.Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _holder(content: bytes) -> dict | None:
    """The holder a lock file names, or None when it names none (half written, or not ours)."""
    try:
        holder = json.loads(content)
        return {
            **holder,
            "pid": int(holder["pid"]),
            "host": holder["host"],
            "started": holder["started"],
        }
    except (ValueError, KeyError, TypeError):
        return None


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux), so that a pid the system
    gave to a new process is not mistaken for the holder; None where /proc does not say."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the fields after the command name, which is in parentheses and may
    # hold spaces, start at field 3.
    return stat.rsplit(")", 1)[1].split()[19]


def _is_gone(holder: dict) -> bool:
    """Whether the holder certainly no longer runs: on this host, and its pid is free (or now
    another process's). A holder on another host is never judged gone."""
    if holder["host"] != socket.gethostname():
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    recorded = holder.get("process_start")
    return recorded is not None and _process_start(pid) not in (None, recorded)


def _take_over(path: pathlib.Path, stale: bytes) -> bool:
    """Removes the stale lock file holding `stale`; False when another run took it over first.

    A rename is atomic, so of two runs taking over at once one moves the stale file and the other
    finds nothing to move (or, having lost the race, moves the winner's new lock and puts it back).
    """
    aside = path.with_name(f"{path.name}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if aside.read_bytes() != stale:
        os.rename(aside, path)
        return False
    aside.unlink()
    return True
