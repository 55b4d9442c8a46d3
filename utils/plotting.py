"""Charts for every tier (matplotlib). Each function takes results as data, returns the Figure, and
writes a PNG when given a path (atomically: a temp file, then a rename)."""

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

PRECISION_COLORS = {"32": "tab:blue", "16-mixed": "tab:red", "bf16-mixed": "tab:orange"}
STATUS_COLORS = {"pass": "tab:green", "warn": "tab:orange", "fail": "tab:red"}


def save_figure(fig, path):
    """Write fig as PNG at path, atomically; returns fig. path=None writes nothing."""
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    return fig


def _label(precision: str) -> str:
    return {"32": "fp32"}.get(precision, precision)


# --- Tier 3: fp32 vs AMP -------------------------------------------------------------------------

def plot_loss_curves(parity: pd.DataFrame, amp_precision: str, tolerance: float = None, path=None):
    """Training loss per step, fp32 and AMP on the same data and seed; below, their relative gap."""
    fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=[3, 1])
    ax.plot(parity["step"], parity["loss_fp32"], color=PRECISION_COLORS["32"], label="fp32", alpha=0.85)
    ax.plot(parity["step"], parity["loss_amp"], color=PRECISION_COLORS.get(amp_precision, "tab:orange"),
            label=_label(amp_precision), alpha=0.85)
    skipped = parity[parity["skipped"].astype(bool)]
    if len(skipped):
        ax.scatter(skipped["step"], skipped["loss_amp"], marker="x", color="black", zorder=3, label="skipped step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"Loss parity: fp32 vs {_label(amp_precision)}")
    ax.legend()
    gap_ax.plot(parity["step"], 100 * parity["relative_gap"], color="gray")
    if tolerance is not None:
        gap_ax.axhline(100 * tolerance, color="tab:red", linestyle="--", label=f"tolerance {tolerance:.0%}")
        gap_ax.legend(loc="upper right")
    gap_ax.set_xlabel("optimizer step")
    gap_ax.set_ylabel("smoothed gap (%)")
    return save_figure(fig, path)


def plot_throughput(trials: pd.DataFrame, path=None):
    """Tokens/s per precision (and loop): median of the interleaved trials, bars spanning min to max."""
    groups = trials.groupby(["loop", "precision"], sort=False)["tokens_per_s"]
    med, lo, hi = groups.median(), groups.min(), groups.max()
    labels = [f"{_label(p)}" + ("" if loop == "ours" else f"\n({loop} loop)") for loop, p in med.index]
    colors = [PRECISION_COLORS.get(p, "gray") for _, p in med.index]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(labels, med.values, yerr=[med.values - lo.values, hi.values - med.values], capsize=6, color=colors)
    for bar, (loop, _) in zip(bars, med.index):
        bar.set_alpha(1.0 if loop == "ours" else 0.5)  # the bare reference loop is drawn faint
    ax.set_ylabel("tokens / s (median of trials, bars: min-max)")
    ax.set_title("Training throughput")
    return save_figure(fig, path)


def plot_memory(memory: dict, path=None):
    """Activation bytes saved for backward per precision, beside parameter and optimizer state
    (the same in both: autocast keeps fp32 master weights). CUDA peaks when measured."""
    names, values, colors = [], [], []
    for p, b in memory["activation_bytes"].items():
        names.append(f"activations\n{_label(p)}")
        values.append(b)
        colors.append(PRECISION_COLORS.get(p, "gray"))
    names += ["parameters", "AdamW state"]
    values += [memory["parameter_bytes"], memory["optimizer_state_bytes"]]
    colors += ["lightgray", "darkgray"]
    for p, b in memory.get("cuda_peak_bytes", {}).items():
        if b is not None:  # None on CPU: no allocator peak
            names.append(f"CUDA peak\n{_label(p)}")
            values.append(b)
            colors.append(PRECISION_COLORS.get(p, "gray"))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, np.array(values) / 2**20, color=colors)
    ax.set_ylabel("MiB")
    ax.set_title(f"Memory: activations shrink by {memory['activation_saving']:.0%} under AMP")
    return save_figure(fig, path)


def plot_loss_scale(parity: pd.DataFrame, path=None):
    """The GradScaler's loss scale per step (log scale; 1 = no scaler) with skipped steps marked."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.step(parity["step"], parity["loss_scale"], where="post", color="tab:purple", label="loss scale")
    skipped = parity[parity["skipped"].astype(bool)]
    ax.scatter(skipped["step"], skipped["loss_scale"], color="tab:red", marker="v", zorder=3,
               label=f"skipped steps ({len(skipped)})")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss scale")
    ax.set_title("Loss scale and skipped steps")
    ax.legend()
    return save_figure(fig, path)


def plot_speedup_sweep(sweep: pd.DataFrame, path=None):
    """AMP speedup over fp32 per batch size, with 95% bootstrap intervals; above 1 AMP pays."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(sweep["batch_size"], sweep["speedup"],
                yerr=[sweep["speedup"] - sweep["ci_low"], sweep["ci_high"] - sweep["speedup"]], marker="o", capsize=5)
    ax.axhline(1.0, color="gray", linestyle="--", label="break-even")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup (fp32 time / AMP time)")
    ax.set_title("Where AMP starts to pay")
    ax.legend()
    return save_figure(fig, path)
