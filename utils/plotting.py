"""Charts for every tier (matplotlib). Each function takes results as data, returns the Figure, and
writes a PNG when given a path (atomically: a temp file, then a rename). Which tier draws which: utils.tiers.TIERS."""

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
import numpy as np
import pandas as pd

from utils.params import RUN_CONTROL
from utils.precision import FP32, color, compared, label, short_label
from utils.results import OK


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


def _finish(ax, path, legend: bool = True, **labels):
    """Label ax (ax.set keywords), add its legend, and save its figure (save_figure)."""
    ax.set(**labels)
    if legend:
        ax.legend()
    return save_figure(ax.figure, path)


def plot_loss_curves(parity: pd.DataFrame, amp_precision: str, tolerance: float = None, path=None):
    """Training loss per optimizer update, fp32 and AMP on the same batches and seed (a skipped step is not an update:
    the updates the GradScaler retried are marked); below, their relative gap."""
    fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=[3, 1])
    ax.plot(parity["update"], parity["loss_fp32"], color=color(FP32), label=label(FP32), alpha=0.85)
    ax.plot(parity["update"], parity["loss_amp"], color=color(amp_precision, "tab:orange"), label=label(amp_precision),
            alpha=0.85)
    retried = parity[parity["skipped_before"] > 0]
    if len(retried):
        ax.scatter(retried["update"], retried["loss_amp"], marker="x", color="black", zorder=3,
                   label=f"made after skipped steps ({int(retried['skipped_before'].sum())})")
    ax.set(ylabel="training loss (nats/token)", title=f"Loss parity: fp32 vs {label(amp_precision)}, update for update")
    ax.legend()
    gap_ax.plot(parity["update"], 100 * parity["relative_gap"], color="gray")
    if tolerance is not None:
        gap_ax.axhline(100 * tolerance, color="tab:red", linestyle="--", label=f"tolerance {tolerance:.0%}")
        gap_ax.legend(loc="upper right")
    return _finish(gap_ax, path, legend=False, xlabel="optimizer update", ylabel="smoothed gap (%)")


