"""Batch runner: executes the tier notebooks with papermill and collects one summary.

    python -m utils.run                                   # all three tiers, built-in tiny model, CPU or GPU
    python -m utils.run --tiers 3 -p model=gpt-small -p steps=100
    python -m utils.run --tiers 3 --grid sweep.yaml       # every combination of the grid's lists
    python -m utils.run --name nightly --resume           # skip runs that already completed

Everything lands in runs/<name>/: one folder per run (the executed notebook, results.json, charts),
summary.csv with a row per run, and summary.png, a grid of every verdict.

-p values are Python literals where they are one (3, 1e-3, [1, 2]), else text (gpt-small); each is
checked against the tier's parameter spec (utils/params.py, listed below) before anything runs.
A grid file is YAML: each key a notebook parameter, each list an axis of the cross product:
    model: [gpt-tiny, gpt-small]
    precision: [bf16-mixed, 16-mixed]
    batch_size: [8, 16]
    lr: 0.001            # a scalar is the same for every run
To pass a list-valued parameter (batch_sizes, strengths) as one value, nest it: [[1, 2, 4]].
Parameters that a tier does not have are not passed to it; a name no selected tier knows, a value of the
wrong type or range, a device this machine lacks, or a grid of more than --max-runs runs (counted before it
is expanded) is rejected before anything runs.

Each run's folder name ends in a digest of its tier and full parameters: its identity is its content.
A run executes in a temporary folder and replaces its previous outputs only when it finishes, so an
interrupted batch loses nothing that had finished; summary.csv is rewritten after every run. --resume
skips a run only when its recorded digest, run.json, results.json and notebook are complete, valid and
agree; any other run is redone and its summary row says why, and tier 3 continues its fine-tuning
runs from their newest checkpoints (resume=True; kept in runs/<name>/checkpoints/<run>, see
checkpoint_every). Ctrl-C or SIGTERM of the runner is passed to the running notebook as Ctrl-C (a fine-tuning
run checkpoints first); the run is recorded as 'interrupted' and no further run starts; a second Ctrl-C stops
at once. A kernel's own log goes to its run's kernel.log. One runner per output folder at a time (a lock file
with the runner's pid; a stale one is taken over).

Exit code: 0 when every notebook ran, 1 when any was interrupted, crashed or timed out (its executed notebook keeps the
error cell, its summary row names the exception), 2 for bad arguments. --fail-on-verdict also exits 1
when a non-timing check fails, --fail-on-timing when a timing check does (they vary with load).
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import matplotlib
import nbformat
import pandas as pd
import papermill
import yaml
from jupyter_client.manager import AsyncKernelManager
from matplotlib import pyplot as plt
from traitlets import CaselessStrEnum

from utils.params import ROOT, RUN_CONTROL, TIER_PARAMS, ParamError, check_params, coerce, spec
from utils.loop.stops import INTERRUPTED
from utils.plotting import plot_verdict_grid
from utils.results import read_json, write_json_atomic
from utils.tiers import TIERS

NOTEBOOK_DIR = ROOT / "notebooks"
MAX_RUNS = 1000  # a grid larger than this is a typo more often than a plan: --max-runs raises it
KERNEL_LOG = "kernel.log"  # a run's kernel process's own log, kept in its folder when it wrote anything


_KERNELS = weakref.WeakSet()  # the kernel managers of this process's running notebooks: a stop is passed to them
_STOP = []  # the signals that asked this runner to stop (SIGINT, SIGTERM), in order


class LocalKernelManager(AsyncKernelManager):
    """The notebooks' kernel talks to this process over local sockets (ZeroMQ ipc) where the OS has them, not over
    TCP: nothing outside the machine needs to reach it, and a TCP kernel prints a transport warning into every run.
    With `stderr_path` set, the kernel process's own stderr (ipykernel's log; a cell's output goes to the notebook)
    goes to that file, not to the runner's terminal: a kernel shut down mid-cell logs a ZMQError traceback there."""
    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc" if os.name == "posix" else "tcp")
    stderr_path = None

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        _KERNELS.add(self)
        with open(self.stderr_path or os.devnull, "ab") as log:
            await super()._async_launch_kernel(kernel_cmd, **kw, **({"stderr": log} if self.stderr_path else {}))


