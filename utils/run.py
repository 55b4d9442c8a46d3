"""Batch runner: executes the tier notebooks with papermill and collects one summary.

    python -m utils.run                                   # all three tiers, built-in tiny model, CPU or GPU
    python -m utils.run --tiers 3 -p model=gpt-small -p steps=100
    python -m utils.run --tiers 3 --grid sweep.yaml       # every combination of the grid's lists
    python -m utils.run --name nightly --resume           # skip runs that already completed

Everything lands in runs/<name>/: one folder per run (the executed notebook, results.json, charts, its kernel's own
log: kernel.log), summary.csv with a row per run, and summary.png, a grid of every verdict.

A -p value is read as its parameter's type: the text itself for a string parameter (precision=32 is '32',
model=gpt-small), a Python literal for any other (3, 1e-3, [1, 2], True). A grid file is YAML: each key a notebook
parameter, each list an axis of the cross product:
    model: [gpt-tiny, gpt-small]
    precision: [bf16-mixed, 16-mixed, 32]   # a string parameter takes a YAML integer as its text: 32 is '32'
    batch_size: [8, 16]
    lr: 0.001            # a scalar is the same for every run
To pass a list-valued parameter (batch_sizes, strengths) as one value, nest it: [[1, 2, 4]]. A tier is passed only the
parameters it has. Refused before anything runs: a name no selected tier knows, one given twice (by -p, or by -p and
the grid), a value of the wrong type or range for the tier's spec (utils/params.py, listed below), a device this
machine lacks, a grid file's size, nesting, keys or YAML aliases (README: grids are read strictly), and a grid of more
than --max-runs runs (counted before it is expanded).

Each run's folder name ends in a digest of its tier and full parameters: its identity is its content. A run executes
in a temporary folder and replaces its previous outputs only when it finishes, and summary.csv is rewritten after
every run, so an interrupted batch loses nothing that had finished. --resume skips a run only when its recorded
digest, run.json, results.json and notebook are complete, valid and agree, and the results and notebook are the files
the run wrote (their sha256 in run.json); any other run is redone and its summary row says why, and tier 3 continues
its fine-tuning runs from their newest checkpoints (resume=True; kept in runs/<name>/checkpoints/<run>, see
checkpoint_every). How a stop works (Ctrl-C, SIGTERM, SIGHUP) is below. One runner per output folder at a time
(utils.runner.lock: host, pid and a heartbeat, so a folder shared by several machines is guarded too).

--jobs N runs up to N notebooks at once here (each with its own GPU where there are GPUs, the cores split between
them: --threads); --executor ray runs each as a Ray task (RAY_ADDRESS or --ray-address joins a cluster, whose nodes
must share --out). Every engine executes a run the same way (utils.runner.execute).

Exit code: 0 when every notebook ran, 1 when any was interrupted, not started, crashed or timed out (its executed
notebook keeps the error cell, its summary row names the exception) or summary.csv could not be written, 2 for bad
arguments, 3 when every run finished but one is worse than --baseline's (README: regression gate), 130 for a stop at
once. --fail-on-verdict also exits 1 when a non-timing check fails, --fail-on-timing when a timing check does (they
vary with load)."""

import argparse
import itertools
import math
import os
import re
import signal
import stat
import sys
import tempfile
from pathlib import Path

from utils.results import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REGRESSION, EXIT_USAGE, OK, read_json