def plot_training(history: pd.DataFrame, evals: pd.DataFrame, title: str, path=None):
    """One run's training loss per step (skipped steps marked) and its evaluations: utils.train's chart."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(history["step"], history["loss"], color="tab:gray", alpha=0.8, label="training loss")
    skipped = history[history["skipped"].astype(bool)]
    if len(skipped):
        ax.scatter(skipped["step"], skipped["loss"], marker="x", color="black", zorder=3, label="skipped step")
    if len(evals):
        ax.plot(evals["step"], evals["eval_loss"], "o-", color="tab:blue", label="eval loss")
    return _finish(ax, path, xlabel="optimizer step", ylabel="loss (nats/token)", title=title)


def plot_check_speedups(results: list, device_name: str, path=None):
    """The GPU check: AMP speedup over fp32 per model and precision (95% CI bars); refused ones are labelled empty slots."""
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = [r for r in results if "precision" in r]
    labels = [f"{r['model']}\n{label(r['precision'])}" for r in rows]
    medians = [r["speedup"]["median"] if "speedup" in r else 0 for r in rows]
    lows = [m - (r["speedup"]["ci_low"] or m) if "speedup" in r else 0 for m, r in zip(medians, rows)]
    highs = [(r["speedup"]["ci_high"] or m) - m if "speedup" in r else 0 for m, r in zip(medians, rows)]
    ax.bar(labels, medians, yerr=[lows, highs], capsize=5, color=[color(r["precision"], "tab:purple") for r in rows])
    for i, r in enumerate(rows):
        if "speedup" not in r:
            ax.text(i, 0.05, "refused", ha="center", va="bottom", rotation=90, color="gray")
    ax.axhline(1, color="black", linewidth=0.8)
    return _finish(ax, path, legend=False, ylabel="speedup over fp32 (median, 95% CI)", title=f"GPU check: {device_name}")


def plot_throughput(trials: pd.DataFrame, path=None):
    """Tokens/s per precision (and loop): median of the interleaved trials, bars spanning min to max."""
    groups = trials.groupby(["loop", "precision"], sort=False)["tokens_per_s"]
    med, lo, hi = groups.median(), groups.min(), groups.max()
    labels = [label(p) + ("" if loop == "ours" else f"\n({loop} loop)") for loop, p in med.index]
    colors = [color(p) for _, p in med.index]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(labels, med.values, yerr=[med.values - lo.values, hi.values - med.values], capsize=6, color=colors)
    for bar, (loop, _) in zip(bars, med.index):
        bar.set_alpha(1.0 if loop == "ours" else 0.5)  # the bare reference loop is drawn faint
    return _finish(ax, path, legend=False, ylabel="tokens / s (median of trials, bars: min-max)", title="Training throughput")


def plot_memory(memory: dict, path=None):
    """Per precision, weights, gradients, AdamW state and activations saved for backward, each measured alone and stacked
    (autocast keeps the first three fp32: AMP shrinks the activations); on a GPU, the allocator's step peak as a marker."""
    parts, kinds = memory["parts"], ("weights", "gradients", "optimizer_state", "activations")
    names = [label(p) for p in parts]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(parts))
    for kind, shade in zip(kinds, ("lightgray", "darkgray", "dimgray", None)):
        values = np.array([parts[p][kind] for p in parts]) / 2**20
        ax.bar(names, values, bottom=bottom, label=kind.replace("_", " "), color=shade or [color(p) for p in parts])
        bottom += values
    peaks = [(n, parts[p]["cuda_peak"] / 2**20) for n, p in zip(names, parts) if parts[p].get("cuda_peak")]
    if peaks:
        ax.scatter(*zip(*peaks), marker="_", s=2000, color="black", zorder=3, label="CUDA peak")
    ax.set(ylabel="MiB", title=f"Memory: activations shrink by {memory['activation_saving']:.0%} under AMP; the rest stays fp32")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_loss_scale(parity: dict, path=None):
    """The GradScaler's loss scale at each step of the AMP run (log scale; 1 = no scaler), skipped steps marked and
    split into calibration (the scale finding its level) and the rest (amp_safe's figures, utils.parity)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    scales = parity["loss_scale_by_step"]
    ax.step(range(1, len(scales) + 1), scales, where="post", color="tab:purple", label="loss scale")
    calibration = {s for r in parity["back_offs"] if r["calibration"] for s in range(r["first"], r["last"] + 1)}
    for kind, marker_color, keep in (("calibration", "tab:orange", True), ("beyond calibration", "tab:red", False)):
        at = [s for s in parity["skipped_at"] if (s in calibration) == keep]
        if at:
            ax.scatter(at, [scales[s - 1] for s in at], color=marker_color, marker="v", zorder=3,
                       label=f"skipped: {kind} ({len(at)})")
    ax.set_yscale("log", base=2)
    return _finish(ax, path, xlabel="optimizer step", ylabel="loss scale", title="Loss scale and skipped steps")


def plot_remedies(remedies: pd.DataFrame, tolerance: float, path=None):
    """The diagnosis's remedy table: each run's largest parity gap against the tolerance (left; a NaN loss is an
    infinite gap, drawn at the top) and its skipped steps (right), the run as asked first."""
    fig, (gap_ax, skip_ax) = plt.subplots(1, 2, figsize=(10, 0.6 * len(remedies) + 1.8), sharey=True)
    names = [r[:45] for r in remedies["remedy"]][::-1]
    gaps = remedies["max_relative_gap"].replace(np.inf, np.nan)[::-1]
    top = max(2 * tolerance, float(np.nanmax(gaps.to_numpy())) if gaps.notna().any() else 0.0) * 1.1
    colors = ["tab:green" if ok else "tab:red" for ok in remedies["passed"][::-1]]
    # A gap of zero still gets a visible bar (a sliver) and every bar its figure, so a passing remedy is seen.
    bars = gap_ax.barh(names, gaps.fillna(top).clip(lower=top / 100, upper=top), color=colors)
    gap_ax.bar_label(bars, ["NaN/Inf" if pd.isna(g) else f"{g:.1%}" for g in gaps], padding=3, fontsize=8)
    gap_ax.axvline(tolerance, color="gray", linestyle="--", label=f"tolerance {tolerance:.0%}")
    gap_ax.set(xlim=(0, top), xlabel="largest relative loss gap to fp32")
    gap_ax.legend(loc="lower right")
    skip_ax.barh(names, remedies["skipped_steps"][::-1], color=colors)
    fig.suptitle("Diagnosis: AMP as asked, then each remedy (green passes parity)")
    return _finish(skip_ax, path, legend=False, xlabel="skipped steps")


def plot_speedup_sweep(sweep: pd.DataFrame, path=None):
    """AMP speedup over fp32 per batch size, with 95% bootstrap intervals; above 1 AMP pays."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(sweep["batch_size"], sweep["speedup"],
                yerr=[sweep["speedup"] - sweep["ci_low"], sweep["ci_high"] - sweep["speedup"]], marker="o", capsize=5)
    ax.axhline(1.0, color="gray", linestyle="--", label="break-even")
    ax.set_xscale("log", base=2)
    return _finish(ax, path, xlabel="batch size", ylabel="speedup (fp32 time / AMP time)", title="Where AMP starts to pay")


