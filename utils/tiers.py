"""The tier as the unit: run one, write its results.json and charts, show it in a notebook.

    result = run_tier(1, {"model": "gpt-tiny"})   # a TierResult: verdicts, tables, record, figures
    charts = save_tier(result)                    # results.json + one PNG per chart, in output_dir
    present(result, "gradient_flow", charts)      # a notebook section: verdict, table columns, chart

Everything a notebook shows comes from here, so a notebook holds no result layout, precision or
verdict logic, and tests exercise the same code without a notebook.
"""

from pathlib import Path

import pandas as pd
from IPython.display import Image, display
from matplotlib import pyplot as plt

from utils.plotting import (plot_amp_layer_error, plot_attention_entropy, plot_attention_maps, plot_gradient_norms,
                            plot_init_std, plot_latency, plot_loss_curves, plot_loss_scale, plot_memory,
                            plot_memory_vs_batch, plot_robustness, plot_speedup_sweep, plot_throughput, save_figure)
from utils.tier1_critical_validation import run_tier1
from utils.tier2_advanced_analysis import run_tier2
from utils.training.amp_benchmark import test_amp_speedup_benchmark
from utils.models import UnsupportedModel
from utils.params import is_data, output_folder
from utils.verdicts import CheckResult, TierResult, Verdict

RUNNERS = {1: run_tier1, 2: run_tier2, 3: test_amp_speedup_benchmark}

# check -> its charts: (file name, draw(check result, tier result) -> Figure, or None when there is nothing to draw)
CHARTS = {
    "gradient_flow": [("gradient_norms.png", lambda c, r: plot_gradient_norms(c.data))],
    "initialization": [("init_std.png", lambda c, r: plot_init_std(c.data))],
    "memory": [("memory_vs_batch.png", lambda c, r: plot_memory_vs_batch(c.data))],
    "latency": [("latency.png", lambda c, r: plot_latency(c.data, c.extra))],
    "attention": [("attention_maps.png", lambda c, r: plot_attention_maps(c.arrays["maps"]) if c.arrays else None),
                  ("attention_entropy.png", lambda c, r: plot_attention_entropy(c.data) if len(c.data) else None)],
    "robustness": [("robustness.png", lambda c, r: plot_robustness(c.data))],
    "amp_readiness": [("amp_layer_error.png", lambda c, r: plot_amp_layer_error(c.data, r.parameters["amp_tolerance"]))],
    "amp_safe": [("loss_curves.png", lambda c, r: plot_loss_curves(c.data, c.extra["amp_precision"], c.extra["tolerance"])),
                 ("loss_scale.png", lambda c, r: plot_loss_scale(c.data))],
    "amp_worth_it": [("throughput.png", lambda c, r: plot_throughput(c.data)),
                     ("memory.png", lambda c, r: plot_memory(c.extra["memory"])),
                     ("speedup_sweep.png", lambda c, r: plot_speedup_sweep(pd.DataFrame(c.extra["sweep"]))
                      if c.extra["sweep"] else None)],
}


def run_tier(tier: int, params: dict = None, *, model=None, data=None) -> TierResult:
    """Run tier 1, 2 or 3 with `params` (names, types and defaults: utils.params). `model` may be an
    nn.Module: it overrides the `model` parameter."""
    if tier not in RUNNERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {sorted(RUNNERS)}")
    params = params or {}
    try:
        return RUNNERS[tier](model, data=data, **params)
    except UnsupportedModel as e:  # an honest refusal is the tier's one verdict, not a traceback
        refusal = CheckResult(Verdict("supported", "fail", str(e)), pd.DataFrame())
        return TierResult(tier, {"supported": refusal}, {k: v for k, v in params.items() if is_data(v)}, {},
                          {"unsupported": str(e)})


def output_dir(result: TierResult) -> Path:
    """The run's output_dir parameter, or runs/interactive/tier<N> when it is empty."""
    return output_folder(result.tier, result.parameters.get("output_dir"))


def save_tier(result: TierResult) -> dict:
    """Write results.json first, then every chart of every check that did not crash.
    Returns {check: [PNG paths]}; a chart that cannot be drawn is reported, never raised."""
    out = output_dir(result)
    result.save(out / "results.json")
    charts = {}
    for name, check in result.checks.items():
        if check.crashed or check.data.empty:  # nothing to draw: the verdict says why
            continue
        for filename, draw in CHARTS.get(name, []):
            try:
                fig = draw(check, result)
            except Exception as e:  # one broken chart must not take the others, or the results, down
                print(f"chart {filename} of {name} could not be drawn: {type(e).__name__}: {e}")
                continue
            if fig is not None:
                plt.close(save_figure(fig, out / filename))
                charts.setdefault(name, []).append(out / filename)
    return charts


def verdict_line(verdict) -> str:
    """'[status] check: reason'; timing verdicts say so (nbval masks them, see tests/nbval_sanitize.cfg)."""
    return f"[{verdict.status}] {'(timing) ' if verdict.timing else ''}{verdict.check}: {verdict.reason}"


def headline(result: TierResult):
    """The run in one line: the model and its task, or why it is not supported."""
    if "supported" in result.checks:
        print(f"unsupported model: {result.checks['supported'].verdict.reason}")
    else:
        print(f"{result.parameters['model']}: {result.figures['parameters']:,} parameters, task {result.record['task']}")


def present(result: TierResult, name: str, charts: dict):
    """A notebook section: the check's verdict, its table's columns and rows, and its charts."""
    if name not in result.checks:
        why = result.figures.get("interrupted") or "the model is not supported, see above"
        print(f"{name}: not run ({why})")
        return
    check = result.checks[name]
    print(verdict_line(check.verdict))
    if check.crashed or check.data.empty:
        print("no table or chart: " + ("the check crashed" if check.crashed else "nothing was measured") + " (see the verdict)")
        return
    print(f"table: {len(check.data)} rows; columns {', '.join(map(str, check.data.columns))}")
    for path in charts.get(name, []):
        display(Image(filename=str(path)))


def summarize(result: TierResult):
    """Every verdict, then the tier's status (decided by the non-timing verdicts)."""
    for verdict in result.verdicts:
        print(verdict_line(verdict))
    print(f"Tier {result.tier}: {result.status}")


def describe(result: TierResult):
    """What ran (device, precision and why, versions) and the headline figures. Differs from machine to machine."""
    for key, value in {**result.record, **result.figures}.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
