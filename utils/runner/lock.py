"""One runner per output folder, also on a folder several machines share: a lock file records the runner's host and
pid, and its modification time is a heartbeat. It is taken over only when provably stale (README: its runner was on this
machine and its pid is gone, or its heartbeat stopped): no clock is compared across machines."""

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from utils.params import SHOWN_CHARS, shown
from utils.results import OK
from utils.runner import UsageError

HEARTBEAT_S = 5.0
STALE_BEATS = 3
PID_LIMIT = 2**31  # a pid is a C int (pid_t): a larger number names no process, and os.kill overflows on it
# What runners leave in --out beside the run folders, named here once (this module clears what a dead runner left):
OLD = ".old"  # .<run>.old: a run's previous folder while a finished one replaces it (execute)
RAY_MARKER = ".ray-driver"  # the Ray driver's token, and beside it its stop file (ray_cluster)


def temp_prefix(run_id: str) -> str:
    """The start of a run's temporary folder's name (.<run>.<random>), where it executes until it is put in place."""
    return f".{run_id}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def machine() -> str:
    """Which machine and pid namespace a pid belongs to: the host name, boot id and pid namespace (containers on one
    host share its name with separate pids; clusters repeat names)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def _holder(lock: Path) -> dict:
    """The lock's record; a bare pid (an older runner's lock) is a runner on this machine."""
    text = lock.read_text(errors="replace").strip()
    if text.isascii() and text.isdigit():
        return {"host": socket.gethostname(), "machine": machine(), "pid": int(text)}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid(holder: dict):
    """The record's pid, or None where it names none (absent, not an integer, out of a pid's range): damaged."""
    pid = holder.get("pid")
    return pid if type(pid) is int and 0 < pid < PID_LIMIT else None


def _stale(lock: Path) -> bool:
    """A pid of this machine and namespace: stale when it is gone. Another machine's runner, or a record being written or
    damaged (no valid pid of this machine): stale when nobody renewed it for STALE_BEATS heartbeats (or it is gone)."""
    holder = _holder(lock)
    if _pid(holder) and holder.get("machine") == machine():
        return not _alive(_pid(holder))
    try:
        before = lock.stat().st_mtime_ns
        time.sleep(STALE_BEATS * HEARTBEAT_S)
        return lock.stat().st_mtime_ns == before
    except FileNotFoundError:
        return True


def _who(holder: dict) -> str:
    """The runner a lock names, as far as its record says: '?' for what it lacks, a damaged host shortened."""
    host = holder.get("host", "?")
    host = host if isinstance(host, str) and host.isprintable() and len(host) <= SHOWN_CHARS else shown(host)
    return f"pid {_pid(holder) or '?'} on {host}"


def _beat(lock: Path, stop: threading.Event):
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(lock)


@contextlib.contextmanager
def batch_lock(out_dir: Path):
    """Hold out_dir's lock while the batch runs, renewing its heartbeat; UsageError when a live runner has it. What a dead
    runner left is cleared once the lock is held."""
    lock = out_dir / ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if lock.exists() and not lock.is_file():
                raise UsageError(f"{lock} is a folder (or another non-file), not a runner's lock file; remove it and "
                               "run again") from None
            if lock.exists() and not _stale(lock):
                raise UsageError(f"another runner ({_who(_holder(lock))}) is writing "
                               f"{out_dir}; wait for it to finish, or use another --name") from None
            lock.unlink(missing_ok=True)  # stale: its runner is gone
    mine = {"host": socket.gethostname(), "machine": machine(), "pid": os.getpid(), "heartbeat_s": HEARTBEAT_S,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with os.fdopen(fd, "w") as f:
        json.dump(mine, f)
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(lock, stop), daemon=True, name="lock heartbeat")
    beat.start()
    try:
        _clear_leftovers(out_dir)
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError, ValueError):
            if _holder(lock) == mine:  # never another runner's lock, taken over while this one was stopped
                lock.unlink()


def _finished_run(folder: Path) -> str:
    """The run id of a temporary run folder that holds a finished run (its run.json says ok), else ''."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        record = json.loads((folder / "run.json").read_text())
        run_id = record.get("run_id")
        if record.get("run_status") == OK and isinstance(run_id, str) and folder.name.startswith(temp_prefix(run_id)) \
                and "/" not in run_id and run_id.strip("."):
            return run_id
    return ""


def _clear_leftovers(out_dir: Path):
    """What a dead runner left: a finished run cut off as it replaced the one before (.<run>.old, no <run>) or not moved into
    place (a temporary folder whose run.json says ok) is put in place (--resume checks it); other temporary folders and an
    engine's files are removed."""
    for leftover in out_dir.glob(".*"):
        previous = out_dir / leftover.name[1:-len(OLD)]
        if leftover.name.endswith(OLD) and leftover.is_dir() and not previous.exists():
            leftover.rename(previous)
        elif leftover.is_dir() and not leftover.name.endswith(OLD) and (run_id := _finished_run(leftover)):
            shutil.rmtree(out_dir / run_id, ignore_errors=True)
            leftover.rename(out_dir / run_id)
        elif leftover.is_dir() and "." in leftover.name[1:]:
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.startswith(RAY_MARKER):
            leftover.unlink(missing_ok=True)