def _per_parameter_bars(names, values, statuses, xlabel: str, title: str, path):
    """One horizontal bar per parameter on a log axis; flagged ones (status other than 'ok') in red."""
    fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * len(names))))
    ax.barh(names, values, color=["tab:blue" if s == "ok" else "tab:red" for s in statuses])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    return _finish(ax, path, legend=False, xscale="log", xlabel=xlabel, title=title)


def plot_gradient_norms(grads: pd.DataFrame, path=None):
    """Gradient norm per parameter (log scale); red: flagged (unused, NaN, vanishing, exploding); unused ones at the floor."""
    norms = grads["grad_norm"].fillna(0).replace([np.inf, -np.inf], 0)
    floor = max(norms[norms > 0].min() / 10, 1e-12) if (norms > 0).any() else 1e-12
    return _per_parameter_bars(grads["parameter"], norms.clip(lower=floor), grads["status"],
                               "gradient L2 norm (log scale)", "Gradient flow per parameter (red: flagged)", path)


def plot_init_std(init: pd.DataFrame, path=None):
    """Standard deviation of every parameter at initialization (log scale); red: flagged."""
    return _per_parameter_bars(init["parameter"], init["std"].clip(lower=1e-12), init["status"],
                               "std at initialization (log scale)", "Initialization per parameter (red: flagged)", path)


def plot_memory_vs_batch(memory: pd.DataFrame, path=None):
    """Training-step memory per batch size: CUDA peak, or activations saved for backward on CPU."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(memory["batch_size"], memory["bytes"] / 2**20, marker="o")
    measure = memory["measure"].iloc[0] if len(memory) else "bytes"
    return _finish(ax, path, legend=False, xlabel="batch size", ylabel=f"MiB ({measure.replace('_', ' ')})",
                   title="Memory vs batch size")


def plot_latency(latency: pd.DataFrame, stats: dict, path=None):
    """Histogram of inference latencies with p50/p95/p99 marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(latency["latency_ms"], bins=20, color="tab:blue", alpha=0.7)
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ax.axvline(stats[f"{q}_ms"], color="black", linestyle=style, label=f"{q} {stats[f'{q}_ms']:.2f} ms")
    return _finish(ax, path, xlabel="latency per forward (ms)", ylabel="count", title="Inference latency")


def plot_attention_maps(maps: dict, max_layers: int = 4, path=None):
    """Attention weights (batch mean) for each head of the first layers: rows are queries, columns keys."""
    layers = list(maps)[:max_layers]
    heads = max(maps[name].shape[0] for name in layers)
    fig, axes = plt.subplots(len(layers), heads, figsize=(2.2 * heads, 2.2 * len(layers)), squeeze=False)
    for i, name in enumerate(layers):
        for h, ax in enumerate(axes[i]):
            ax.set(xticks=[], yticks=[])
            if h < maps[name].shape[0]:
                ax.imshow(maps[name][h].numpy(), cmap="viridis", vmin=0)
                ax.set_title(f"{name}\nhead {h}", fontsize=7)
            else:
                ax.axis("off")
    fig.suptitle("Attention maps (query rows x key columns)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_attention_entropy(attention: pd.DataFrame, path=None):
    """Normalized entropy per head (1 = uniform over allowed keys, 0 = a single key) and the peak weight."""
    labels = [f"{layer}\nh{head}" for layer, head in zip(attention["layer"], attention["head"])]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels)), 4))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, attention["normalized_entropy"], width=0.4, label="normalized entropy")
    ax.bar(x + 0.2, attention["max_weight"], width=0.4, label="mean max weight", color="tab:orange")
    ax.set_xticks(x, labels, fontsize=6, rotation=90)
    return _finish(ax, path, ylim=(0, 1.05), ylabel="fraction", title="Attention entropy and peak weight per head")


