"""A batch against a kept baseline, run by run and check by check. Runs are matched on their tier and parameters,
defaults filled in and made portable (a factory file, a Hugging Face folder or a tokenizer folder by its last name, so
two checkouts' runs match); a non-timing verdict that got worse (pass, warn, fail; or a crash) is a regression. What
the run resolved to (device, precision, torch) is compared as its environment: a change, never a regression. Timing
verdicts and figures are compared with tolerances and gate only when asked."""

import json
import math
from pathlib import Path

import pandas as pd
from matplotlib import pyplot as plt

from utils.loop.stops import INTERRUPTED
from utils.params import RUN_CONTROL, ParamError, current_names, spec
from utils.plotting import plot_comparison
from utils.results import OK, read_json
from utils.runner import UsageError
from utils.runner.execute import NOT_STARTED
from utils.verdicts import STATUSES

# Worse is higher, in verdicts.STATUSES' order; a run that crashed or timed out is worse than any
RANK = {status: rank for rank, status in enumerate(STATUSES)}
ENVIRONMENT = ("device", "device_name", "precision", "torch", "python")  # a run's record: what `auto` resolved to
# The figures compared, each with the direction that is better (+1 higher, -1 lower) and its default tolerance: the
# relative change past which a worse value is reported (timings vary ~20% from run to run on a shared machine).
FIGURES = {"speedup": (+1, 0.25), "speedup_ci_low": (+1, 0.25), "tokens_per_s_fp32": (+1, 0.25),
           "tokens_per_s_amp": (+1, 0.25), "peak_bytes_fp32": (-1, 0.1), "peak_bytes_amp": (-1, 0.1),
           "parity_gap": (-1, 1.0), "skipped_steps": (-1, 1.0)}
COLUMNS = ["run_id", "baseline_run_id", "tier", "kind", "name", "baseline", "now", "outcome", "regression", "gates"]
SAME, BETTER, CHANGED = "same", "better", "changed"


def read_batch(folder: Path, rows: list = None, tiers=None) -> list:
    """A batch folder's runs (its summary.csv's, or `rows`; of `tiers` only, when given), as the comparison reads them:
    each run's row (its run.json where that is the run the summary lists, else the summary's row), its record and its
    verdicts with their timing flags (results.json, which a finished run must have)."""
    folder = Path(folder)
    expected = "expected a batch folder written by python -m utils.run (runs/<name>/: summary.csv, and per run run.json " \
               "and results.json)"
    try:
        rows = pd.read_csv(folder / "summary.csv", dtype=str, keep_default_na=False).to_dict("records") if rows is None else rows
        runs = [_run(folder, _typed(row), expected) for row in rows]
    except FileNotFoundError as e:
        raise UsageError(f"{e.filename} does not exist; {expected}") from None
    except (ValueError, KeyError, OSError) as e:  # a corrupt summary.csv, run.json or results.json
        raise UsageError(f"{folder} cannot be read as a batch ({type(e).__name__}: {e}); {expected}") from None
    return [run for run in runs if tiers is None or run["tier"] in tiers]


def _run(folder: Path, row: dict, expected: str) -> dict:
    run_dir = folder / str(row["run_id"])
    record = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    # A run.json another run left (an interrupted rerun keeps the earlier complete one) is not this row's run
    record = record if record.get("run_status") == row.get("run_status") else row
    if record.get("run_status") == OK and not (run_dir / "results.json").is_file():
        raise UsageError(f"{run_dir / 'results.json'} is missing, though the run finished; {expected}")
    results = read_json(run_dir / "results.json") if record.get("run_status") == OK else {}
    return {**record, "tier": int(record["tier"]), "record": results.get("record", {}),
            "verdicts": {v["check"]: (v["status"], v["timing"]) for v in results.get("verdicts", [])}}


def _typed(row: dict) -> dict:
    """A summary row's parameters as their types (a CSV cell is text; a column with gaps is read as floats); empty
    cells dropped."""
    known, typed = spec(int(row["tier"])), {}
    for key, value in row.items():
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
            continue
        value = value.item() if hasattr(value, "item") else value  # a numpy scalar
        param = known.get(key.removeprefix("param.")) if key.startswith("param.") else None
        if param is not None and (param.type is str or isinstance(value, str)):
            value = param.parse(str(value))
        if param is not None and param.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # 10.0: a column with gaps was written as floats
        typed[key] = value
    return typed


