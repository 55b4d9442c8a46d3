"""Loss parity: does an AMP run train as fp32 does? Judged the way the GradScaler works.

A skipped step is not an update (the weights and the LR schedule stay), so the runs are compared update for update: the
AMP run's k-th update beside fp32's k-th. Tier 3's parity runs make up their skipped steps (make_up_skipped: the next step
retries the batch), so both make the same updates on the same data and differ in precision alone.

Calibration is the GradScaler doing its job, not held against AMP. A back-off (skipped steps in a row, each halving the
scale) is calibration when the scale stays at COLLAPSED (1) or above (without a GradScaler a skip is non-finite gradients,
never calibration) and it belongs to the scale's descent from its first value (every back-off up to the first that STAND
updates in a row follow; a descent that never ends is skipping that keeps coming), or it is isolated (STAND updates before
it, and after it, or every step left where the run ends sooner). Held against AMP: skipping beyond calibration over
max_skipped_fraction of the steps, a scale collapsed below 1, a storm (the loop stops the run), a NaN loss, a lasting gap
of the smoothed curves or of the final evaluations, and an AMP run that made up its skips and still made fewer updates
than fp32 (its allowance is `steps` more).
"""

import math

import numpy as np
import pandas as pd

from utils.precision import FP32, label, short_label, spec

STAND = 5  # updates in a row that show the scale holds: before a back-off, it is isolated; after it, steps stand again
SMOOTHING = 10  # updates in the rolling median that the gap compares (a one-update spike that recovers is noise)
COLLAPSED = 1.0  # a loss scale below this collapsed: the gradients overflow fp16 even unscaled


def smooth(series: pd.Series, window: int = SMOOTHING) -> pd.Series:
    """Rolling median: a one-update loss spike that recovers does not count, a lasting drift does."""
    return series.rolling(max(1, min(window, len(series))), min_periods=1).median()


def updates(history: pd.DataFrame) -> pd.Series:
    """Per step, the update it made or tried to make (1-based): a skipped step shares its number with the next."""
    made = (~history["skipped"].astype(bool)).astype(int)
    return made.cumsum() - made + 1


def back_offs(history: pd.DataFrame) -> list:
    """The runs of skipped steps in a row, each {first, last, steps, scale_from, scale_to, before, after, at_end,
    calibration}: before and after, the updates in a row around it; calibration per the module's rule."""
    skipped = history["skipped"].astype(bool).to_numpy()
    steps, scales = history["step"].to_numpy(), history["loss_scale"].to_numpy()
    edges = np.diff(np.concatenate(([0], skipped.astype(int), [0])))  # +1 where a run of skips starts, -1 after its last
    firsts, lasts = np.flatnonzero(edges == 1).tolist(), (np.flatnonzero(edges == -1) - 1).tolist()
    runs = []
    for i, j, previous_last, next_first in zip(firsts, lasts, [-1, *lasts[:-1]], [*firsts[1:], len(skipped)]):
        runs.append({"first": int(steps[i]), "last": int(steps[j]), "steps": j - i + 1, "scale_from": float(scales[i]),
                     "scale_to": float(scales[i]) / 2 ** (j - i + 1), "before": i - previous_last - 1,
                     "after": next_first - j - 1, "at_end": next_first == len(skipped)})
    # The descent from the first value ends at the first back-off after which STAND updates follow; a descent that
    # never ends is skipping that keeps coming, and none of it calibrates.
    ends = next((n for n, run in enumerate(runs) if run["after"] >= STAND), None)
    for n, run in enumerate(runs):
        stands_again = run["after"] >= STAND or (run["at_end"] and run["after"] >= 1)
        isolated = run["before"] >= STAND and stands_again
        run["calibration"] = ((ends is not None and n <= ends) or isolated) and run["scale_to"] >= COLLAPSED
    return runs


def collapse(history: pd.DataFrame):
    """The step where the loss scale first fell below COLLAPSED, with its first and lowest values; None if it never did."""
    low = history[history["loss_scale"] < COLLAPSED]
    if not len(low):
        return None
    return {"step": int(low["step"].iloc[0]), "from": float(history["loss_scale"].iloc[0]),
            "to": float(history["loss_scale"].min())}


def runaway(p: dict) -> bool:
    """Skipping beyond the GradScaler's calibration over the allowed share of the steps (amp_safe's figures)."""
    return p["skipped_fraction"] > p["max_skipped_fraction"]


def compare(ref: pd.DataFrame, amp: pd.DataFrame) -> pd.DataFrame:
    """The table behind amp_safe, one row per update (fp32's, then any more the AMP run made): each run's loss, the
    relative gap of the smoothed curves, the AMP step, its loss scale and the skipped steps before it (its retries)."""
    def made(history, loss):
        numbered = history.assign(update=updates(history))
        retries = numbered.groupby("update")["skipped"].sum().rename("skipped_before")
        kept = numbered[~numbered["skipped"].astype(bool)].rename(columns={"loss": loss})
        return kept, retries
    fp32, _ = made(ref, "loss_fp32")
    amp_made, retries = made(amp, "loss_amp")
    df = fp32[["update", "loss_fp32"]].merge(amp_made[["update", "step", "loss_amp", "loss_scale"]], on="update", how="outer")
    df["skipped_before"] = df["update"].map(retries).fillna(0).astype(int)
    gap = (smooth(df["loss_amp"]) - smooth(df["loss_fp32"])).abs() / smooth(df["loss_fp32"])
    df["relative_gap"] = gap.where(df["loss_amp"].notna() & df["loss_fp32"].notna())  # only updates both runs made
    return df[["update", "step", "loss_fp32", "loss_amp", "relative_gap", "loss_scale", "skipped_before"]]