def plot_robustness(robustness: pd.DataFrame, path=None):
    """Prediction agreement and KL divergence against perturbation strength, per perturbation."""
    fig, (ax, kl_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, group in robustness.groupby("perturbation"):
        ax.plot(group["strength"], 100 * group["agreement"], marker="o", label=kind)
        kl_ax.plot(group["strength"], group["kl"], marker="o", label=kind)
    ax.set(xlabel="perturbation strength", ylabel="agreement with clean predictions (%)", title="Robustness: agreement")
    ax.legend()
    return _finish(kl_ax, path, legend=False, xlabel="perturbation strength", ylabel="KL(clean || perturbed) (nats)",
                   title="Robustness: divergence")


def plot_amp_layer_error(amp: pd.DataFrame, tolerance: float, path=None):
    """Relative error of each layer's output under each compared autocast precision against fp32, in forward order;
    the dashed line is the drift tolerance, red names mark activations beyond a compared precision's range."""
    fig, ax = plt.subplots(figsize=(max(7, 0.25 * len(amp)), 4.5))
    x = np.arange(len(amp))
    for p in compared():
        err = amp[f"rel_error_{p}"].replace([np.inf], np.nan).clip(lower=1e-8)
        ax.plot(x, err, marker=".", color=color(p), label=short_label(p))
    ax.axhline(tolerance, color="gray", linestyle="--", label=f"tolerance {tolerance:.0%}")
    ax.set_xticks(x, amp["layer"], rotation=90, fontsize=6)
    beyond = amp.filter(like="beyond_").any(axis=1)  # a column per precision with a range (layer_errors)
    for tick, over in zip(ax.get_xticklabels(), beyond):
        if over:
            tick.set_color("tab:red")
    return _finish(ax, path, yscale="log", ylabel="relative error vs fp32 (log)",
                   title="AMP readiness: per-layer error under autocast")


def plot_verdict_grid(summary: pd.DataFrame, path=None):
    """One row per run, one column per check: green pass, orange warn, red fail, black a run that crashed
    or timed out (its whole row; a batch in which every run crashed has one column)."""
    checks = [c for c in summary.columns if c.startswith("verdict.")]
    codes = {"pass": 0, "warn": 1, "fail": 2, "crashed": 3}
    grid = np.full((len(summary), max(1, len(checks))), np.nan)
    for i, (_, row) in enumerate(summary.iterrows()):
        if row["run_status"] != OK:
            grid[i, :] = codes["crashed"]
        else:
            grid[i, :len(checks)] = [codes[row[c]] if isinstance(row[c], str) else np.nan for c in checks]
    cmap = ListedColormap(["tab:green", "tab:orange", "tab:red", "black"])  # the order of codes
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(checks) + 3), max(2.5, 0.45 * len(summary) + 1.5)))
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=3, aspect="auto")
    for (i, j), code in np.ndenumerate(grid):
        if code == code:  # not NaN: this run has this check
            ax.text(j, i, list(codes)[int(code)], ha="center", va="center", color="white", fontsize=8)
    labels = [c.removeprefix("verdict.") for c in checks] or ["(no check ran)"]
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(summary)), [f"{r} ({s})" if s != OK else r for r, s in zip(summary["run_id"], summary["run_status"])])
    ax.set_title("Verdicts per run: green pass, orange warn, red fail, black crashed; blank: not run in that tier", fontsize=9)
    return save_figure(fig, path)