def _portable(value):
    """A path the runner made absolute, as its last name: 'model.py:factory', 'hf:folder', a tokenizer folder."""
    if not isinstance(value, str):
        return value
    target, sep, attr = value.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{Path(target).name}:{attr}"
    prefix = "hf:" if value.startswith("hf:") else ""
    return prefix + Path(value[len(prefix):]).name if Path(value[len(prefix):]).is_absolute() else value


def match_key(run: dict, ignoring=()) -> str:
    """What a run is, for matching: its tier and every parameter (defaults filled in, former names read as the
    current ones) but where it keeps its files (RUN_CONTROL) and the names `ignoring` lists."""
    known = spec(int(run["tier"]))
    given = current_names({k.removeprefix("param."): v for k, v in run.items() if k.startswith("param.")},
                          [p for p in known.values() if p.formerly])
    full = {name: _portable(given.get(name, p.default)) for name, p in known.items()
            if name not in RUN_CONTROL and name not in ignoring}
    return json.dumps({"tier": int(run["tier"]), **full}, sort_keys=True, default=str)


def _by_key(runs: list, ignoring, which: str) -> dict:
    keyed = {}
    for run in runs:
        key = match_key(run, ignoring)
        if key in keyed:
            raise UsageError(f"{which} runs {keyed[key]['run_id']!r} and {run['run_id']!r} match the same run ({key}: "
                             f"{', '.join(ignoring) or 'no parameter'} ignored, files by their last name); expected each run "
                             "to match one run")
        keyed[key] = run
    return keyed


def matched(now: list, baseline: list, ignoring=()) -> tuple:
    """Each side's runs by their match key; two runs of one side with the same key are refused (a grid over a parameter
    `ignoring` names), before the batch runs where the runner asks."""
    try:
        return _by_key(now, ignoring, "this batch's"), _by_key(baseline, ignoring, "the baseline's")
    except ParamError as e:
        raise UsageError(str(e)) from None


def check_ignoring(names, tiers):
    """--match-ignoring's names, each a parameter of a tier this batch runs."""
    known = set().union(*(spec(t) for t in tiers))
    for name in names:
        if name not in known:
            raise UsageError(f"--match-ignoring {name!r} is not a parameter of tier(s) {list(tiers)}; known: {sorted(known)}")


def compare(now: list, baseline: list, ignoring=(), tolerances: dict = None) -> pd.DataFrame:
    """One row per difference or comparison: each run matched (or listed as without a counterpart), each check, its
    environment and its figures. `regression`: worse than the baseline; `gates`: fails the batch without any flag."""
    parse_tolerances(f"{name}={tol}" for name, tol in (tolerances or {}).items())  # a name no figure has is an error
    tolerances = {name: tol for name, (_, tol) in FIGURES.items()} | (tolerances or {})
    ours, theirs = matched(now, baseline, ignoring)
    rows = []
    for key, run in ours.items():
        base = theirs.get(key)
        if base is None:
            rows.append(_row(run, None, "run", "counterpart", None, run["run_id"], "no baseline run", True, True))
        else:
            rows += _compare_run(run, base, tolerances)
    for key, base in theirs.items():
        if key not in ours:
            rows.append(_row(None, base, "run", "counterpart", base["run_id"], None, "missing now", True, True))
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(run, base, kind, name, was, now, outcome, regression, gates) -> dict:
    pick = run or base
    return dict(zip(COLUMNS, [run and run["run_id"], base and base["run_id"], pick["tier"], kind, name, was, now, outcome,
                              regression, gates]))


def _compare_run(run: dict, base: dict, tolerances: dict) -> list:
    """A matched pair: how each ended, each check, the environment, the figures."""
    status, was = run.get("run_status"), base.get("run_status")
    if status != OK:  # crashed or timed out where the baseline's finished: worse than any verdict (exit 1 says so first)
        broke = was == OK and status not in (INTERRUPTED, NOT_STARTED)
        outcome = "worse" if broke else SAME if status == was else "not compared"
        return [_row(run, base, "run", "run_status", was, status, outcome, broke, broke)]
    if was != OK:  # the baseline's did not finish: each check of this run is new, and a failing one still gates
        return [_row(run, base, "run", "run_status", was, status, BETTER, False, False),
                *(_compare_check(run, {**base, "verdicts": {}}, check) for check in run["verdicts"])]
    rows = [_compare_check(run, base, check) for check in {**base["verdicts"], **run["verdicts"]}]
    for field in ENVIRONMENT:
        was, now = base["record"].get(field), run["record"].get(field)
        if was != now:
            rows.append(_row(run, base, "environment", field, was, now, CHANGED, False, False))
    return rows + [row for name in FIGURES if (row := _compare_figure(run, base, name, tolerances[name]))]


