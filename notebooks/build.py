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
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from utils.runner.execute import run_notebook  # noqa: E402  (the checkout's utils, found through the line above)
from utils.tiers import TIERS  # noqa: E402
# Where the repository is published: Colab badges and the Colab set-up cell clone from here.
GITHUB_REPO = "transformer-amp-suite/transformer-amp-suite"
CHECKOUT = "transformer-amp-suite"


def badge(filename: str) -> str:
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/notebooks/{filename}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


SETUP = f'''\
# NBVAL_IGNORE_OUTPUT (the runtime differs from machine to machine)
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
# The suite: SUITE_ROOT, else the first of this folder and its parents that holds utils/ (a copy run elsewhere sets it).
ROOT = os.environ.get("SUITE_ROOT") or next((str(p) for p in [Path.cwd(), *Path.cwd().parents]
                                             if (p / "utils" / "tiers.py").is_file()), "")
if not (Path(ROOT) / "utils" / "tiers.py").is_file():
    where = f"at SUITE_ROOT={{ROOT}}" if os.environ.get("SUITE_ROOT") else f"in {{Path.cwd()}} or its parents"
    raise SystemExit(f"the suite (its utils/ folder) was not found {{where}}: run this notebook from inside the checkout, "
                     "or set SUITE_ROOT=/path/to/the/checkout")
sys.path.insert(0, ROOT)

import torch

from utils.loop.stops import sigterm_as_ctrl_c

sigterm_as_ctrl_c()  # a scheduler's SIGTERM stops a cell as Ctrl-C does: fine-tuning checkpoints first

if torch.cuda.is_available():
    print(f"GPU runtime: {{torch.cuda.get_device_name(0)}}")
else:
    print("No GPU: running on the CPU." + (" In Colab choose Runtime > Change runtime type > GPU." if IN_COLAB else ""))'''


def parameters_cell(tier: int):
    """The cell papermill overrides, generated from the tier's parameter spec: one knob a line, with its help."""
    lines = ["# Parameters (utils/params.py). papermill: -p name value; the batch runner: python -m utils.run -p name=value"]
    for p in TIERS[tier].params:
        if "=" in p.help:  # papermill skips any parameter line holding a second '='
            raise ValueError(f"the help of parameter {p.name!r} must not contain '='")
        lines.append(f"{p.name} = {p.default!r}  # {p.help}")
    cell = new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["parameters"]
    return cell


def run_cells(tier: int):
    """One call runs the tier and writes its results; then what ran, which differs per machine."""
    # A renamed parameter keeps its former name under papermill too (-p warmup_steps 5 sets timing_warmup_steps).
    names = ", ".join(f"{p.name}=globals().get({p.formerly!r}, {p.name})" if p.formerly else f"{p.name}={p.name}"
                      for p in TIERS[tier].params)
    return [new_code_cell(f'''\
from utils.present import describe, headline, present, summarize
from utils.tiers import run_tier, save_tier

result = run_tier({tier}, dict({names}))
charts = save_tier(result)  # results.json and the charts, in output_dir
headline(result)'''),
            new_markdown_cell("""### What ran
Device, precision and why, software versions, and the headline figures. They differ from machine to machine, so
nbval does not compare this cell; every verdict below is compared, except timing ones."""),
            new_code_cell("# NBVAL_IGNORE_OUTPUT\ndescribe(result)")]


# Checks whose whole section depends on the machine: amp_worth_it times nothing where the AMP precision is only emulated
# (tier 3's emulated_amp), so even its table's presence differs between two CPUs.
# nbval reads its marker only on a line of its own.
MACHINE_SECTIONS = {"amp_worth_it": "# NBVAL_IGNORE_OUTPUT\n# (timing: nothing is timed where the AMP precision is emulated)\n"}


def section(title: str, text: str, check: str):
    """A section: the markdown that says how to read it, then the check's verdict, table columns and charts."""
    return [new_markdown_cell(f"## {title}\n{text}"),
            new_code_cell(f'{MACHINE_SECTIONS.get(check, "")}present(result, "{check}", charts)')]


def notebook(tier: int, title: str, intro: str, prose: dict, verdicts: str):
    """A tier's notebook: a section per check, in the order the registry (utils.tiers) gives, each with its prose
    (check -> (title, text))."""
    cells = [new_markdown_cell(f"# {title}\n{badge(TIERS[tier].notebook)}\n\n{intro}"), new_code_cell(SETUP), parameters_cell(tier),
             *run_cells(tier)]
    for check in TIERS[tier].sections:
        cells += section(*prose[check], check)
    return cells + [new_markdown_cell(f"## Verdicts\n{verdicts}"), new_code_cell("summarize(result)")]