def _stopped_while_loading(signum, frame):
    print("stopped before any run started (Ctrl-C while the runner loaded its modules)", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # the imports below take seconds: a Ctrl-C then is one line, not a traceback through them
    signal.signal(signal.SIGINT, _stopped_while_loading)

import matplotlib
import pandas as pd
import yaml
from matplotlib import pyplot as plt

from utils.params import ROOT, TIER_PARAMS, ParamError, current_names, shown, spec
from utils.loop.stops import INTERRUPTED
from utils.plotting import plot_sweep, plot_verdict_grid
from utils.runner import Job, UsageError
from utils.runner.baseline import (FIGURES, check_ignoring, compare, gates, matched, parse_tolerances, read_batch,
                                   write_comparison)
from utils.runner.execute import (CHECKSUMS, NOT_STARTED, STOP_WINDOW_S, run_digest, stop_reason, stops_passed_to_notebooks,
                                  unfinished_row, why_rerun)
from utils.runner.local import LocalExecutor, cpu_count, named_gpu
from utils.runner.lock import batch_lock, temp_prefix
from utils.runner.ray_cluster import RayExecutor
from utils.tiers import TIERS

MAX_RUNS = 1000  # a grid larger than this is a typo more often than a plan: --max-runs raises it
MAX_GRID_BYTES = 256 * 1024  # a grid of --max-runs runs fits in a few KiB; PyYAML reads ~100 KB/s: a bound on the wait
MAX_GRID_DEPTH = 20  # lists and mappings in a grid: 4 or 5 are needed; thousands overflow Python's stack as it reads them
MAX_FOLDER_NAME = 128  # a --name or run id is one folder name: the OS allows 255 bytes (eCryptfs 143), a temporary one adds 10
NOT_WRITTEN = "not_written"  # a summary's attrs: why summary.csv could not be written
POLL_S = 0.5  # how often the driver looks for finished runs (and for a stop) while runs execute
STOPS = f"""Stops: Ctrl-C, SIGTERM or SIGHUP of the runner is passed to the running notebooks as Ctrl-C (a fine-tuning run
checkpoints first); they are recorded 'interrupted', the runs not yet started 'not_started', and the exit code is 1.
Signals within {STOP_WINDOW_S:g} s of the first are one stop (GNU timeout signals the runner and then its process group,
Slurm and systemd signal every process, a key bounces); a later, separate one stops at once, exit 130: the notebooks are
killed, finished runs are kept, and the next run into the folder removes what the killed ones left. A notebook kernel
that gets SIGTERM itself stops as by Ctrl-C too; in a kernel only a later Ctrl-C stops at once, never a SIGTERM (the
scheduler's and the runner's copies of one stop can arrive seconds apart on Ray). Under nohup, SIGHUP stays ignored.
Give a scheduler's stop time to checkpoint: timeout -k 60 ..., Slurm --signal=TERM@60 or KillWait, Kubernetes
terminationGracePeriodSeconds; Colab's stop button is Ctrl-C."""


# A -p or grid value is read by its name (or former name) before its tiers are known: a name has one type in every tier (tested).
_PARAMS = {name: p for params in TIER_PARAMS.values() for p in params for name in (p.name, p.formerly) if name}


def _typed(name: str, value):
    """A -p text or a grid's value as its parameter's type reads it (Param.parse); an unknown name is refused later."""
    return _PARAMS[name].parse(value) if name in _PARAMS else value


def parse_assignments(pairs) -> dict:
    """-p name=value pairs, each value read as its parameter's type says (_typed). A name given twice is an error."""
    params, given = {}, {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"parameter {shown(pair)} is not name=value")
        if name in given:
            raise UsageError(f"parameter {shown(name)} is given twice (-p {shown(given[name])} and -p {shown(pair)}); "
                             "expected each once")
        given[name], params[name] = pair, _typed(name, value)
    return params


class _GridLoader(yaml.SafeLoader):
    """YAML's safe loader, strict for a grid: a parameter given twice is an error, a key is a name, no aliases (500 bytes of
    them expand to millions of values), at most MAX_GRID_DEPTH levels (thousands overflow the stack), integers Python can read."""
    depth = 0  # the lists and mappings around the node being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise UsageError(f"alias {shown('*' + event.anchor)} at line {line} repeats a value by reference; expected "
                             "every value written out (a grid takes no aliases)")
        level = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))  # a value inside is no level
        self.depth += level
        try:
            if self.depth > MAX_GRID_DEPTH:
                raise UsageError(f"lists and mappings nested more than {MAX_GRID_DEPTH} deep at line {line}; expected "
                                 f"at most {MAX_GRID_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= level

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise UsageError(f"key {shown(self.construct_object(key_node, deep=True))} at line {line} is a {kind}; "
                                 "expected a parameter name (or, inside a value, a field name)")
            if key in lines:
                raise UsageError(f"parameter {shown(key)} is given twice (lines {lines[key]} and {line}); expected each once")
            lines[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than Python reads (sys.get_int_max_str_digits)
            raise UsageError(f"integer {shown(node.value)} at line {node.start_mark.line + 1} has more than "
                             f"{sys.get_int_max_str_digits():,} digits; expected a parameter's value") from None


_GridLoader.add_constructor("tag:yaml.org,2002:int", _GridLoader.construct_yaml_int)


def read_grid(path: Path) -> dict:
    """A grid file's mapping, or a UsageError naming the file and what is wrong (its kind and size checked before reading)."""
    name = shown(str(path))
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder, not a file" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, a pipe or a socket)"
            raise UsageError(f"grid file {name} is {kind}; expected a YAML file")
        if info.st_size > MAX_GRID_BYTES:
            raise UsageError(f"grid file {name} is {info.st_size:,} bytes; expected at most {MAX_GRID_BYTES:,} (a grid "
                             "of names and lists fits in a few KiB)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"grid file {name} does not exist") from None
    except OSError as e:  # a name too long, a loop of links, a folder or file this user may not read
        raise UsageError(f"grid file {name} cannot be read: {e.strerror}; expected a readable YAML file") from None
    try:
        grid = yaml.load(data.decode("utf-8"), Loader=_GridLoader)
    except UnicodeDecodeError as e:
        raise UsageError(f"grid file {name} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "expected a YAML file saved as UTF-8") from None
    except UsageError as e:
        raise UsageError(f"grid file {name}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"grid file {name} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    grid = {} if grid is None else grid
    if not isinstance(grid, dict) or not all(isinstance(k, str) for k in grid):
        raise UsageError(f"grid file {name} holds {type(grid).__name__} {shown(grid)}; expected a mapping of "
                         "parameter names to values (name: [value, ...])")
    return grid


def expand_grid(grid: dict) -> list:
    """Cross product of the grid's list values; scalars are shared. {} gives one empty run."""
    axes = {k: [_typed(k, x) for x in v] if isinstance(v, list) else [_typed(k, v)] for k, v in grid.items()}
    for name, values in axes.items():
        if not values:
            raise UsageError(f"grid parameter {name!r} has an empty list; give at least one value")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")[:24] or "x"


def _absolute_paths(params: dict) -> dict:
    """A 'path/to/file.py:factory' spec, an hf: model or tokenizer folder and a checkpoint_dir made absolute once, here:
    notebooks run in their own folders, and a resume must find the same checkpoints."""
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
    """One (run_id, tier, parameters) per tier and distinct grid point, every name and value checked (a grid of more
    than max_runs runs before it is expanded). The run id ends in the content digest: two runs never share a folder."""
    if not isinstance(grid, dict):
        raise UsageError(f"a grid must be a mapping of parameter names to values; got {type(grid).__name__}")
    known = {tier: spec(tier) for tier in tiers}
    renamed = [p for names in known.values() for p in names.values() if p.formerly]
    try:  # a former name is read as the parameter's; the run id keeps the former (run_digest, the suffix below)
        params, grid = current_names(params, renamed), current_names(grid, renamed)
    except ParamError as e:
        raise UsageError(str(e)) from None
    everything = set().union(*known.values())
    for name in [*params, *grid]:
        if name == "output_dir":
            raise UsageError("output_dir is set by the runner (runs/<name>/<run>/); use --out and --name instead")
        if name not in everything:
            raise UsageError(f"unknown parameter {shown(name)} for tier(s) {list(tiers)}; known parameters: {sorted(everything)}")
    twice = [name for name in params if name in grid]  # the grid's value would win, silently
    if twice:
        raise UsageError(f"parameter {twice[0]!r} is given both by -p ({shown(params[twice[0]])}) and by the grid "
                         f"({shown(grid[twice[0]])}); expected it once, in one of them")
    # counted without expanding the grid: per tier, the product of the axes it takes
    count = sum(math.prod(len(v) for k, v in grid.items() if isinstance(v, list) and k in known[t]) for t in tiers)
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
            suffix = "".join(f"_{known[tier][k].formerly or k}-{_slug(v)}" for k, v in point.items() if k in known[tier])
            name = f"tier{tier}{suffix}"[:MAX_FOLDER_NAME - len(digest) - 1]  # many axes add up; the digest stays
            runs.append((f"{name}_{digest}", tier, chosen))
    return runs


def write_summary(rows: list, out_dir: Path, log=print) -> pd.DataFrame:
    """summary.csv, summary.png (every verdict) and, once tier 3 has run, sweep.png (its speedup and parity gap per
    run): rewritten after every run, so an interruption keeps what finished."""
    summary = pd.DataFrame(rows)
    tmp = out_dir / ".summary.csv.tmp"
    try:
        summary.to_csv(tmp, index=False)
        tmp.replace(out_dir / "summary.csv")
    except OSError as e:  # the folder failed (full, read-only): the runs go on, and the end says so
        summary.attrs[NOT_WRITTEN] = f"{e.strerror or e} ({e.filename or tmp})"
        log(f"summary.csv not written: {summary.attrs[NOT_WRITTEN]}")
        return summary
    for name, draw in (("summary.png", plot_verdict_grid), ("sweep.png", plot_sweep)) if rows else ():
        try:
            fig = draw(summary, path=out_dir / name)
            if fig is not None:
                plt.close(fig)
        except Exception as e:  # a chart is a view of summary.csv; losing it must not lose the batch
            log(f"{name} not drawn: {type(e).__name__}: {e}")
    return summary


def run_all(runs, out_dir: Path, resume: bool = False, progress: bool = False, timeout: int = None,
            log=print, executor=None) -> pd.DataFrame:
    """Every planned run through `executor` (default: one at a time on this machine); the summary keeps the plan's
    order whatever order the runs finish in. After a stop, queued runs never start."""
    executor = executor or LocalExecutor()
    rows, total, cancelled = {}, len(runs), False

    def summarize():
        return write_summary([rows[k] for k in sorted(rows)], out_dir, log)

    executor.on_start = lambda job: log(f"[{job.index + 1}/{total}] {job.run_id} ...{executor.start_note}" + (
        f" (again: {job.extra['rerun_reason']})" if job.extra["rerun_reason"] else ""))
    for i, (run_id, tier, params) in enumerate(runs):
        reason = why_rerun(out_dir / run_id, tier, params) if resume and (out_dir / run_id).exists() else ""
        if resume and reason is None:
            log(f"[{i + 1}/{total}] {run_id}: complete, skipped (--resume)")
            rows[i] = {k: v for k, v in read_json(out_dir / run_id / "run.json").items() if k != CHECKSUMS}
        elif not stop_reason():
            if resume and "resume" in spec(tier):  # an interrupted fine-tuning run continues from its checkpoints
                params = {"resume": True, **params}
            executor.submit(Job(i, run_id, tier, params, out_dir, progress, timeout, {"rerun_reason": reason}))
    summary = summarize() if rows else pd.DataFrame()
    while executor.busy:
        if stop_reason() and not cancelled:
            executor.cancel()
            cancelled = True
        for job, row in executor.collect(POLL_S):
            if row is None:  # the engine's stop came before it started
                continue
            rows[job.index] = row = {**row, **job.extra}
            log(f"[{job.index + 1}/{total}] {job.run_id}: {row['run_status']}" +
                (f", verdict {row['verdict']}" if row.get("verdict") else f" ({row['error']})") +
                (f" in {row['duration_s']:.1f}s" if "duration_s" in row else ""))
            summary = summarize()
    if stop_reason() and len(rows) < total:
        log(f"{stop_reason()}: {total - len(rows)} run(s) not started; --resume runs them")
        why = f"{stop_reason()} came before it started; --resume runs it"
        rows.update({i: unfinished_row(Job(i, *run, out_dir), NOT_STARTED, why) for i, run in enumerate(runs) if i not in rows})
        summary = summarize()
    return summary


def parameters_help() -> str:
    """Every tier's parameters for --help, from the same spec as the notebooks and the README."""
    lines = []
    for tier, params in TIER_PARAMS.items():
        lines.append(f"tier {tier} parameters ({TIERS[tier].notebook}):")
        lines += [f"  {p.name} = {p.default!r}: {p.help} ({p.expected()})" for p in params]
    return "\n".join(lines)


def _output_folder(out: Path, name: str) -> Path:
    """--out/--name, checked before anything runs: one folder name the OS takes, inside --out, which can be written."""
    size = len(os.fsencode(name))
    if size > MAX_FOLDER_NAME:
        raise UsageError(f"--name {shown(name)} is {size:,} bytes long; expected a folder name of at most {MAX_FOLDER_NAME}")
    if not re.fullmatch(r"\w[\w.+-]*", name):
        raise UsageError(f"--name {shown(name)} must be a plain folder name inside --out: letters, digits, '_', '.', '+' "
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.run", description=f"{__doc__}\n\n{STOPS}", epilog=parameters_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", type=int, nargs="+", choices=sorted(TIERS), default=sorted(TIERS), help="tiers to run")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="notebook parameter")
    parser.add_argument("--grid", type=Path, help="YAML file whose lists expand to a cross product of runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs", help="parent folder (default: runs/)")
    parser.add_argument("--name", default="default", help="this batch's folder under --out (default: default)")
    parser.add_argument("--resume", action="store_true",
                        help="skip runs whose recorded parameters and outputs are complete, valid and the same as planned")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks run at once on this machine (default 1); each holds its own GPU where there are GPUs")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each run (default: this machine's cores divided by --jobs; 1 with Ray)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local (default): this machine; ray: a Ray cluster (RAY_ADDRESS or --ray-address), else a "
                             "local Ray; --out must then be shared by every node")
    parser.add_argument("--ray-address", help="the Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
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
    parser.add_argument("--baseline", type=Path, help="a batch folder to compare with, run by run and check by check: "
                        "comparison.csv and .png, exit 3 when a check got worse or a run has no counterpart")
    parser.add_argument("--match-ignoring", nargs="+", default=[], metavar="NAME",
                        help="with --baseline: parameters that may differ between matched runs (seed, say)")
    parser.add_argument("--tolerance", action="append", default=[], metavar="FIGURE=FRACTION",
                        help=f"with --baseline: how much worse a figure may be, relative (defaults: "
                             f"{', '.join(f'{k} {t:g}' for k, (_, t) in FIGURES.items())})")
    parser.add_argument("--fail-on-figures", action="store_true",
                        help="with --baseline: exit 3 also when a timing verdict got worse or a figure is past its tolerance")
    return parser


def _check_numbers(args):
    for flag, value in (("--timeout", args.timeout), ("--max-runs", args.max_runs), ("--jobs", args.jobs),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1; got {value}")
    if args.executor == "ray" and args.jobs != 1:
        raise UsageError("--jobs is the local engine's; with --executor ray the cluster's resources decide how many run at once")
    if args.executor == "ray" and not args.out.is_absolute():
        raise UsageError(f"--out {str(args.out)!r} is relative: with --executor ray every node must find the same folder, "
                         "so give its absolute path on the shared file system")
    if args.executor == "local" and args.threads and args.threads > cpu_count():
        raise UsageError(f"--threads {args.threads} is more than this machine's {cpu_count()} CPU(s)")
    if args.executor == "local" and args.ray_address:
        raise UsageError("--ray-address names a Ray cluster to join; add --executor ray")


def _check_gpus(args, runs):
    """Ray gives each GPU run one GPU, its cuda:0: a run naming another cannot be placed."""
    named = sorted({params["device"] for _, _, params in runs if named_gpu(params)})
    if args.executor == "ray" and named:
        raise UsageError(f"device {named[0]!r}: with --executor ray each GPU run is given one GPU by Ray (its cuda:0); "
                         "use device=cuda (or auto)")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    matplotlib.use("Agg")  # the summary charts are written to files, never shown
    try:
        _check_numbers(args)
        runs = plan_runs(args.tiers, parse_assignments(args.param), read_grid(args.grid) if args.grid else {}, args.max_runs)
        _check_gpus(args, runs)
        baseline = _baseline(args, runs)  # read before any run: the batch's own folder is what it held before it
        if args.dry_run:
            for run_id, tier, params in runs:
                print(f"{run_id}: {TIERS[tier].notebook} {params}")
            return EXIT_OK
        out_dir = _output_folder(args.out.resolve(), args.name)  # absolute once: notebooks run in their own folders
        with batch_lock(out_dir):
            os.environ.setdefault("SUITE_ROOT", str(ROOT))  # the notebooks' set-up cell finds utils/ here
            # The engine first: ray.init installs a SIGTERM handler of its own, which ours must replace.
            executor = (RayExecutor(out_dir, args.ray_address, args.threads or 1) if args.executor == "ray"
                        else LocalExecutor(args.jobs, args.threads))
            try:
                print(f"{len(runs)} run(s) into {out_dir}" + (f", {args.jobs} at a time" if args.jobs > 1 else "")
                      + (" on Ray" if args.executor == "ray" else ""))
                summary = _run_stoppably(runs, out_dir, args, executor)
            finally:
                executor.close()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StoppedAtOnce:
        print(_stopped_at_once(out_dir), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before any run started (a stale lock's watch, Ray's start): nothing to keep
        print("stopped before any run started", file=sys.stderr)
        return EXIT_INTERRUPTED
    table = None if baseline is None else compare(read_batch(out_dir, summary.to_dict("records")), baseline,
                                                   args.match_ignoring, parse_tolerances(args.tolerance))
    return _report(summary, out_dir, args, table)


def _baseline(args, runs) -> list:
    """--baseline's runs, its options and the planned runs' matching checked; None without one (its options are then
    an error)."""
    if args.baseline is None:
        given = [flag for flag, value in (("--match-ignoring", args.match_ignoring), ("--tolerance", args.tolerance),
                                          ("--fail-on-figures", args.fail_on_figures)) if value]
        if given:
            raise UsageError(f"{' and '.join(given)} compare(s) with a baseline; add --baseline DIR")
        return None
    check_ignoring(args.match_ignoring, args.tiers)
    parse_tolerances(args.tolerance)
    baseline = read_batch(args.baseline, tiers=args.tiers)  # the baseline's runs of the tiers this batch runs
    planned = [{"run_id": run_id, "tier": tier, **{f"param.{k}": v for k, v in params.items()}} for run_id, tier, params in runs]
    matched(planned, baseline, args.match_ignoring)
    return baseline


class StoppedAtOnce(Exception):
    """A second, separate stop while runs executed: the notebooks were killed."""


def _stopped_at_once(out_dir: Path) -> str:
    left = sorted(p.name for p in out_dir.glob(temp_prefix("*") + "*") if p.is_dir())
    return ("stopped at once: the running notebooks did not finish; finished runs are kept, --resume runs the rest"
            + (f"; the next run into {out_dir} removes their temporary folder(s) {', '.join(left)}" if left else ""))


def _run_stoppably(runs, out_dir: Path, args, executor) -> pd.DataFrame:
    """run_all with stops passed to the notebooks; a stop at once kills them while the lock is still held."""
    with stops_passed_to_notebooks():
        try:
            return run_all(runs, out_dir, args.resume, args.progress, args.timeout, executor=executor)
        except KeyboardInterrupt:
            executor.kill()
            raise StoppedAtOnce from None


def _report(summary: pd.DataFrame, out_dir: Path, args, table: pd.DataFrame = None) -> int:
    """The batch in one line, a line per run that did not finish, the comparison with the baseline (`table`), and the
    exit code the gates give: a run that did not finish first, then the baseline, then --fail-on-verdict/timing."""
    broken = summary[summary["run_status"] != OK]
    failed = summary[summary["verdict"] == "fail"]
    timing = summary[summary["timing_failed"].fillna(False).astype(bool)]
    stopped, unstarted = ((broken["run_status"] == status).sum() for status in (INTERRUPTED, NOT_STARTED))
    where = (f"NOT written to {out_dir / 'summary.csv'}: {summary.attrs[NOT_WRITTEN]}" if NOT_WRITTEN in summary.attrs
             else out_dir / "summary.csv")
    print(f"summary: {where} ({len(summary) - len(broken)} ok, {stopped} interrupted and {unstarted} not started "
          f"(--resume continues them), {len(broken) - stopped - unstarted} crashed or timed out, "
          f"{len(failed)} with a failing verdict, {len(timing)} with a failing timing verdict)")
    for row in broken.itertuples():
        print(f"  {row.run_status}: {row.run_id}: {row.error}")
    if table is not None:
        write_comparison(table, out_dir)
    if len(broken) or NOT_WRITTEN in summary.attrs:
        return EXIT_FAILED
    if table is not None and gates(table, args.fail_on_figures):
        return EXIT_REGRESSION
    return EXIT_FAILED if (args.fail_on_verdict and len(failed)) or (args.fail_on_timing and len(timing)) else EXIT_OK


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: main() handles stops from here on
    sys.exit(main())