def _number(value):
    """A figure as a float; None where the run has none (not measured: NaN, None or text)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) else None


def _compare_figure(run: dict, base: dict, name: str, tolerance: float):
    """A figure against the baseline's: worse by more than `tolerance` of the baseline's value is a regression (gating
    only with --fail-on-figures). One not measured on a side (results hold an infinite parity gap as null) is listed."""
    was, now = _number(base.get(name)), _number(run.get(name))
    if was is None and now is None:
        return None
    if was is None or now is None:
        return _row(run, base, "figure", name, was, now, "not measured now" if now is None else "new", False, False)
    worse = (was - now) * FIGURES[name][0]  # > 0: worse than the baseline
    past = worse > tolerance * abs(was)
    outcome = SAME if worse == 0 else BETTER if worse < 0 else (
        f"worse by more than {tolerance:.0%}" if past else f"worse within {tolerance:.0%}")
    return _row(run, base, "figure", name, was, now, outcome, past, False)


def _compare_check(run: dict, base: dict, check: str) -> dict:
    """One check: worse is a regression; a check the baseline had and this run has not is one too."""
    (was, timing_was), (now, timing) = base["verdicts"].get(check, (None, False)), run["verdicts"].get(check, (None, False))
    if now is None:
        outcome, worse = "missing now", True
    elif was is None:
        outcome, worse = "new", RANK[now] > RANK["pass"]
    else:
        outcome = SAME if now == was else "worse" if RANK[now] > RANK[was] else BETTER
        worse = outcome == "worse"
    timing = timing or timing_was
    return _row(run, base, "timing check" if timing else "check", check, was, now, outcome, worse, worse and not timing)


def parse_tolerances(pairs) -> dict:
    """--tolerance FIGURE=FRACTION pairs: a compared figure and how much worse than the baseline it may be, relative."""
    tolerances = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if name not in FIGURES or not fraction >= 0:
            raise UsageError(f"--tolerance {pair!r}: expected FIGURE=FRACTION, FIGURE one of {sorted(FIGURES)} and "
                             "FRACTION a number at least 0 (0.1: 10% worse than the baseline is within tolerance)")
        tolerances[name] = fraction
    return tolerances


def gates(table: pd.DataFrame, fail_on_figures: bool) -> bool:
    """Whether the comparison fails the batch: a regression of a non-timing check, a run that crashed, a run without
    its counterpart; with fail_on_figures, a worse timing verdict or a figure past its tolerance too."""
    return bool(table["gates"].any() or (fail_on_figures and table["regression"].any()))


def write_comparison(table: pd.DataFrame, out_dir: Path, log=print):
    """comparison.csv (every row) and comparison.png in the batch folder; the rows that differ, printed."""
    tmp = out_dir / ".comparison.csv.tmp"
    try:
        table.to_csv(tmp, index=False)
        tmp.replace(out_dir / "comparison.csv")
    except OSError as e:  # the folder failed (full, read-only): the comparison is still printed, and gates
        log(f"comparison.csv not written: {e.strerror or e} ({e.filename or tmp})")
    try:
        plt.close(plot_comparison(table, out_dir / "comparison.png"))
    except Exception as e:  # a chart is a view of the table; losing it must not lose the gate
        log(f"comparison.png not drawn: {type(e).__name__}: {e}")
    differ = table[table["outcome"] != SAME]
    worse = int(table["regression"].sum())
    log(f"baseline: {len(table)} comparison(s), {worse} worse ({int(table['gates'].sum())} gating), "
        f"{len(differ) - worse} other difference(s): {out_dir / 'comparison.csv'}")
    for row in differ.itertuples():
        log(f"  {row.run_id or row.baseline_run_id}  {row.kind}  {row.name}: {row.baseline} -> {row.now} ({row.outcome})")