def tier1():
    return notebook(1, "Tier 1: does the model work at all?", """\
Seven checks, each ending in a verdict (**pass / warn / fail**) with a reason that names the input, parameter or
batch size at fault and what to try. Bring your own model with the `model` parameter: a registry name
(`gpt-tiny`, `encoder-small`, ...), `hf:NAME_OR_PATH` (Hugging Face), `package.module:factory` or
`path/to/file.py:factory`. A model the suite cannot handle (an encoder-decoder, a vision model, logits for fewer
positions than given) is refused in one line that says what is supported. Every table behind a section is
`result.checks[name].data`, and `results.json` holds them all.""", {
        "shapes": ("Shapes over edge cases", """\
Batch 1, sequence length 1, the model's maximum length, a padding mask and a batch of mixed content (all zeros,
the largest token id, random). The expected shape comes from the model itself: `(batch, seq, vocab)` for a causal
LM, `(batch, classes)` for a classifier. A failure usually means a hard-coded size in a reshape or position table."""),
        "causality": ("Causality", """\
For a causal LM, the logits at a position may depend only on the tokens up to it: the second half of the input is
changed and the first half's logits must not move. A model that sees the future fails (a missing causal mask); a
classifier or masked LM sees the whole sequence by design, so the check does not apply."""),
        "gradient_flow": ("Gradient flow", """\
One forward and backward on real data. Each bar is a parameter's gradient norm on a log scale; red bars are
flagged: **unused** (no gradient: not in the forward, or cut by `.detach()`), **NaN**, **vanishing** or **exploding**."""),
        "numerics": ("Numerical stability", """\
Outputs over random, repeated-token and extreme-id inputs: any NaN or Inf fails; very large logits warn (they
saturate softmax and overflow fp16)."""),
        "initialization": ("Initialization", """\
Standard deviation of every parameter as initialized (log scale). All-zero weight matrices fail (their units never
differentiate); tiny or huge spreads warn. Biases and norm gains are constant by design and not flagged."""),
        "memory": ("Memory footprint vs batch size", """\
One training step per batch size: the CUDA allocator's peak on a GPU, or on a CPU the bytes of activations
autograd saves for backward. The check stops cleanly at the first out-of-memory and reports the largest batch that fit.
A straight line means memory is dominated by activations: AMP and activation checkpointing shrink it."""),
        "latency": ("Inference latency", """\
Forward passes after warm-up, with the device synchronized around each. The histogram marks p50, p95 and p99; a
long tail points at data-dependent work or a busy machine. This is a **timing** verdict: it can change on a busy
machine, so it does not decide the tier's status and nbval does not compare it."""),
    }, "The worst non-timing status decides the tier. `results.json` in the output directory holds everything for the batch runner.")


def tier2():
    return notebook(2, "Tier 2: how does the model behave?", """\
Attention patterns per head, robustness to perturbations, and **AMP readiness**: the forward pass in fp32 and under
autocast side by side, layer by layer, to find where mixed precision first drifts or overflows before you train with it.""", {
        "attention": ("Attention patterns", """\
Each map is one head's attention (mean over the batch): rows are queries, columns keys; a causal model shows a
lower triangle. Below, each head's entropy normalized to its allowed keys (1 = uniform, 0 = one key) and its mean
peak weight. A **collapsed** head puts over 90% of its weight on one key."""),
        "robustness": ("Robustness", """\
Predictions on the same inputs under Gaussian noise added to the embeddings (strength = noise std relative to the
embedding's) and under random token substitution (strength = fraction replaced). Left: agreement with the clean
predictions; right: KL divergence. Steep early drops mean a fragile model."""),
        "amp_readiness": ("AMP readiness", """\
Every layer's output under fp16 and bf16 autocast, relative to fp32, in forward order (log scale); the dashed line is
the drift tolerance. Layer names in red carry activations beyond fp16's maximum (65504): there fp16 overflows to Inf
and a GradScaler will skip every step. bf16 has fp32's range but fewer digits, so it drifts, but it does not overflow."""),
    }, "The worst status decides the tier; `results.json` holds the verdicts and tables.")


