"""Builds the three tier notebooks with nbformat: the one place their cells are written. Never edit
the .ipynb JSON by hand (Colab cannot tag cells, and hand-edited JSON breaks).

    python notebooks/build.py            # write the notebooks, without outputs
    python notebooks/build.py --execute  # write them, then run each with its default parameters
                                         # (papermill, in place): the outputs nbval compares against
"""

import argparse
import sys
from pathlib import Path

import nbformat
import papermill
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
# Where the repository is published: Colab badges and the Colab set-up cell clone from here.
GITHUB_REPO = "transformer-amp-suite/transformer-amp-suite"
CHECKOUT = "transformer-amp-suite"


def badge(filename: str) -> str:
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/notebooks/{filename}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


SETUP = f'''\
# Set-up. In Colab: fetch the repository and install its requirements. Elsewhere: use this checkout.
import os
import subprocess
import sys
from pathlib import Path

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    if not Path("{CHECKOUT}").exists():
        subprocess.run(["git", "clone", "-q", "https://github.com/{GITHUB_REPO}.git", "{CHECKOUT}"], check=True)
    os.chdir("{CHECKOUT}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], check=True)
# SUITE_ROOT overrides the search (tests run copies of these notebooks from elsewhere).
ROOT = Path(os.environ.get("SUITE_ROOT") or next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "utils").is_dir()))
sys.path.insert(0, str(ROOT))

import torch

if torch.cuda.is_available():
    print(f"GPU runtime: {{torch.cuda.get_device_name(0)}}")
else:
    print("No GPU: running on the CPU." + (" In Colab choose Runtime > Change runtime type > GPU." if IN_COLAB else ""))'''


def parameters_cell(params):
    """The cell papermill overrides: one knob a line, each with a comment."""
    lines = ["# Parameters. papermill: -p name value; the batch runner: python -m utils.run -p name=value"]
    for name, value, comment in params:
        if "=" in comment:  # papermill skips any parameter line holding a second '='
            raise ValueError(f"the comment of parameter {name!r} must not contain '='")
        lines.append(f"{name} = {value!r}  # {comment}")
    cell = new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["parameters"]
    return cell


def resolve_cell(params, tier: str):
    """Records the parameters as run, and says what device and precision they mean here."""
    names = ", ".join(f"{name}={name}" for name, _, _ in params)
    return new_code_cell(f'''\
from utils.models import count_parameters, load_model
from utils.results import write_json_atomic
from utils.training.amp_utils import resolve_device, resolve_precision

PARAMETERS = dict({names})
OUTPUT = Path(output_dir) if output_dir else ROOT / "runs" / "interactive" / "{tier}"
OUTPUT.mkdir(parents=True, exist_ok=True)
DEVICE = resolve_device(None if device == "auto" else device)
plan = resolve_precision(PARAMETERS.get("precision", "auto"), DEVICE)
torch.manual_seed(seed)  # the model's initial weights are part of the run: same seed, same weights
net = load_model(model, **model_kwargs).to(DEVICE)
print(f"model: {{model}} ({{type(net).__name__}}, {{count_parameters(net):,}} parameters) on {{DEVICE}}")
print(f"precision: {{plan.precision}} ({{plan.reason}})")''')


COMMON = [("model", "gpt-tiny", "registry name, 'package.module:factory' or 'path/to/file.py:factory'"),
          ("model_kwargs", {}, "keyword arguments for the model factory (registry: config overrides)"),
          ("device", "auto", "'auto' (CUDA if available), 'cpu' or 'cuda'")]
TAIL = [("seed", 0, "seeds weights, data order and probes"),
        ("output_dir", "", "where results.json and charts go (empty: runs/interactive/<tier>)")]


def verdict_lines(timing_checks):
    """Prints each verdict; timing-based ones are tagged so nbval's sanitizer masks their status."""
    return f'''\
for v in result.verdicts:
    timing = " (timing)" if v.check in {tuple(timing_checks)!r} else ""
    print(f"[{{v.status}}]{{timing}} {{v.check}}: {{v.reason}}")'''


