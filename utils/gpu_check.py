"""The GPU check: one command, a few minutes on one GPU, one JSON and one chart.

    python -m utils.gpu_check                  # on a GPU: writes benchmarks/<gpu name>/gpu_check.json and .png
    python -m utils.gpu_check --device cpu --quick --out /tmp/check   # the same plumbing on a CPU, tiny sizes

It runs the `gpu` tests (pytest -m gpu), then tier 3's benchmark (fp32 against AMP, interleaved trials,
loss parity) on the built-in gpt-small and on a Hugging Face GPT-2 small built from its config (no
download; skipped, with the reason, without transformers), for 16-mixed and bf16-mixed, and fp8 where the
GPU has float8 tensor cores and torchao is installed. Each result keeps its device, precision, speedup
with interval, tokens/s, MFU and verdicts; a precision the device refuses is recorded with the reason.
Then, per model in bf16-mixed, what a host read every step costs: the wall time of a training step with
the records read every step (a loop that logs float(loss) each step) against every 10 steps.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import torch
from matplotlib import pyplot as plt

from utils.environment import run_record
from utils.params import LOG_EVERY_ACCELERATOR, ROOT
from utils.plotting import plot_check_speedups
from utils.precision import BF16, GPU_CHECKED, fp32_plan, resolve_device
from utils.results import write_json_atomic
from utils.tier3_training_utilities import test_fine_tuning
from utils.tiers import run_tier

SIZES = {"full": dict(steps=30, batch_size=16, seq_len=256, trials=3, warmup_steps=3, timed_steps=5),
         "quick": dict(steps=4, batch_size=2, seq_len=32, trials=1, warmup_steps=1, timed_steps=1)}


def gpt2_small(folder: Path, quick: bool):
    """'hf:<folder>' of a randomly initialized GPT-2 small (124M; 2 layers with --quick), or (None, why not)."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed (pip install transformers)"
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2) if quick else transformers.GPT2Config()
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return f"hf:{folder}", None


def gpu_tests(device: torch.device) -> dict:
    """pytest -m gpu, summarized: counts and the tail of its output."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device: the gpu tests need one"}
    t0 = time.perf_counter()
    # Only tests/ is named, so nbval (in the project's addopts) collects no notebook; disabling it would make
    # pytest refuse the addopts' --nbval (exit 4).
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    return {"exit_code": proc.returncode, **counts, "seconds": round(time.perf_counter() - t0, 1),
            "tail": (proc.stdout + proc.stderr)[-2000:]}


def benchmark(model: str, precision: str, device: torch.device, sizes: dict) -> dict:
    """Tier 3 for one model and precision, as one row of the check."""
    t0 = time.perf_counter()
    result = run_tier(3, {"model": model, "precision": precision, "device": str(device), **sizes})
    row = {"model": model, "precision": precision, "status": result.status, "seconds": round(time.perf_counter() - t0, 1),
           "verdicts": {v.check: [v.status, v.reason] for v in result.verdicts}}
    if "amp_worth_it" in result.checks:
        speed = result.checks["amp_worth_it"].extra
        row.update(speedup=speed["speedup"], tokens_per_s=speed["tokens_per_s"], mfu=speed["mfu"],
                   baseline=speed["baseline"], activation_saving=speed["memory"]["activation_saving"],
                   cuda_peak_bytes=speed["memory"]["cuda_peak_bytes"])
    return row


def sync_cost(model: str, device: torch.device, sizes: dict, precision: str = BF16) -> dict:
    """Wall seconds per training step with the records read every step and every LOG_EVERY_ACCELERATOR
    steps, in interleaved trials: the training loop's wall time over its steps, so every host wait is
    in it (per-step CUDA events would miss the device's idle time between steps)."""
    steps = sizes["warmup_steps"] + 2 * LOG_EVERY_ACCELERATOR
    per_step = {1: [], LOG_EVERY_ACCELERATOR: []}
    for trial in range(sizes["trials"]):
        for every in (1, LOG_EVERY_ACCELERATOR) if trial % 2 == 0 else (LOG_EVERY_ACCELERATOR, 1):
            result = test_fine_tuning(model, precision=precision, steps=steps, batch_size=sizes["batch_size"],
                                      seq_len=sizes["seq_len"], eval_batches=0, progress=False, device=device,
                                      max_skipped_in_a_row=None, log_every=every)
            per_step[every].append(result.loop_seconds / steps)
    every_step, batched = statistics.median(per_step[1]), statistics.median(per_step[LOG_EVERY_ACCELERATOR])
    return {"precision": precision, "steps": steps,
            "step_time_s": {"read every step": every_step, f"read every {LOG_EVERY_ACCELERATOR} steps": batched},
            "speedup": every_step / batched, "trials": per_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json/.png (default: benchmarks/<device>)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    record = run_record(device, fp32_plan(device))
    out = args.out or ROOT / "benchmarks" / re.sub(r"[^A-Za-z0-9.]+", "-", record["device_name"]).strip("-")
    sizes = SIZES["quick" if args.quick else "full"]
    check = {"record": record, "sizes": sizes, "gpu_tests": gpu_tests(device), "results": [], "sync": []}
    with tempfile.TemporaryDirectory() as tmp:
        gpt2, why_not = gpt2_small(Path(tmp) / "gpt2-small", args.quick)
        models = ["gpt-tiny" if args.quick else "gpt-small", *([gpt2] if gpt2 else [])]
        if why_not:
            check["results"].append({"model": "gpt2-small", "skipped": why_not})
        for model in models:
            for precision in GPU_CHECKED:
                row = benchmark(model, precision, device, sizes)
                row["model"] = "gpt2-small" if model == gpt2 else model
                check["results"].append(row)
                write_json_atomic(out / "gpu_check.json", check)  # a check cut short keeps what it measured
                print(f"{row['model']} {precision}: {row['status']}"
                      + (f", {row['speedup']['median']:.2f}x over {row['baseline']}" if "speedup" in row else
                         f" ({row['verdicts'].get('supported', ['', ''])[1]})"))
            cost = {"model": "gpt2-small" if model == gpt2 else model, **sync_cost(model, device, sizes)}
            check["sync"].append(cost)
            write_json_atomic(out / "gpu_check.json", check)
            print(f"{cost['model']}: " + ", ".join(f"{k} {v * 1e3:.1f} ms/step" for k, v in cost["step_time_s"].items()))
    write_json_atomic(out / "gpu_check.json", check)
    plt.close(plot_check_speedups(check["results"], record["device_name"], out / "gpu_check.png"))
    print(f"wrote {out / 'gpu_check.json'} and gpu_check.png")
    return 0 if check["gpu_tests"].get("exit_code", 0) == 0 else 1


if __name__ == "__main__":
    matplotlib.use("Agg")
    sys.exit(main())