def run_notebook(source: Path, target: Path, kernel_log: Path = None, **kwargs):
    """papermill.execute_notebook on the python3 kernel of this environment, over local sockets; the kernel's
    own log goes to `kernel_log` when given."""
    manager = type("RunKernelManager", (LocalKernelManager,), {"stderr_path": kernel_log}) if kernel_log else LocalKernelManager
    return papermill.execute_notebook(str(source), str(target), kernel_name="python3",
                                      kernel_manager_class=manager, **kwargs)


def _interrupt_kernels():
    """Ctrl-C for every running notebook, as a user at its keyboard would press it: SIGINT to the kernel's process
    group. Tier 3's loop then checkpoints and returns (utils.loop.stops); a cell elsewhere ends in KeyboardInterrupt."""
    for km in list(_KERNELS):
        if not km.has_kernel:
            continue
        pgid, pid = getattr(km.provisioner, "pgid", None), getattr(km.provisioner, "pid", None)
        with contextlib.suppress(OSError):
            if pgid and hasattr(os, "killpg"):
                os.killpg(pgid, signal.SIGINT)
            elif pid:
                os.kill(pid, signal.SIGINT)


@contextlib.contextmanager
def stops_passed_to_notebooks():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, Colab's stop) of the runner: said in one line, passed
    to the running notebook as Ctrl-C, and no further run starts. A second signal stops the runner at once
    (KeyboardInterrupt). Python allows signal handlers only in the main thread; elsewhere signals act as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _STOP:
            raise KeyboardInterrupt
        _STOP.append(signal.Signals(signum).name)
        # To file descriptor 2 itself: a signal handler must not go through sys.stderr's buffer (or a notebook's stand-in)
        os.write(2, f"{_STOP[0]}: the running notebook is stopped as by Ctrl-C (a fine-tuning run checkpoints first) "
                 "and no further run starts; press Ctrl-C again to stop at once\n".encode())
        _interrupt_kernels()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP.clear()


def _no_cell_after_a_stop(run_folder: Path):
    """nbclient's on_cell_start hook: once a stop was asked, no cell starts before the run has written its results
    (a Ctrl-C between two cells would be lost: the kernel ignores it while idle). After, the cells that only
    show the results still run, so an interrupted tier 3 notebook shows its stop."""
    def hook(cell, cell_index):
        if _STOP and not (run_folder / "results.json").exists():
            raise RunStopped(f"{_STOP[0]} before cell {cell_index}")
    return hook


class RunStopped(Exception):
    """A notebook not continued because this runner was asked to stop."""


class UsageError(ValueError):
    """Bad arguments: reported before any notebook runs."""


