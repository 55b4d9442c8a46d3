"""One run of the batch: a tier notebook executed by papermill in a temporary folder, its kernel its own process,
then moved into place. The same function runs under every engine (a thread of the runner, a Ray worker)."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from pathlib import Path

import nbformat
import papermill
from jupyter_client.manager import AsyncKernelManager
from papermill.exceptions import PapermillExecutionError
from traitlets import CaselessStrEnum, default

from utils.loop.checkpoint import PATTERN as CHECKPOINT_PATTERN
from utils.loop.stops import AGAIN, INTERRUPTED, SAME, STOP_WINDOW_S, StopSignals
from utils.params import ROOT, RUN_CONTROL, check_params, spec
from utils.results import OK, read_json, write_json_atomic
from utils.runner import Job
from utils.runner.lock import OLD, temp_prefix
from utils.tiers import TIERS

NOTEBOOK_DIR = ROOT / "notebooks"
KERNEL_LOG = "kernel.log"  # a run's kernel process's own log, kept in its folder when it wrote anything
NOT_STARTED, CRASHED = "not_started", "crashed"  # a summary row's run_status: a stop kept it from starting; it crashed
KERNEL_STOP = "KeyboardInterrupt in its kernel (a SIGTERM or Ctrl-C sent to it, or code that raised it)"
CHECKSUMS = "checksums"  # run.json's field of what the run wrote (not in its summary row)
KERNEL_START_TRIES = 3  # a kernel that dies before its first cell (ZeroMQ's port race when many start) is started again

_KERNELS = weakref.WeakSet()  # the kernel managers of this process's running notebooks: a stop is passed to them
_KERNELS_LOCK = threading.Lock()  # run threads add to it while a signal handler or a stop watcher reads it
STOP_LINE = (f"the running notebooks are stopped as by Ctrl-C (a fine-tuning run checkpoints first) and no further run "
             f"starts; a second stop more than {STOP_WINDOW_S:g} s later stops at once")
_STOP = []  # what asked this process to stop (SIGINT, SIGTERM, a driver's stop): read and cleared by the functions below
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
HANGUP = getattr(signal, "SIGHUP", None)


class LocalKernelManager(AsyncKernelManager):
    """A kernel over local sockets (ZeroMQ ipc) where the OS has them: a TCP kernel prints a transport warning into every run.
    Started in `run_cwd` with `run_env` (per run: parallel runs share this process's folder), its stderr to `stderr_path`."""
    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc" if os.name == "posix" else "tcp")
    stderr_path, run_cwd, run_env, ipc_prefix = None, None, {}, None

    @default("ip")
    def _ip_default(self):  # ipc's sockets at an absolute (and short: a socket path has ~100 bytes) path of their own
        return self.ipc_prefix if self.transport == "ipc" and self.ipc_prefix else super()._ip_default()

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        with _KERNELS_LOCK:
            _KERNELS.add(self)
        kw = {**kw, "env": {**kw.get("env", os.environ), **self.run_env}, **({"cwd": self.run_cwd} if self.run_cwd else {})}
        with open(self.stderr_path or os.devnull, "ab") as log, _ctrl_c_deliverable():
            await super()._async_launch_kernel(kernel_cmd, **kw, **({"stderr": log} if self.stderr_path else {}))


@contextlib.contextmanager
def _ctrl_c_deliverable():
    """SIGINT unblocked while a kernel is started: a child inherits blocked signals, and a Ray worker blocks SIGINT."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def run_notebook(source: Path, target: Path, kernel_log: Path = None, cwd: Path = None, env: dict = None, **kwargs):
    """papermill.execute_notebook on this environment's python3 kernel, a LocalKernelManager."""
    sockets = tempfile.mkdtemp(prefix="suite-kernel-")
    manager = type("RunKernelManager", (LocalKernelManager,), {"stderr_path": kernel_log, "run_cwd": str(cwd) if cwd else None,
                                                             "run_env": env or {}, "ipc_prefix": os.path.join(sockets, "ipc")})
    try:
        return papermill.execute_notebook(str(source), str(target), kernel_name="python3", kernel_manager_class=manager, **kwargs)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _signal_kernels(sig, group: bool = True):
    """`sig` to every running notebook's kernel (to its process group where it has one and `group` asks)."""
    with _KERNELS_LOCK:
        kernels = list(_KERNELS)
    for km in kernels:
        if not km.has_kernel:
            continue
        pgid, pid = getattr(km.provisioner, "pgid", None), getattr(km.provisioner, "pid", None)
        with contextlib.suppress(OSError):
            if group and pgid and hasattr(os, "killpg"):
                os.killpg(pgid, sig)
            elif pid:
                os.kill(pid, sig)


def kill_kernels():
    """A stop at once: no kernel outlives its runner."""
    _signal_kernels(getattr(signal, "SIGKILL", signal.SIGTERM))


def ask_stop(why: str):
    """Stop this process's runs as a signal would: the running notebooks get Ctrl-C, no further cell starts."""
    if not _STOP:
        _STOP.append(why)
    # Ctrl-C is SIGTERM to the kernel alone, which the set-up cell makes act as Ctrl-C (stops.sigterm_as_ctrl_c). Not SIGINT:
    # a scheduler that signals every process sends the kernel SIGTERM too, and two signals are one stop only when the same.
    _signal_kernels(signal.SIGTERM, group=False)


def stop_reason() -> str:
    """What first asked this process to stop ('SIGTERM', a driver's stop), or '' while none has."""
    return _STOP[0] if _STOP else ""


def clear_stop():
    """Forget the stop: a batch has ended, or a Ray worker starts its next task (a stop belongs to its own task)."""
    _STOP.clear()


@contextlib.contextmanager
def stops_passed_to_notebooks():
    """SIGINT, SIGTERM, SIGHUP (a closed terminal) of the runner: said in one line, passed to the running notebooks as Ctrl-C,
    no run starts after; those within STOP_WINDOW_S are one stop, a later one raises KeyboardInterrupt. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = StopSignals()

    def handler(signum, frame):
        kind = signals.take()
        if kind == AGAIN:
            raise KeyboardInterrupt
        if kind == SAME:
            return
        # To fd 2 itself: not through sys.stderr's buffer (or a notebook's stand-in); a closed terminal has no stderr left
        with contextlib.suppress(OSError):
            os.write(2, f"{signal.Signals(signum).name}: {STOP_LINE}\n".encode())
        if signum == HANGUP:
            _off_the_terminal()
        ask_stop(signal.Signals(signum).name)

    # nohup's ignored SIGHUP stays ignored: such a batch was asked to outlive its terminal
    stops = [s for s in STOP_SIGNALS if not (s == HANGUP and signal.getsignal(s) == signal.SIG_IGN)]
    previous = {s: signal.signal(s, handler) for s in stops}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        clear_stop()


def _off_the_terminal():
    """After a hang-up prints go nowhere: a write to the closed terminal raises EIO, ending the batch before it records runs."""
    with open(os.devnull, "wb") as null:
        for fd in (1, 2):
            try:
                os.write(fd, b"")  # a hung-up terminal refuses even this (and no longer says it is a terminal)
            except OSError:
                os.dup2(null.fileno(), fd)


class RunStopped(Exception):
    """A notebook not continued: this runner was asked to stop."""


def _cell_hook(run_folder: Path, started: list):
    """nbclient's on_cell_start: notes that a cell started (a failure after it is a finding, never retried). After a stop no
    cell starts before results.json is written (an idle kernel ignores Ctrl-C); those showing it run (tier 3 shows its stop)."""
    def hook(cell, cell_index):
        started.append(cell_index)
        if stop_reason() and not (run_folder / "results.json").exists():
            raise RunStopped(f"{stop_reason()} before cell {cell_index}")
    return hook


def run_digest(tier: int, params: dict) -> str:
    """A run's identity is its content: the tier and every parameter, defaults filled in (where it keeps its files aside:
    RUN_CONTROL). A parameter added later, at its default, or renamed (its former name kept) leaves finished runs' ids."""
    known = spec(tier)
    full = {known[k].formerly or k: v for k, v in check_params(tier, params).items()
            if k not in RUN_CONTROL and not (known[k].added and v == known[k].default)}
    return hashlib.sha256(json.dumps({"tier": tier, "parameters": full}, sort_keys=True).encode()).hexdigest()[:10]