def tier1():
    params = COMMON + [("seq_len", 32, "tokens per sequence for the checks (capped at the model's maximum)"),
                       ("batch_sizes", [1, 2, 4, 8, 16], "batch sizes the memory check tries, smallest first"),
                       ("latency_iters", 30, "timed forwards for the latency percentiles")] + TAIL
    return [
        new_markdown_cell(f"""# Tier 1: does the model work at all?
{badge("tier1_validation.ipynb")}

Six checks, each ending in a verdict (**pass / warn / fail**) with a reason that names the input, parameter or
batch size at fault and what to try. Bring your own model with the `model` parameter: a registry name
(`gpt-tiny`, `gpt-small`, `encoder-tiny`, ...), `package.module:factory` or `path/to/file.py:factory`.
Outputs may be a tensor, a tuple, a dict with `logits`, or an object with `.logits` (Hugging Face style)."""),
        new_code_cell(SETUP),
        parameters_cell(params),
        resolve_cell(params, "tier1"),
        new_code_cell('''\
from utils.plotting import plot_gradient_norms, plot_init_std, plot_latency, plot_memory_vs_batch, show
from utils.tier1_critical_validation import run_tier1

result = run_tier1(net, seq_len=seq_len, batch_sizes=tuple(batch_sizes), seed=seed, latency_iters=latency_iters)
checks = result.checks'''),
        new_markdown_cell("""## Shapes over edge cases
Batch 1, sequence length 1, the model's maximum length, a padding mask and a batch of mixed content (all zeros,
the largest token id, random). The expected shape comes from the model itself: `(batch, seq, vocab)` for a causal
LM, `(batch, classes)` for a classifier. A failure usually means a hard-coded size in a reshape or position table."""),
        new_code_cell('print(checks["shapes"].verdict.reason)\nchecks["shapes"].data'),
        new_markdown_cell("""## Gradient flow
One forward and backward on real data. Each bar is a parameter's gradient norm on a log scale; red bars are
flagged: **unused** (no gradient: not in the forward, or cut by `.detach()`), **NaN**, **vanishing** or **exploding**."""),
        new_code_cell('print(checks["gradient_flow"].verdict.reason)\n'
                      'show(plot_gradient_norms(checks["gradient_flow"].data, path=OUTPUT / "gradient_norms.png"))'),
        new_markdown_cell("""## Numerical stability
Outputs over random, repeated-token and extreme-id inputs: any NaN or Inf fails; very large logits warn (they
saturate softmax and overflow fp16)."""),
        new_code_cell('print(checks["numerics"].verdict.reason)\nchecks["numerics"].data.round(4)'),
        new_markdown_cell("""## Initialization
Standard deviation of every parameter as initialized (log scale). All-zero weight matrices fail (their units never
differentiate); tiny or huge spreads warn. Biases and norm gains are constant by design and not flagged."""),
        new_code_cell('print(checks["initialization"].verdict.reason)\n'
                      'show(plot_init_std(checks["initialization"].data, path=OUTPUT / "init_std.png"))'),
        new_markdown_cell("""## Memory footprint vs batch size
One training step per batch size: the CUDA allocator's peak on a GPU, or on a CPU the bytes of activations
autograd saves for backward. The check stops cleanly at the first out-of-memory and reports the largest batch that fit.
A straight line means memory is dominated by activations: AMP and activation checkpointing shrink it."""),
        new_code_cell('print(checks["memory"].verdict.reason)\n'
                      'show(plot_memory_vs_batch(checks["memory"].data, path=OUTPUT / "memory_vs_batch.png"))'),
        new_markdown_cell("""## Inference latency
Forward passes after warm-up, with the device synchronized around each. The histogram marks p50, p95 and p99; a
long tail points at data-dependent work or a busy machine. Timings vary from run to run, so this cell's output is
not compared by nbval."""),
        new_code_cell('# NBVAL_IGNORE_OUTPUT\nprint(checks["latency"].verdict.reason)\n'
                      'show(plot_latency(checks["latency"].data, checks["latency"].extra, path=OUTPUT / "latency.png"))'),
        new_markdown_cell("## Verdicts\nThe worst status decides the tier. `results.json` in the output directory holds them for the batch runner."),
        new_code_cell(verdict_lines(["latency"]) + '''
write_json_atomic(OUTPUT / "results.json", {"tier": 1, "parameters": PARAMETERS, "precision": plan.to_dict(),
                                            **result.to_dict(), "figures": {"parameters": count_parameters(net)}})
print(f"Tier 1: {result.status}")'''),
    ]


