"""The tier as the unit: one record per tier (number, notebook, parameters, runner, sections, charts) in one
registry, TIERS, that run_tier, save_tier, the batch runner and the notebook builder iterate."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import pandas as pd
from matplotlib import pyplot as plt

from utils.models import UnsupportedModel
from utils.params import SHARED_MACHINE_ENV, TIER_PARAMS, ParamError, is_data, output_folder, shown
from utils.plotting import (plot_amp_layer_error, plot_attention_entropy, plot_attention_maps, plot_gradient_norms,
                            plot_init_std, plot_latency, plot_loss_curves, plot_loss_scale, plot_memory,
                            plot_memory_vs_batch, plot_remedies, plot_robustness, plot_speedup_sweep, plot_throughput,
                            save_figure)
from utils.prepare import prepare
from utils.tier1_critical_validation import run_tier1
from utils.tier2_advanced_analysis import run_tier2
from utils.tier3_training_utilities import run_tier3
from utils.verdicts import CheckResult, TierResult, Verdict


@dataclass(frozen=True)
class Tier:
    number: int
    notebook: str     # its file in notebooks/
    runner: object    # runner(prepared run, progress) -> TierResult
    sections: tuple   # its checks, in the order the notebook shows them
    charts: dict      # check -> [(file name, draw(check result, tier result) -> Figure or None)]

    @property
    def params(self) -> tuple:
        return TIER_PARAMS[self.number]


TIERS = {
    1: Tier(1, "tier1_validation.ipynb", lambda run, progress: run_tier1(run),
            ("shapes", "causality", "gradient_flow", "numerics", "initialization", "memory", "latency"), {
                "gradient_flow": [("gradient_norms.png", lambda c, r: plot_gradient_norms(c.data))],
                "initialization": [("init_std.png", lambda c, r: plot_init_std(c.data))],
                "memory": [("memory_vs_batch.png", lambda c, r: plot_memory_vs_batch(c.data))],
                "latency": [("latency.png", lambda c, r: plot_latency(c.data, c.extra))]}),
    2: Tier(2, "tier2_analysis.ipynb", lambda run, progress: run_tier2(run), ("attention", "robustness", "amp_readiness"), {
        "attention": [("attention_maps.png", lambda c, r: plot_attention_maps(c.arrays["maps"]) if c.arrays else None),
                      ("attention_entropy.png", lambda c, r: plot_attention_entropy(c.data) if len(c.data) else None)],
        "robustness": [("robustness.png", lambda c, r: plot_robustness(c.data))],
        "amp_readiness": [("amp_layer_error.png", lambda c, r: plot_amp_layer_error(c.data, r.parameters["amp_tolerance"]))]}),
    3: Tier(3, "tier3_training.ipynb", run_tier3, ("fp32_baseline", "amp_safe", "amp_worth_it", "diagnosis"), {
        "amp_safe": [("loss_curves.png", lambda c, r: plot_loss_curves(c.data, c.extra["amp_precision"], c.extra["tolerance"])),
                     ("loss_scale.png", lambda c, r: plot_loss_scale(c.extra) if c.extra["loss_scale_by_step"] else None)],
        "amp_worth_it": [("throughput.png", lambda c, r: plot_throughput(c.data) if len(c.data) else None),
                         ("memory.png", lambda c, r: plot_memory(c.extra["memory"]) if "memory" in c.extra else None),
                         ("speedup_sweep.png", lambda c, r: plot_speedup_sweep(pd.DataFrame(c.extra["sweep"]))
                          if c.extra.get("sweep") else None)],
        "diagnosis": [("remedies.png", lambda c, r: plot_remedies(c.data, c.extra["tolerance"]))]}),
}


def run_tier(tier: int, params: dict = None, *, model=None, data=None, progress: bool = False,
             refusal_as_verdict: bool = True) -> TierResult:
    """Run tier 1, 2 or 3 with `params` (utils.params), prepared once; an nn.Module `model` overrides that parameter. A model
    or precision the suite cannot run is the tier's one 'supported' verdict (refusal_as_verdict=False: raised)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {sorted(TIERS)}")
    if params is not None and not isinstance(params, Mapping):
        raise ParamError(f"params must be a mapping of parameter names to values, such as {{'seq_len': 16}}; got "
                         f"{type(params).__name__} {shown(params)}")
    params = dict(params or {})
    try:
        return _shared_machine_said(TIERS[tier].runner(prepare(tier, model, params, data), progress))
    except UnsupportedModel as e:  # an honest refusal is the tier's one verdict, not a traceback
        if not refusal_as_verdict:
            raise
        refusal = CheckResult(Verdict("supported", "fail", str(e)), pd.DataFrame())
        return TierResult(tier, {"supported": refusal}, {k: v for k, v in params.items() if is_data(v)}, {},
                          {"unsupported": str(e)})


def _shared_machine_said(result: TierResult) -> TierResult:
    """Beside other runs of the batch runner, each timing verdict's reason and the record say so: their load is in its times."""
    if shared := os.environ.get(SHARED_MACHINE_ENV):
        result.record["shared_machine"] = shared
        for check in result.checks.values():
            if check.verdict.timing:
                check.verdict = replace(check.verdict, reason=f"{check.verdict.reason} (measured while other runs could "
                                                               f"share this machine: {shared})")
    return result


def save_tier(result: TierResult) -> dict:
    """Write results.json first (in output_dir), then every chart of every check that did not crash.
    Returns {check: [PNG paths]}; a chart that cannot be drawn is reported, never raised."""
    out = output_folder(result.tier, result.parameters.get("output_dir"))
    result.save(out / "results.json")
    charts = {}
    for name, check in result.checks.items():
        if check.crashed or check.data.empty:  # nothing to draw: the verdict says why
            continue
        for filename, draw in TIERS[result.tier].charts.get(name, []):
            try:
                fig = draw(check, result)
            except Exception as e:  # one broken chart must not take the others, or the results, down
                print(f"chart {filename} of {name} could not be drawn: {type(e).__name__}: {e}")
                continue
            if fig is not None:
                plt.close(save_figure(fig, out / filename))
                charts.setdefault(name, []).append(out / filename)
    return charts
