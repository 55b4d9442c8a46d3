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
Parameters that a tier does not have are not passed to it; a name no selected tier knows, or a value
of the wrong type, is rejected before anything runs.

Exit code: 0 when every notebook ran, 1 when any crashed (its executed notebook keeps the error cell,
its summary row names the exception), 2 for bad arguments. --fail-on-verdict also exits 1 when a
check fails; a failing verdict and a crash are separate columns in the summary.
"""

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import matplotlib
import pandas as pd
import papermill
import yaml

from utils.params import TIER_PARAMS, ParamError, check_params, coerce, spec
from utils.plotting import plot_verdict_grid
from utils.results import read_json, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
TIERS = {1: "tier1_validation.ipynb", 2: "tier2_analysis.ipynb", 3: "tier3_training.ipynb"}


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
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")[:40] or "x"


def plan_runs(tiers, params: dict, grid: dict) -> list:
    """One (run_id, tier, parameters) per tier and grid point, unknown names rejected up front."""
    known = {tier: spec(tier) for tier in tiers}
    everything = set().union(*known.values())
    for name in [*params, *grid]:
        if name == "output_dir":
            raise UsageError("output_dir is set by the runner (runs/<name>/<run>/); use --out and --name instead")
        if name not in everything:
            raise UsageError(f"unknown parameter {name!r} for tier(s) {list(tiers)}; known parameters: {sorted(everything)}")
    runs = []
    for point in expand_grid(grid):
        for tier in tiers:
            chosen = {k: v for k, v in {**params, **point}.items() if k in known[tier]}
            try:
                check_params(tier, chosen)
            except ParamError as e:
                raise UsageError(str(e)) from None
            suffix = "_".join(f"{k}-{_slug(v)}" for k, v in point.items() if k in known[tier])
            run_id = f"tier{tier}" + (f"_{suffix}" if suffix else "")
            if run_id not in {r[0] for r in runs}:  # a grid axis another tier ignores would repeat it
                runs.append((run_id, tier, chosen))
    return runs


def execute(run_id: str, tier: int, params: dict, out_dir: Path, progress: bool) -> dict:
    """Execute one notebook into out_dir/run_id; a crash is recorded, never raised."""
    run_dir = out_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").unlink(missing_ok=True)  # a result left from an earlier run must not pass for this one's
    row = {"run_id": run_id, "tier": tier, "notebook": TIERS[tier], **{f"param.{k}": v for k, v in params.items()}}
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(NOTEBOOK_DIR / TIERS[tier]), str(run_dir / TIERS[tier]),
                                   parameters={**params, "output_dir": str(run_dir)}, cwd=str(NOTEBOOK_DIR),
                                   progress_bar=progress, kernel_name="python3")
        results = read_json(run_dir / "results.json")
        row.update(run_status="ok", error="", verdict=results["status"])
        row.update({f"verdict.{v['check']}": v["status"] for v in results["verdicts"]})
        row.update(results.get("figures", {}))
    except Exception as e:  # a failing notebook must not stop the others
        message = getattr(e, "evalue", None) or str(e)
        row.update(run_status="crashed", verdict=None, error=f"{getattr(e, 'ename', type(e).__name__)}: {message}".strip()[:500])
    row["duration_s"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(run_dir / "run.json", row)
    return row


def run_all(runs, out_dir: Path, resume: bool = False, progress: bool = False, log=print) -> pd.DataFrame:
    rows = []
    for i, (run_id, tier, params) in enumerate(runs, 1):
        done = out_dir / run_id / "run.json"
        previous = read_json(done) if resume and done.exists() else {}
        if previous.get("run_status") == "ok":
            log(f"[{i}/{len(runs)}] {run_id}: complete, skipped (--resume)")
            rows.append(previous)
            continue
        log(f"[{i}/{len(runs)}] {run_id} ...")
        row = execute(run_id, tier, params, out_dir, progress)
        log(f"[{i}/{len(runs)}] {run_id}: {row['run_status']}" + (f", verdict {row['verdict']}" if row["verdict"] else f" ({row['error']})")
            + f" in {row['duration_s']:.1f}s")
        rows.append(row)
    summary = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".summary.csv.tmp"
    summary.to_csv(tmp, index=False)
    tmp.replace(out_dir / "summary.csv")
    plot_verdict_grid(summary, path=out_dir / "summary.png")
    return summary


def parameters_help() -> str:
    """Every tier's parameters for --help, from the same spec as the notebooks and the README."""
    lines = []
    for tier, params in TIER_PARAMS.items():
        lines.append(f"tier {tier} parameters ({TIERS[tier]}):")
        lines += [f"  {p.name} = {p.default!r}: {p.help} ({p.expected()})" for p in params]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.run", description=__doc__, epilog=parameters_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", type=int, nargs="+", choices=sorted(TIERS), default=sorted(TIERS), help="tiers to run")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", help="notebook parameter")
    parser.add_argument("--grid", type=Path, help="YAML file whose lists expand to a cross product of runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs", help="parent folder (default: runs/)")
    parser.add_argument("--name", default="default", help="this batch's folder under --out (default: default)")
    parser.add_argument("--resume", action="store_true", help="skip runs whose run.json says they completed")
    parser.add_argument("--progress", action="store_true", help="show papermill's per-cell progress bar")
    parser.add_argument("--fail-on-verdict", action="store_true", help="exit 1 when any check fails, not only on crashes")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # the summary chart is written to a file, never shown
    try:
        grid = {}
        if args.grid:
            if not args.grid.is_file():
                raise UsageError(f"grid file {str(args.grid)!r} does not exist")
            grid = yaml.safe_load(args.grid.read_text()) or {}
        runs = plan_runs(args.tiers, parse_assignments(args.param), grid)
    except (UsageError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = args.out / args.name
    if args.dry_run:
        for run_id, tier, params in runs:
            print(f"{run_id}: {TIERS[tier]} {params}")
        return 0
    print(f"{len(runs)} run(s) into {out_dir}")
    summary = run_all(runs, out_dir, args.resume, args.progress)
    crashed = summary[summary["run_status"] != "ok"]
    failed = summary[summary["verdict"] == "fail"]
    print(f"summary: {out_dir / 'summary.csv'} ({len(summary) - len(crashed)} ok, {len(crashed)} crashed, "
          f"{len(failed)} with a failing verdict)")
    for row in crashed.itertuples():
        print(f"  crashed: {row.run_id}: {row.error}")
    return 1 if len(crashed) or (args.fail_on_verdict and len(failed)) else 0


if __name__ == "__main__":
    sys.exit(main())