def tier2():
    params = COMMON + [("precision", "auto", "autocast precision AMP readiness compares with fp32: auto, 16-mixed, bf16-mixed"),
                       ("batch_size", 4, "sequences analyzed"),
                       ("seq_len", 32, "tokens per sequence (capped at the model's maximum)"),
                       ("strengths", [0.01, 0.05, 0.1, 0.2], "perturbation strengths for the robustness curves"),
                       ("amp_tolerance", 0.05, "relative error beyond which a layer counts as drifting under autocast")] + TAIL
    return [
        new_markdown_cell(f"""# Tier 2: how does the model behave?
{badge("tier2_analysis.ipynb")}

Attention patterns per head, robustness to perturbations, and **AMP readiness**: the forward pass in fp32 and under
autocast side by side, layer by layer, to find where mixed precision first drifts or overflows before you train with it."""),
        new_code_cell(SETUP),
        parameters_cell(params),
        resolve_cell(params, "tier2"),
        new_code_cell('''\
from utils.plotting import plot_amp_layer_error, plot_attention_entropy, plot_attention_maps, plot_robustness, show
from utils.tier2_advanced_analysis import run_tier2

result = run_tier2(net, batch_size=batch_size, seq_len=seq_len, precision=precision, seed=seed,
                   strengths=tuple(strengths), amp_tolerance=amp_tolerance)
checks = result.checks'''),
        new_markdown_cell("""## Attention patterns
Each map is one head's attention (mean over the batch): rows are queries, columns keys; a causal model shows a
lower triangle. Below, each head's entropy normalized to its allowed keys (1 = uniform, 0 = one key) and its mean
peak weight. A **collapsed** head puts over 90% of its weight on one key."""),
        new_code_cell('print(checks["attention"].verdict.reason)\n'
                      'if "maps" in checks["attention"].arrays:\n'
                      '    show(plot_attention_maps(checks["attention"].arrays["maps"], path=OUTPUT / "attention_maps.png"))\n'
                      '    show(plot_attention_entropy(checks["attention"].data, path=OUTPUT / "attention_entropy.png"))'),
        new_markdown_cell("""## Robustness
Predictions on the same inputs under Gaussian noise added to the embeddings (strength = noise std relative to the
embedding's) and under random token substitution (strength = fraction replaced). Left: agreement with the clean
predictions; right: KL divergence. Steep early drops mean a fragile model."""),
        new_code_cell('print(checks["robustness"].verdict.reason)\n'
                      'show(plot_robustness(checks["robustness"].data, path=OUTPUT / "robustness.png"))\n'
                      'checks["robustness"].data.round(4)'),
        new_markdown_cell("""## AMP readiness
Every layer's output under fp16 and bf16 autocast, relative to fp32, in forward order (log scale); the dashed line is
the drift tolerance. Layer names in red carry activations beyond fp16's maximum (65504): there fp16 overflows to Inf
and a GradScaler will skip every step. bf16 has fp32's range but fewer digits, so it drifts, but it does not overflow."""),
        new_code_cell('amp = checks["amp_readiness"]\nprint(amp.verdict.reason)\n'
                      'if len(amp.data):\n'
                      '    show(plot_amp_layer_error(amp.data, amp_tolerance, path=OUTPUT / "amp_layer_error.png"))\n'
                      '    print({k: v for k, v in amp.extra.items() if k != "tolerance"})'),
        new_markdown_cell("## Verdicts"),
        new_code_cell(verdict_lines([]) + '''
write_json_atomic(OUTPUT / "results.json", {"tier": 2, "parameters": PARAMETERS, "precision": plan.to_dict(),
                                            **result.to_dict()})
print(f"Tier 2: {result.status}")'''),
    ]