def _read(path: Path, reader=read_json):
    """A record file's content, or a ValueError that says what is wrong with it."""
    try:
        return reader(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except Exception as e:
        raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def checksums(run_dir: Path, tier: int) -> dict:
    """What a run wrote, as run.json keeps it: each output file's sha256, so --resume trusts only the run's own files."""
    return {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
            for name in ("results.json", TIERS[tier].notebook) if (run_dir / name).is_file()}


def why_rerun(run_dir: Path, tier: int, params: dict):
    """None when run_dir holds exactly this run, complete and as it wrote it; else the reason to run it again."""
    try:
        record = _read(run_dir / "run.json")
        if not isinstance(record, dict):
            return f"{run_dir / 'run.json'} is corrupt (not a run record)"
        if record.get("digest") != run_digest(tier, params):
            return "its parameters changed"
        if record.get("run_status") != OK:
            return f"it ended {record.get('run_status')!r}"
        results = _read(run_dir / "results.json")
        if not isinstance(results, dict) or results.get("status") != record.get("verdict"):
            return f"{run_dir / 'results.json'} does not match run.json"
        _read(run_dir / TIERS[tier].notebook, lambda p: nbformat.read(p, as_version=4))
        kept = record.get(CHECKSUMS)
        if kept is None:  # a record from before checksums were kept: trusted as it was then (its files parse and agree)
            return None
        if not isinstance(kept, dict):
            return f"{run_dir / 'run.json'} is corrupt (its checksums are not a mapping of file names to sha256)"
        for name, digest in checksums(run_dir, tier).items():
            if kept.get(name) != digest:
                return f"{run_dir / name} is not the file the run wrote (its sha256 differs from run.json's)"
    except ValueError as e:
        return str(e)
    return None


def _replace_dir(new: Path, final: Path):
    """Put a finished run in place; the previous one is removed only once the new one is there."""
    old = final.with_name(f".{final.name}{OLD}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _notebook(tier: int, params: dict, tmp: Path, progress: bool, timeout: int, env: dict) -> int:
    """The tier's notebook, executed into tmp; returns how many kernel starts failed (each tried again)."""
    for failed in range(KERNEL_START_TRIES):
        started = []
        try:
            run_notebook(NOTEBOOK_DIR / TIERS[tier].notebook, tmp / TIERS[tier].notebook, kernel_log=tmp / KERNEL_LOG,
                         cwd=tmp, env=env, parameters={**params, "output_dir": "."}, progress_bar=progress,
                         execution_timeout=timeout, on_cell_start=_cell_hook(tmp, started))
            return failed
        except Exception as e:  # a cell's own error (PapermillExecutionError) is a finding, never retried
            if isinstance(e, PapermillExecutionError) or started or stop_reason() or failed + 1 == KERNEL_START_TRIES:
                raise
            with open(tmp / KERNEL_LOG, "a") as log:
                log.write(f"the kernel did not start ({type(e).__name__}: {e}); starting it again\n")


def base_row(run_id: str, tier: int, params: dict, where: dict = None) -> dict:
    """What every summary row says of its run, whatever became of it: its identity, parameters and where it ran."""
    return {"run_id": run_id, "tier": tier, "notebook": TIERS[tier].notebook, "digest": run_digest(tier, params),
            **{f"param.{k}": v for k, v in params.items()}, **(where or {}), "started_at": round(time.time(), 3)}


def unfinished_row(job: Job, status: str, why: str, where: dict = None) -> dict:
    """The row of a run that execute() did not record: an engine lost it (CRASHED: its thread or worker died), or a
    stop kept it from starting (NOT_STARTED: listed, so a stopped batch never reads as complete)."""
    return {**base_row(job.run_id, job.tier, job.params, where), **_unfinished(status, why)}


def execute(run_id: str, tier: int, params: dict, out_dir: Path, progress: bool = False, timeout: int = None,
            env: dict = None, where: dict = None) -> dict:
    """Execute one notebook in a temporary folder, then move it to out_dir/run_id; `env` is added to the kernel's environment
    (threads, GPU), `where` (engine, node, GPU, threads) to the row. A crash, timeout or file-system error is recorded in the
    row, never raised; a finished run that could not be moved stays in its temporary folder for the next runner (lock)."""
    row, t0, tmp, finished = base_row(run_id, tier, params, where), time.perf_counter(), None, False
    # Checkpoints live beside the run folders, not in the temporary one: they must outlive an interrupted run. The path is
    # the notebook's own (its folder and the temporary one are both in out_dir), so a copy rerun elsewhere writes beside it.
    keep = {"checkpoint_dir": os.path.join("..", "checkpoints", run_id)} if "checkpoint_dir" in spec(tier) else {}
    ended = lambda: {"duration_s": round(time.perf_counter() - t0, 2), "ended_at": round(time.time(), 3)}
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=temp_prefix(run_id)))
        try:
            retries = _notebook(tier, {**keep, **params}, tmp, progress, timeout, env)
            row.update(_finished(read_json(tmp / "results.json")), kernel_start_retries=retries)
        except Exception as e:  # a failing notebook must not stop the others (a second Ctrl-C is no Exception)
            row.update(_failed(e, timeout, tmp / ({**keep, **params}.get("checkpoint_dir") or ".")))
        row.update(ended())
        if (tmp / KERNEL_LOG).exists() and not (tmp / KERNEL_LOG).stat().st_size:
            (tmp / KERNEL_LOG).unlink()
        finished = row["run_status"] == OK
        write_json_atomic(tmp / "run.json", {**row, CHECKSUMS: checksums(tmp, tier)})
        if row["run_status"] == INTERRUPTED and why_rerun(out_dir / run_id, tier, params) is None:
            shutil.rmtree(tmp)  # a complete earlier run of the same parameters stays: nothing finished is lost
        else:
            _replace_dir(tmp, out_dir / run_id)
    except OSError as e:  # the file system failed this run: its problem, not the batch's
        kept = "" if not finished else (
            f"; its finished results are kept in {tmp}, which the next run into {out_dir} puts in place"
            if (tmp / "run.json").exists() else f"; its finished results are in {tmp} without their run.json, so the "
            f"next run into {out_dir} removes that folder: copy what you need first")
        row.update(_unfinished(CRASHED, f"file system: {e}{kept}"), **ended())
        if tmp is not None and not finished:
            shutil.rmtree(tmp, ignore_errors=True)
    return row