def tier3():
    return notebook(3, "Tier 3: fine-tune in fp32 and with AMP. Is AMP safe, and is it worth it?", """\
Both runs start from the same weights and see the same data in the same order under the same schedule; only the
precision differs. Speed is measured in interleaved trials (fp32, AMP, fp32, AMP, ...) after warm-up steps, with the
device synchronized, and the speedup carries a bootstrap interval from 3 trials up. On a T4 AMP means fp16 with a
GradScaler; on an A100/H100 bf16; on a CPU bf16. Where the device only emulates the AMP precision (bf16 on a CPU
without AVX512-BF16/AMX, as most laptops; fp16 on nearly every CPU), `emulated_amp = "short"` (the default) compares at batch
1 and times nothing, since emulated speed says nothing about AMP: the verdicts say so, and `"full"` runs it all.

A long run survives a stop: interrupt the kernel (or a scheduler's SIGTERM) during fine-tuning and the run
checkpoints, ends with an `interrupted` verdict and keeps what it did; run again with `resume = True` to continue
bit for bit (`checkpoint_every` also checkpoints on the way). A run whose loss goes NaN, or whose fp16 steps are
skipped `max_skipped_in_a_row` times in a row (an overflow storm), stops itself with a diagnosis: the step, the
loss scale's fall and the layer with the largest activation.""", {
        "fp32_baseline": ("Is the fp32 baseline sound?", """\
AMP is judged against fp32, so fp32 must train first: a baseline whose loss goes NaN or rises (a learning rate too
high, a broken model) fails here, and then AMP is not blamed for it (amp_safe says it was not judged)."""),
        "amp_safe": ("Is AMP safe? Loss curves and loss scale", """\
Training loss per optimizer update for both precisions, update for update: a step the GradScaler skips is not an
update, so the fp16 run makes it up on the same batch and its k-th update sits beside fp32's k-th. Below, the gap
between their 10-update rolling medians (a one-update spike that recovers does not count, a lasting drift does)
against the tolerance; crosses mark updates made after skipped steps. The second chart is the loss scale per step:
with fp16 the GradScaler halves it whenever gradients overflow and skips that step. Its calibration (the descent from
its first guess, 65536, and isolated back-offs after which steps stand again) is normal and not held against AMP;
skips that keep coming, a scale below 1 and storms are. bf16 and fp32 need no scaler, so it stays at 1."""),
        "amp_worth_it": ("Is AMP worth it? Speed and memory", """\
Tokens per second, the median of the interleaved trials with bars from the slowest to the fastest; activations saved
for backward per precision beside parameters and AdamW state (which autocast leaves in fp32), and on a GPU the
allocator's peak; with `sweep_batch_sizes`, the speedup per batch size (small batches leave matmuls too small to
profit). MFU, the matmul peak ratio and Amdahl's bound are in the figures above. This is a **timing** verdict: it
does not decide the tier's status and nbval does not compare it. Where the AMP precision is only emulated, nothing
is timed (see above)."""),
        "diagnosis": ("Diagnosis: why AMP failed, and which remedy works", """\
Only when amp_safe fails (on a healthy run it says there is nothing to diagnose). The failing AMP run is run again
with probes on every layer and parameter (never in the speed trials): the cause is the first layer whose output leaves
the precision's range (fp16: beyond 65504) with its step, else the first parameters whose gradients overflow before
unscaling (and the step the loss scale collapsed), else the layers that drift most from fp32. Then remedies, each a
parity run of its own, until one passes or `remedy_runs` are spent: the blamed layer in fp32 (`fp32_modules` asks for
it by name), bf16 instead of fp16, a gentler loss scale. The chart: each run's largest loss gap against the
tolerance, and its skipped steps; green passes."""),
    }, "**fp32_baseline**: fp32 itself trains (its loss is finite, moves and does not diverge). **amp_safe**: loss parity update for update within the tolerance, finite "
       "losses, no skipping beyond the GradScaler's calibration, no collapsed scale and no overflow storm. **amp_worth_it**: the speedup interval lies above 1 (a timing verdict). "
       "**diagnosis**: the cause of an amp_safe failure and the remedy that passes parity (warn), or none (fail). "
       "**interrupted** (instead of the four): the run was stopped and can be resumed.")


NOTEBOOKS = {1: tier1, 2: tier2, 3: tier3}


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
    for tier, cells in NOTEBOOKS.items():
        name = TIERS[tier].notebook
        path = HERE / name
        build(path, cells())
        if args.execute:
            print(f"executing {name} ...", flush=True)
            run_notebook(path, path, cwd=str(HERE), progress_bar=False)
        print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