def tier3():
    params = [("model", "gpt-small", "registry name, 'package.module:factory' or 'path/to/file.py:factory'"),
              COMMON[1], COMMON[2],
              ("precision", "auto", "the AMP precision compared with fp32: auto, 16-mixed, bf16-mixed"),
              ("steps", 60, "optimizer steps of each fine-tuning run (fp32 and AMP)"),
              ("batch_size", 16, "sequences per step"),
              ("seq_len", 128, "tokens per sequence"),
              ("lr", 1e-3, "peak learning rate (warm-up, then cosine decay)"),
              ("trials", 3, "interleaved speed trials per precision"),
              ("warmup_steps", 3, "steps per trial excluded from timing"),
              ("timed_steps", 5, "timed steps per trial"),
              ("parity_tolerance", 0.05, "largest relative loss gap for 'AMP is safe'"),
              ("sweep_batch_sizes", [], "batch sizes for the speedup sweep, e.g. [4, 8, 32] (empty: no sweep)")] + TAIL
    return [
        new_markdown_cell(f"""# Tier 3: fine-tune in fp32 and with AMP. Is AMP safe, and is it worth it?
{badge("tier3_training.ipynb")}

Both runs start from the same weights and see the same data in the same order under the same schedule; only the
precision differs. Speed is measured in interleaved trials (fp32, AMP, fp32, AMP, ...) after warm-up steps, with the
device synchronized, and the speedup carries a bootstrap interval. On a T4 AMP means fp16 with a GradScaler; on an
A100/H100 bf16; on a CPU with AVX512-BF16/AMX bf16."""),
        new_code_cell(SETUP),
        parameters_cell(params),
        resolve_cell(params, "tier3"),
        new_code_cell('''\
from utils.plotting import plot_loss_curves, plot_loss_scale, plot_memory, plot_speedup_sweep, plot_throughput, show
from utils.training.amp_benchmark import test_amp_speedup_benchmark

result = test_amp_speedup_benchmark(net, precision=precision, device=DEVICE, batch_size=batch_size, seq_len=seq_len,
                                    trials=trials, warmup_steps=warmup_steps, timed_steps=timed_steps,
                                    parity_steps=steps, parity_tolerance=parity_tolerance, lr=lr, seed=seed,
                                    batch_sizes=tuple(sweep_batch_sizes))
s = result.summary
result.save(OUTPUT / "benchmark.json")
print(f"fp32 vs {s['amp_precision']}: {s['precision_reason']}")'''),
        new_markdown_cell("""## Loss curves
Training loss per step for both precisions; below, the gap between their 10-step rolling medians (a one-step spike
that recovers does not count, a lasting drift does) against the tolerance. Crosses mark steps the GradScaler skipped."""),
        new_code_cell('''\
show(plot_loss_curves(result.parity, s["amp_precision"], s["parity"]["tolerance"], path=OUTPUT / "loss_curves.png"))
p = s["parity"]
print(f"final eval loss: fp32 {p['final_eval_loss']['32']:.4f}, {s['amp_precision']} {p['final_eval_loss'][s['amp_precision']]:.4f} "
      f"(gap {p['final_eval_relative_gap']:.2%}); max rolling gap {p['max_relative_gap']:.2%} at step {p['max_gap_step']}")'''),
        new_markdown_cell("""## Speed
Tokens per second, the median of the interleaved trials with bars from the slowest to the fastest. The printed
figures add the speedup interval, model-FLOPs utilization against a matmul peak measured on this machine in each
precision, and Amdahl's bound: only the matmul share of the fp32 step speeds up under autocast. Timings vary from
run to run, so this cell's output is not compared by nbval."""),
        new_code_cell('''\
# NBVAL_IGNORE_OUTPUT
show(plot_throughput(result.trials, path=OUTPUT / "throughput.png"))
amp_p = s["amp_precision"]
print(f"speedup {s['speedup']['median']:.2f}x (95% CI {s['speedup']['ci_low']:.2f}-{s['speedup']['ci_high']:.2f}); "
      f"tokens/s fp32 {s['tokens_per_s']['32']:.0f}, {amp_p} {s['tokens_per_s'][amp_p]:.0f}")
print(f"matmul peak ratio {s['matmul_ratio']:.2f}x; GEMM share of the fp32 step {s['gemm_time_fraction_fp32']:.0%}; "
      f"Amdahl bound {s['amdahl_speedup_bound']:.2f}x; MFU fp32 {s['mfu']['32']:.0%}, {amp_p} {s['mfu'][amp_p]:.0%}")'''),
        new_markdown_cell("""## Memory
Activations saved for backward per precision (measured on any device with saved-tensor hooks), beside parameters and
AdamW state, which autocast leaves in fp32. On a GPU the allocator's peak per precision is added."""),
        new_code_cell('''\
show(plot_memory(s["memory"], path=OUTPUT / "memory.png"))
print(f"activation memory saved by {s['amp_precision']}: {s['memory']['activation_saving']:.1%}")'''),
        new_markdown_cell("""## Loss scale and skipped steps
With fp16 the GradScaler multiplies the loss before backward and halves the scale whenever gradients overflow,
skipping that step (the learning-rate schedule holds). bf16 and fp32 need no scaler: the scale stays at 1."""),
        new_code_cell('''\
show(plot_loss_scale(result.parity, path=OUTPUT / "loss_scale.png"))
print(f"skipped steps: {s['parity']['skipped_steps']} of {s['parity']['steps']}; final loss scale {s['parity']['final_loss_scale']:g}")'''),
        new_markdown_cell("""## Where AMP starts to pay
With `sweep_batch_sizes`, the speedup at each batch size: small batches leave matmuls too small to profit."""),
        new_code_cell('''\
# NBVAL_IGNORE_OUTPUT
if len(result.sweep):
    show(plot_speedup_sweep(result.sweep, path=OUTPUT / "speedup_sweep.png"))
    display(result.sweep.round(3))
else:
    print("no sweep: set sweep_batch_sizes, e.g. [4, 8, 32]")'''),
        new_markdown_cell("""## Verdicts
**amp_safe**: loss parity within the tolerance, finite losses, no runaway skipped steps. **amp_worth_it**: the speedup
interval lies above 1 (its status depends on timing, so nbval masks it)."""),
        new_code_cell(verdict_lines(["amp_worth_it"]) + '''
from utils.verdicts import worst_status

figures = {"amp_precision": s["amp_precision"], "speedup": s["speedup"]["median"], "speedup_ci_low": s["speedup"]["ci_low"],
           "speedup_ci_high": s["speedup"]["ci_high"], "tokens_per_s_fp32": s["tokens_per_s"]["32"],
           "tokens_per_s_amp": s["tokens_per_s"][s["amp_precision"]], "activation_saving": s["memory"]["activation_saving"],
           "final_eval_loss_fp32": s["parity"]["final_eval_loss"]["32"],
           "final_eval_loss_amp": s["parity"]["final_eval_loss"][s["amp_precision"]],
           "skipped_steps": s["parity"]["skipped_steps"]}
status = worst_status(result.verdicts)
write_json_atomic(OUTPUT / "results.json", {"tier": 3, "parameters": PARAMETERS, "precision": plan.to_dict(), "status": status,
                                            "verdicts": result.verdict_table().to_dict("records"), "figures": figures})
print(f"Tier 3: {status}")'''),
    ]


NOTEBOOKS = {"tier1_validation.ipynb": tier1, "tier2_analysis.ipynb": tier2, "tier3_training.ipynb": tier3}


def build(path: Path, cells) -> None:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU", "colab": {"provenance": []}})  # Colab opens it on a GPU runtime
    nbformat.validate(nb)
    nbformat.write(nb, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true", help="run each notebook in place with its default parameters")
    args = parser.parse_args(argv)
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        build(path, cells())
        if args.execute:
            print(f"executing {name} ...", flush=True)
            papermill.execute_notebook(str(path), str(path), cwd=str(HERE), progress_bar=False, kernel_name="python3")
        print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