def figures(table: pd.DataFrame, ref, amp, limits: dict) -> dict:
    """amp_safe's figures from the table and the two runs (history, final_eval_loss, stop, plan); limits: tolerance,
    max_skipped_fraction and steps (asked of each run)."""
    judged = table["relative_gap"].dropna()  # updates one run never made: the made-up count says so (problems)
    worst = judged.idxmax() if len(judged) else None
    worst_step = None if worst is None else table["step"][worst]  # NaN where only fp32 made that update
    history, offs = amp.history, back_offs(amp.history)
    skipped, scale = history["skipped"].astype(bool), history["loss_scale"]
    other = sum(r["steps"] for r in offs if not r["calibration"])
    return {"amp_precision": amp.plan.precision, **limits, "compared": "update for update",
            "max_relative_gap": float(judged.max()) if worst is not None else float("inf"),
            "max_gap_step": None if pd.isna(worst_step) else int(worst_step),
            "max_gap_update": int(table["update"][worst]) if worst is not None else None,
            "final_relative_gap": float(judged.iloc[-1]) if len(judged) else float("inf"),
            "final_eval_loss": {FP32: ref.final_eval_loss, amp.plan.precision: amp.final_eval_loss},
            "final_eval_relative_gap": _relative(amp.final_eval_loss, ref.final_eval_loss),
            "finite": bool(np.isfinite(history["loss"]).all()),
            "updates": {"reference": int((~ref.history["skipped"].astype(bool)).sum()), "amp": int((~skipped).sum())},
            "amp_steps_run": len(history), "skipped_steps": int(history["skipped"].sum()),
            "calibration_skips": sum(r["steps"] for r in offs if r["calibration"]), "other_skips": other,
            "skipped_fraction": other / limits["steps"], "back_offs": offs,
            "loss_scale_by_step": [float(x) for x in scale], "skipped_at": [int(x) for x in history["step"][skipped]],
            "final_loss_scale": float(scale.iloc[-1]) if len(history) else None,
            "min_loss_scale": float(scale.min()) if len(history) else None, "collapse": collapse(history), "stop": amp.stop}


def _relative(value, reference):
    if value is None or reference is None:
        return None
    return abs(value - reference) / reference if math.isfinite(value) else float("inf")


def calibration_text(p: dict) -> str:
    """How the skipped steps split: '5 skipped: 5 calibration (65536 -> 2048 at steps 1-5), 0 beyond it'."""
    if not p["skipped_steps"]:
        return "no skipped steps"
    spans = [f"{r['scale_from']:g} -> {r['scale_to']:g} at step{'s' if r['steps'] > 1 else ''} {r['first']}"
             + (f"-{r['last']}" if r['steps'] > 1 else "") for r in p["back_offs"] if r["calibration"]]
    return (f"{p['skipped_steps']} skipped: {p['calibration_skips']} calibration" + (f" ({', '.join(spans)})" if spans else "")
            + f", {p['other_skips']} beyond it")


def problems(p: dict, instead: str = None) -> list:
    """What amp_safe names against an AMP run (none: it passes). instead: a precision to advise in its place
    (precision.instead_here: one this device runs natively)."""
    tol, out = p["tolerance"], []
    if p["stop"]:  # a run cut short: its stop says what went wrong; gaps and fractions of it add nothing
        return [f"the run stopped: {p['stop']['message'].rstrip('.')}"]
    if not p["finite"]:
        return ["the AMP loss became NaN/Inf"]
    if p["collapse"]:
        out.append(f"the loss scale collapsed to {p['collapse']['to']:g} (below {COLLAPSED:g} from step "
                   f"{p['collapse']['step']}): gradients overflow even unscaled")
    if p["updates"]["amp"] < p["updates"]["reference"] and p["amp_steps_run"] > p["steps"]:  # it made up, and ran out
        out.append(f"skipping kept coming: the AMP run made {p['updates']['amp']} of the reference's {p['updates']['reference']} "
                   f"updates in {p['amp_steps_run']} steps")
    if p["max_relative_gap"] > tol:
        out.append(f"the AMP loss (rolling median of {SMOOTHING} updates) strays {p['max_relative_gap']:.1%} from fp32 "
                   f"(tolerance {tol:.0%}) at update {p['max_gap_update']}")
    if p["final_eval_relative_gap"] is not None and p["final_eval_relative_gap"] > tol:
        counts = sorted(set(p["updates"].values()))
        out.append(f"final eval loss differs by {p['final_eval_relative_gap']:.1%} after "
                   f"{' and '.join(map(str, counts))} updates (tolerance {tol:.0%})")
    if runaway(p):
        amp = spec(p["amp_precision"])
        advice = (f"; {label(amp.name)} overflows here: look for activations beyond {amp.short}'s range (Tier 2 AMP "
                  "readiness)" + (f", or use {short_label(instead)}, which this device runs natively" if instead else "")
                  if amp.scaler else "")  # a narrow range the GradScaler guards: fp16
        out.append(f"{p['other_skips']} of {p['steps']} steps were skipped beyond the GradScaler's calibration "
                   f"({p['skipped_fraction']:.0%} > {p['max_skipped_fraction']:.0%}){advice}")
    return out