def sweep_labels(runs: pd.DataFrame) -> list:
    """Each run named by the grid's axes: the parameters whose values differ between these runs (else the run id);
    where a run keeps its files and whether it was resumed (RUN_CONTROL) are no axes."""
    axes = [c for c in runs.columns if c.startswith("param.") and c.removeprefix("param.") not in RUN_CONTROL
            and runs[c].astype(str).nunique() > 1]
    if not axes:
        return list(runs["run_id"])
    return [", ".join(f"{c.removeprefix('param.')}={row[c]}" for c in axes) for _, row in runs.iterrows()]


def plot_sweep(summary: pd.DataFrame, path=None):
    """Tier 3 across a sweep, a bar per run: AMP's speedup over fp32 with its 95% interval (left; 1.0 is break-even)
    and the loss parity gap against its tolerance (right). None when no tier-3 run has a speedup yet."""
    runs = summary[summary["speedup"].notna()].reset_index(drop=True) if "speedup" in summary.columns else summary.iloc[:0]
    if runs.empty:
        return None
    names, y = sweep_labels(runs), np.arange(len(runs))
    colors = [color(p, "tab:blue") for p in runs.get("amp_precision", pd.Series(["?"] * len(runs)))]
    fig, (speed, gap) = plt.subplots(1, 2, figsize=(11, max(2.5, 0.5 * len(runs) + 1.5)), sharey=True)
    err = np.array([runs["speedup"] - runs["speedup_ci_low"], runs["speedup_ci_high"] - runs["speedup"]])
    speed.barh(y, runs["speedup"], xerr=err, color=colors, capsize=3)
    speed.axvline(1.0, color="black", lw=0.8, ls="--")
    speed.set_yticks(y, names)
    speed.invert_yaxis()
    speed.set_xlabel("AMP speedup over fp32 (median, 95% CI); right of the dashed line: AMP is faster")
    # An unbounded gap (a NaN loss) is drawn at 1000%; a run recorded before the gap was (no figure) in grey, at 0.
    found = runs.get("parity_gap", pd.Series(np.nan, index=runs.index)).astype(float)
    tolerance = runs.get("parity_tolerance", pd.Series(np.nan, index=runs.index)).astype(float)
    gap.barh(y, 100 * found.clip(upper=10.0).fillna(0.0),
             color=["gray" if g != g else "tab:red" if g > t else "tab:green" for g, t in zip(found, tolerance)])
    for line in tolerance.dropna().unique():
        gap.axvline(100 * line, color="black", lw=0.8, ls="--")
    gap.set_xlabel("loss parity gap, % of fp32 (largest, smoothed); red: beyond the tolerance (dashed); grey: not recorded")
    fig.suptitle("Tier 3 per run: is AMP faster, and does it train like fp32?", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_comparison(table: pd.DataFrame, path=None):
    """A batch against its baseline (utils.runner.baseline.compare): a row per run, a column per check, figure or run
    status compared; red a regression that gates, orange worse but gating only with --fail-on-figures (a timing check, a
    figure), green better, grey the same or within tolerance, black a run without its counterpart. A run whose
    environment changed says so in its label."""
    table = table.assign(run=table["run_id"].fillna(table["baseline_run_id"]))
    compared = table[table["kind"] != "environment"]
    runs, names = list(dict.fromkeys(compared["run"])), list(dict.fromkeys(compared["name"]))
    grid = np.full((max(1, len(runs)), max(1, len(names))), np.nan)
    for row in compared.itertuples():
        grid[runs.index(row.run), names.index(row.name)] = (4 if row.name == "counterpart" else 3 if row.gates else
                                                            2 if row.regression else 1 if row.outcome == "better" else 0)
    cmap = ListedColormap(["#bbbbbb", "tab:green", "tab:orange", "tab:red", "black"])  # the codes above, in order
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 3), max(2.5, 0.45 * len(runs) + 1.5)))
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=4, aspect="auto")
    changed = set(table.loc[table["kind"] == "environment", "run"])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(runs)), [f"{r} (environment changed)" if r in changed else r for r in runs])
    ax.set_title("Against the baseline: red worse (gates), orange worse (gates with --fail-on-figures), green better, "
                 "grey the same, black no counterpart", fontsize=9)
    return save_figure(fig, path)