def parse_assignments(pairs) -> dict:
    """-p name=value pairs, values coerced as Python literals where they are one."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"parameter {pair!r} is not name=value")
        params[name.strip()] = coerce(value)
    return params


class _GridLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a parameter given twice is an error, not the later value silently."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key in lines:
                raise UsageError(f"parameter {key!r} is given twice (lines {lines[key]} and {line}); expected each once")
            lines[key] = line
        return super().construct_mapping(node, deep)


def read_grid(path: Path) -> dict:
    """A grid file's mapping, or a UsageError that names the file and what is wrong with it."""
    if not path.exists():
        raise UsageError(f"grid file {str(path)!r} does not exist")
    if not path.is_file():
        raise UsageError(f"grid file {str(path)!r} is a folder, not a file; expected a YAML file")
    try:
        grid = yaml.load(path.read_bytes().decode("utf-8"), Loader=_GridLoader)
    except UnicodeDecodeError as e:
        raise UsageError(f"grid file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "expected a YAML file saved as UTF-8") from None
    except UsageError as e:
        raise UsageError(f"grid file {str(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"grid file {str(path)!r} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    grid = {} if grid is None else grid
    if not isinstance(grid, dict) or not all(isinstance(k, str) for k in grid):
        raise UsageError(f"grid file {str(path)!r} holds {type(grid).__name__} {str(grid)[:60]!r}; expected a mapping of "
                         "parameter names to values (name: [value, ...])")
    return grid


def grid_size(grid: dict, tiers) -> int:
    """How many runs the grid makes, counted without expanding it: per tier, the product of the axes it takes."""
    return sum(math.prod(len(v) for k, v in grid.items() if isinstance(v, list) and k in spec(t)) for t in tiers)


def expand_grid(grid: dict) -> list:
    """Cross product of the grid's list values; scalars are shared. {} gives one empty run."""
    if not isinstance(grid, dict):
        raise UsageError(f"a grid must be a mapping of parameter names to values; got {type(grid).__name__}")
    axes = {k: [coerce(x) for x in v] if isinstance(v, list) else [coerce(v)] for k, v in grid.items()}
    for name, values in axes.items():
        if not values:
            raise UsageError(f"grid parameter {name!r} has an empty list; give at least one value")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")[:24] or "x"


def run_digest(tier: int, params: dict) -> str:
    """A run's identity is its content: the tier and every parameter, defaults filled in (where it keeps
    its files aside: RUN_CONTROL)."""
    known = spec(tier)  # a parameter added later, at its default, leaves the ids of finished runs as they were
    full = {k: v for k, v in check_params(tier, params).items()
            if k not in RUN_CONTROL and not (known[k].added and v == known[k].default)}
    return hashlib.sha256(json.dumps({"tier": tier, "parameters": full}, sort_keys=True).encode()).hexdigest()[:10]


def _absolute_paths(params: dict) -> dict:
    """A 'path/to/file.py:factory' spec, an hf: model or tokenizer folder and a checkpoint_dir relative to where the
    runner was started, made absolute once, here: notebooks run in their own folders, and a resume must find the
    same checkpoints."""
    target, sep, attr = str(params.get("model", "")).rpartition(":")
    if sep and target.endswith(".py") and Path(target).is_file():
        params = {**params, "model": f"{Path(target).resolve()}:{attr}"}
    if isinstance(params.get("checkpoint_dir"), str) and params["checkpoint_dir"]:
        params = {**params, "checkpoint_dir": str(Path(params["checkpoint_dir"]).resolve())}
    for name, prefix in (("model", "hf:"), ("tokenizer", "")):  # a Hugging Face model or tokenizer folder
        value = params.get(name)
        folder = value[len(prefix):] if isinstance(value, str) and value.startswith(prefix) else ""
        if folder and Path(folder).is_dir():
            params = {**params, name: prefix + str(Path(folder).resolve())}
    return params


def plan_runs(tiers, params: dict, grid: dict, max_runs: int = None) -> list:
    """One (run_id, tier, parameters) per tier and distinct grid point; every name and value checked up
    front. The run id ends in the content digest, so two different runs never share a folder. A grid of more
    than max_runs runs is refused before it is expanded."""
    if not isinstance(grid, dict):
        raise UsageError(f"a grid must be a mapping of parameter names to values; got {type(grid).__name__}")
    known = {tier: spec(tier) for tier in tiers}
    everything = set().union(*known.values())
    for name in [*params, *grid]:
        if name == "output_dir":
            raise UsageError("output_dir is set by the runner (runs/<name>/<run>/); use --out and --name instead")
        if name not in everything:
            raise UsageError(f"unknown parameter {name!r} for tier(s) {list(tiers)}; known parameters: {sorted(everything)}")
    count = grid_size(grid, tiers)
    if max_runs is not None and count > max_runs:
        axes = " x ".join(f"{len(v)} {k}" for k, v in grid.items() if isinstance(v, list))
        raise UsageError(f"the grid makes {count:,} runs ({axes}, on tier(s) {', '.join(map(str, tiers))}), more than "
                         f"--max-runs {max_runs:,}; raise --max-runs to run them all, or make the grid smaller")
    runs, seen = [], set()
    for point in expand_grid(grid):
        for tier in tiers:
            chosen = _absolute_paths({k: v for k, v in {**params, **point}.items() if k in known[tier]})
            try:
                digest = run_digest(tier, chosen)
            except ParamError as e:
                raise UsageError(str(e)) from None
            if digest in seen:  # a grid axis another tier ignores repeats the same run
                continue
            seen.add(digest)
            suffix = "".join(f"_{k}-{_slug(v)}" for k, v in point.items() if k in known[tier])
            runs.append((f"tier{tier}{suffix}_{digest}", tier, chosen))
    return runs


def _read(path: Path, reader=read_json):
    """A record file's content, or a ValueError that names the file and what is wrong with it."""
    try:
        return reader(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except Exception as e:
        raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def why_rerun(run_dir: Path, tier: int, params: dict):
    """None when run_dir holds exactly this run, complete and valid; else the reason to run it again."""
    try:
        record = _read(run_dir / "run.json")
        if not isinstance(record, dict):
            return f"{run_dir / 'run.json'} is corrupt (not a run record)"
        if record.get("digest") != run_digest(tier, params):
            return "its parameters changed"
        if record.get("run_status") != "ok":
            return f"it ended {record.get('run_status')!r}"
        results = _read(run_dir / "results.json")
        if not isinstance(results, dict) or results.get("status") != record.get("verdict"):
            return f"{run_dir / 'results.json'} does not match run.json"
        _read(run_dir / TIERS[tier].notebook, lambda p: nbformat.read(p, as_version=4))
    except ValueError as e:
        return str(e)
    return None


def _replace_dir(new: Path, final: Path):
    """Put a finished run in place; the previous one is removed only once the new one is there."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def execute(run_id: str, tier: int, params: dict, out_dir: Path, progress: bool = False, timeout: int = None) -> dict:
    """Execute one notebook in a temporary folder, then move it to out_dir/run_id. A crash, a timeout or a
    file-system error is recorded in the returned row, never raised; an interrupted run replaces an earlier
    run there only when that one was not complete."""
    row = {"run_id": run_id, "tier": tier, "notebook": TIERS[tier].notebook, "digest": run_digest(tier, params),
           **{f"param.{k}": v for k, v in params.items()}}
    t0, tmp = time.perf_counter(), None
    # Checkpoints live beside the run folders, not in the temporary one: they must outlive an interrupted run.
    keep = {"checkpoint_dir": str(out_dir / "checkpoints" / run_id)} if "checkpoint_dir" in spec(tier) else {}
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{run_id}."))
        try:
            run_notebook(NOTEBOOK_DIR / TIERS[tier].notebook, tmp / TIERS[tier].notebook, kernel_log=tmp / KERNEL_LOG,
                         parameters={**keep, **params, "output_dir": "."}, cwd=str(tmp), progress_bar=progress,
                         execution_timeout=timeout, on_cell_start=_no_cell_after_a_stop(tmp))
            row.update(_finished(read_json(tmp / "results.json")))
        except Exception as e:  # a failing notebook must not stop the others (a second Ctrl-C is no Exception)
            row.update(_failed(e, timeout, tier))
        row["duration_s"] = round(time.perf_counter() - t0, 2)
        write_json_atomic(tmp / "run.json", row)
        if (tmp / KERNEL_LOG).exists() and not (tmp / KERNEL_LOG).stat().st_size:
            (tmp / KERNEL_LOG).unlink()
        if row["run_status"] == INTERRUPTED and why_rerun(out_dir / run_id, tier, params) is None:
            shutil.rmtree(tmp)  # a complete earlier run of the same parameters stays: nothing finished is lost
        else:
            _replace_dir(tmp, out_dir / run_id)
    except OSError as e:  # the file system failed this run: its problem, not the batch's
        row.update(run_status="crashed", verdict=None, timing_failed=False, error=f"file system: {e}",
                   duration_s=round(time.perf_counter() - t0, 2))
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return row


def _finished(results: dict) -> dict:
    """A row's fields from a run's results.json: its verdicts, figures and, when it stopped early, why."""
    stop = results.get("figures", {}).get("stop") or {}
    row = {"run_status": INTERRUPTED if stop.get("reason") == INTERRUPTED else "ok", "error": stop.get("message", ""),
           "verdict": results["status"], "timing_failed": any(v["timing"] and v["status"] == "fail" for v in results["verdicts"])}
    row.update({f"verdict.{v['check']}": v["status"] for v in results["verdicts"]})
    return {**row, **{k: v for k, v in results.get("figures", {}).items() if k != "stop"}}  # its message is the error


def _failed(e: BaseException, timeout: int, tier: int) -> dict:
    """A row's fields for a notebook that did not finish: stopped by this runner, timed out or crashed."""
    if _STOP:
        status, error = INTERRUPTED, (f"{_STOP[0]} stopped it before it wrote its results (--resume runs it again"
                                      + (", from its checkpoints)" if "resume" in spec(tier) else ")"))
    elif isinstance(e, TimeoutError):  # nbclient's CellTimeoutError; a cell's own error is PapermillExecutionError
        status, error = "timeout", f"no cell may run longer than --timeout {timeout} s"
    else:
        status, error = "crashed", f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', None) or e}".strip()[:500]
    return {"run_status": status, "verdict": None, "timing_failed": False, "error": error}


def write_summary(rows: list, out_dir: Path, log=print) -> pd.DataFrame:
    """summary.csv and summary.png, rewritten after every run so an interruption keeps what finished."""
    summary = pd.DataFrame(rows)
    tmp = out_dir / ".summary.csv.tmp"
    summary.to_csv(tmp, index=False)
    tmp.replace(out_dir / "summary.csv")
    try:
        plt.close(plot_verdict_grid(summary, path=out_dir / "summary.png"))
    except Exception as e:  # the chart is a view of summary.csv; losing it must not lose the batch
        log(f"summary.png not drawn: {type(e).__name__}: {e}")
    return summary


def run_all(runs, out_dir: Path, resume: bool = False, progress: bool = False, timeout: int = None,
            log=print) -> pd.DataFrame:
    rows = []
    for i, (run_id, tier, params) in enumerate(runs, 1):
        reason = why_rerun(out_dir / run_id, tier, params) if resume and (out_dir / run_id).exists() else ""
        if resume and reason is None:
            log(f"[{i}/{len(runs)}] {run_id}: complete, skipped (--resume)")
            rows.append(read_json(out_dir / run_id / "run.json"))
        else:
            log(f"[{i}/{len(runs)}] {run_id} ..." + (f" (again: {reason})" if reason else ""))
            if resume and "resume" in spec(tier):  # an interrupted fine-tuning run continues from its checkpoints
                params = {"resume": True, **params}
            row = {**execute(run_id, tier, params, out_dir, progress, timeout), "rerun_reason": reason}
            log(f"[{i}/{len(runs)}] {run_id}: {row['run_status']}" +
                (f", verdict {row['verdict']}" if row["verdict"] else f" ({row['error']})") + f" in {row['duration_s']:.1f}s")
            rows.append(row)
        summary = write_summary(rows, out_dir, log)
        if _STOP and i < len(runs):
            log(f"{_STOP[0]}: {len(runs) - i} run(s) not started; --resume runs them")
            break
    return summary


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextlib.contextmanager
def batch_lock(out_dir: Path):
    """One runner per output folder: a lock file holding the runner's pid. A lock whose process is gone
    is stale and taken over; a live one makes this runner refuse. Left-over temporary run folders of a
    dead runner are removed once the lock is held."""
    lock = out_dir / ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if lock.is_dir() or (lock.exists() and not lock.is_file()):
                raise UsageError(f"{lock} is a folder (or another non-file), not a runner's lock file; remove it and "
                                 "run again") from None
            text = lock.read_text(errors="replace").strip() if lock.exists() else ""
            fresh = lock.exists() and time.time() - lock.stat().st_mtime < 10
            if (text.isdigit() and _alive(int(text))) or (not text and fresh):  # an empty lock is being written
                raise UsageError(f"another runner (pid {text or '?'}) is writing {out_dir}; wait for it to finish, "
                                 "or use another --name") from None
            lock.unlink(missing_ok=True)  # stale: its runner is gone
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        for leftover in out_dir.glob(".*.*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        yield
    finally:
        lock.unlink(missing_ok=True)


def parameters_help() -> str:
    """Every tier's parameters for --help, from the same spec as the notebooks and the README."""
    lines = []
    for tier, params in TIER_PARAMS.items():
        lines.append(f"tier {tier} parameters ({TIERS[tier].notebook}):")
        lines += [f"  {p.name} = {p.default!r}: {p.help} ({p.expected()})" for p in params]
    return "\n".join(lines)


def _output_folder(out: Path, name: str) -> Path:
    """--out/--name, checked before anything runs: the name stays inside --out, and --out can be written."""
    if not re.fullmatch(r"\w[\w.+-]*", name):
        raise UsageError(f"--name {name!r} must be a plain folder name inside --out: letters, digits, '_', '.', '+' "
                         "or '-', not starting with '.' (no '/', '..', spaces or control characters)")
    out_dir = out / name
    if out_dir.is_symlink() or (out_dir.exists() and out_dir.resolve().parent != out.resolve()):
        raise UsageError(f"--name {name!r}: {str(out_dir)!r} is a link to {str(out_dir.resolve())!r}, outside --out; "
                         "expected a folder inside --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise UsageError(f"cannot write runs into {str(out_dir)!r} (--out {str(out)!r}): {e.strerror or e}; "
                         "expected a writable folder") from None
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.run", description=__doc__, epilog=parameters_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", type=int, nargs="+", choices=sorted(TIERS), default=sorted(TIERS), help="tiers to run")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="notebook parameter")
    parser.add_argument("--grid", type=Path, help="YAML file whose lists expand to a cross product of runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs", help="parent folder (default: runs/)")
    parser.add_argument("--name", default="default", help="this batch's folder under --out (default: default)")
    parser.add_argument("--resume", action="store_true",
                        help="skip runs whose recorded parameters and outputs are complete, valid and the same as planned")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="seconds any one notebook cell may run (each tier runs in one cell); default 3600")
    parser.add_argument("--progress", action="store_true", help="show papermill's per-cell progress bar")
    parser.add_argument("--fail-on-verdict", action="store_true",
                        help="exit 1 when a non-timing check fails, not only on crashes and timeouts")
    parser.add_argument("--fail-on-timing", action="store_true",
                        help="exit 1 when a timing check (latency, amp_worth_it) fails too: results vary with machine load")
    parser.add_argument("--max-runs", type=int, default=MAX_RUNS,
                        help=f"refuse a grid of more runs than this, counted before it is expanded (default {MAX_RUNS})")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # the summary chart is written to a file, never shown
    try:
        if args.timeout < 1 or args.max_runs < 1:
            raise UsageError(f"--timeout and --max-runs must be at least 1; got {args.timeout} and {args.max_runs}")
        runs = plan_runs(args.tiers, parse_assignments(args.param), read_grid(args.grid) if args.grid else {}, args.max_runs)
        if args.dry_run:
            for run_id, tier, params in runs:
                print(f"{run_id}: {TIERS[tier].notebook} {params}")
            return 0
        out_dir = _output_folder(args.out.resolve(), args.name)  # absolute once: notebooks run in their own folders
        with batch_lock(out_dir), stops_passed_to_notebooks():
            print(f"{len(runs)} run(s) into {out_dir}")
            os.environ.setdefault("SUITE_ROOT", str(ROOT))  # the notebooks' set-up cell finds utils/ here
            summary = run_all(runs, out_dir, args.resume, args.progress, args.timeout)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped at once: the running notebook did not finish; finished runs are kept, --resume runs the rest",
              file=sys.stderr)
        return 130
    broken = summary[summary["run_status"] != "ok"]
    failed = summary[summary["verdict"] == "fail"]
    timing = summary[summary["timing_failed"].fillna(False).astype(bool)]
    stopped = (broken["run_status"] == INTERRUPTED).sum()
    print(f"summary: {out_dir / 'summary.csv'} ({len(summary) - len(broken)} ok, {stopped} interrupted (--resume continues "
          f"them), {len(broken) - stopped} crashed or timed out, "
          f"{len(failed)} with a failing verdict, {len(timing)} with a failing timing verdict)")
    for row in broken.itertuples():
        print(f"  {row.run_status}: {row.run_id}: {row.error}")
    gate = len(broken) or (args.fail_on_verdict and len(failed)) or (args.fail_on_timing and len(timing))
    return 1 if gate else 0


if __name__ == "__main__":
    sys.exit(main())