def _finished(results: dict) -> dict:
    """A row's fields from a run's results.json: its verdicts, figures and, when it stopped early, why."""
    stop = results.get("figures", {}).get("stop") or {}
    row = {"run_status": INTERRUPTED if stop.get("reason") == INTERRUPTED else OK, "error": stop.get("message", ""),
           "verdict": results["status"], "timing_failed": any(v["timing"] and v["status"] == "fail" for v in results["verdicts"]),
           "threads": results.get("record", {}).get("threads")}
    row.update({f"verdict.{v['check']}": v["status"] for v in results["verdicts"]})
    return {**row, **{k: v for k, v in results.get("figures", {}).items() if k != "stop"}}  # its message is the error


def _failed(e: BaseException, timeout: int, checkpoints: Path) -> dict:
    """A row's fields for a notebook stopped (by this runner, or its kernel by a signal of its own), timed out or crashed."""
    stop = stop_reason() or (KERNEL_STOP if getattr(e, "ename", "") == "KeyboardInterrupt" else "")
    if stop:
        saved = any(checkpoints.rglob(CHECKPOINT_PATTERN))
        status, error = INTERRUPTED, (f"{stop} stopped it before it wrote its results (--resume runs it again"
                                      + (", from its checkpoints)" if saved else ")"))
    elif isinstance(e, TimeoutError):  # nbclient's CellTimeoutError; a cell's own error is PapermillExecutionError
        status, error = "timeout", f"no cell may run longer than --timeout {timeout} s"
    else:
        status, error = CRASHED, f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', None) or e}".strip()[:500]
    return _unfinished(status, error)


def _unfinished(status: str, error: str) -> dict:
    """A row's fields for a run that has no verdict: how it ended and why."""
    return {"run_status": status, "verdict": None, "timing_failed": False, "error": error}
