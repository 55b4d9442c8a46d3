"""The GPU check: one command, a few minutes on one GPU, one JSON and one chart.

    python -m utils.gpu_check                  # on a GPU: writes benchmarks/<gpu name>/gpu_check.json and .png
    python -m utils.gpu_check --device cpu --quick --out /tmp/check   # the same plumbing on a CPU, tiny sizes

What it runs, what each result keeps and what must hold: the README's "GPU check".
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
from utils import device as dev
from utils.precision import BF16, FP16, GPU_CHECKED, fp32_plan
from utils.results import write_json_atomic
from utils.tier3_training_utilities import HOST_BOUND, test_fine_tuning
from utils.tiers import run_tier

# emulated_amp='full': the check times every precision, also where the device only emulates it (bf16 on a T4).
SIZES = {"full": dict(steps=30, batch_size=16, seq_len=256, trials=3, timing_warmup_steps=3, timed_steps=5, emulated_amp="full"),
         "quick": dict(steps=4, batch_size=2, seq_len=32, trials=1, timing_warmup_steps=1, timed_steps=1, emulated_amp="full")}
# gpt2-small compiled at a size where the GPU, not the host, decides the step: compiled bf16 against compiled fp32.
LARGE = {name: {**sizes, "steps": 4 if name == "full" else 2, "seq_len": 1024 if name == "full" else 64, "compile": True}
         for name, sizes in SIZES.items()}
# Dense bf16 tensor-core peaks from the vendors' datasheets, quoted beside the peak measured in the run.
DATASHEET_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "T4": 65e12}
TESTS_TIMEOUT_S = 120  # the gpu and seam tests: about 30 s on an H200; the whole check must fit 5 minutes
# What must hold on a GPU (the README's GPU check): each expectation names its figure.
LOOP_EFFICIENCY, COMPILED_BF16_SPEEDUP, COMPILED_MFU = 0.97, 3.0, 0.30


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
    # The seam tests too: a test that assumes a CPU is found where users run. Naming only tests/ keeps nbval (in the
    # addopts) from collecting notebooks; disabling nbval would make pytest refuse the addopts' --nbval (exit 4).
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu or seam", "-q", "tests"], cwd=ROOT,
                              capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return {"exit_code": None, "timed_out_after_s": TESTS_TIMEOUT_S, "tail": str(e.output or "")[-2000:]}
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    return {"exit_code": proc.returncode, **counts, "seconds": round(time.perf_counter() - t0, 1),
            "tail": (proc.stdout + proc.stderr)[-2000:]}


def benchmark(model: str, precision: str, device: torch.device, sizes: dict) -> dict:
    """Tier 3 for one model and precision, as one row of the check."""
    t0 = time.perf_counter()
    result = run_tier(3, {"model": model, "precision": precision, "device": str(device), **sizes})
    row = {"model": model, "precision": precision, "sizes": sizes, "status": result.status,
           "seconds": round(time.perf_counter() - t0, 1), "verdicts": {v.check: [v.status, v.reason] for v in result.verdicts}}
    if "amp_worth_it" in result.checks and "speedup" in result.checks["amp_worth_it"].extra:
        speed = result.checks["amp_worth_it"].extra
        row.update({key: speed.get(key) for key in ("speedup", "tokens_per_s", "mfu", "baseline", "gpu_busy",
                                                    "loop_efficiency", "matmul_peak_flops", "flops_per_token")},
                   activation_saving=speed["memory"]["activation_saving"], cuda_peak_bytes=speed["memory"]["cuda_peak_bytes"])
        if "compile" in speed:
            c = speed["compile"]
            row["compiled"] = {"amp_speedup": c["amp_speedup"], "tokens_per_s": c["tokens_per_s"],
                               "compile_time_s": c["compile_time_s"], "fallback": c["fallback"],
                               "mfu": {p: c["tokens_per_s"][p] * speed["flops_per_token"] / speed["matmul_peak_flops"][p]
                                       for p in c["tokens_per_s"]}}
    return row


def expectations(check: dict) -> list:
    """What must hold, per model and precision, from the check's rows: [{expectation, ok, figure}]. A row that is
    missing (a model skipped, a run refused) fails its expectations, saying so."""
    rows = {(r["model"], r["precision"], bool(r.get("large"))): r for r in check["results"] if "precision" in r}
    out = []

    def expect(what: str, key: tuple, test):
        row = rows.get(key)
        ok, figure = test(row) if row else (False, "no such run (skipped or refused: see its row)")
        out.append({"expectation": what, "ok": bool(ok), "figure": figure})

    for model in ("gpt-small", "gpt2-small"):
        for precision in (FP16, BF16):
            expect(f"{model} {precision}: amp_safe passes", (model, precision, False),
                   lambda r: (r["verdicts"]["amp_safe"][0] == "pass", r["verdicts"]["amp_safe"][1]))
    expect(f"gpt-small bf16 eager: our loop >= {LOOP_EFFICIENCY}x the bare loop", ("gpt-small", BF16, False),
           lambda r: (min((r.get("loop_efficiency") or {0: 0}).values()) >= LOOP_EFFICIENCY,
                      f"our loop / bare loop: {r.get('loop_efficiency')}"))
    expect("gpt-small bf16 eager: the GPU's busy share is measured and quoted where the GPU waits", ("gpt-small", BF16, False),
           lambda r: (bool(r.get("gpu_busy")) and all(v is not None for v in r["gpu_busy"].values())
                      and ("host-bound" in r["verdicts"]["amp_worth_it"][1]) == (r["gpu_busy"][BF16] < HOST_BOUND)
                      and "the GPU computes" in r["verdicts"]["amp_worth_it"][1],
                      f"busy {r.get('gpu_busy')}; amp_worth_it: {r['verdicts']['amp_worth_it'][1]}"))
    expect(f"gpt2-small compiled bf16 >= {COMPILED_BF16_SPEEDUP}x compiled fp32 (TF32 off)", ("gpt2-small", BF16, True),
           lambda r: _compiled_at_least(r, "amp_speedup", COMPILED_BF16_SPEEDUP, check))
    expect(f"gpt2-small compiled bf16: MFU >= {COMPILED_MFU:.0%} of the bf16 matmul peak measured here",
           ("gpt2-small", BF16, True), lambda r: _compiled_at_least(r, "mfu", COMPILED_MFU, check))
    return out


def _compiled_at_least(row: dict, what: str, floor: float, check: dict) -> tuple:
    """Whether a figure of the compiled gpt2-small run ('amp_speedup' or 'mfu') reaches `floor`, and how it reads."""
    if "compiled" not in row:
        return False, f"no compiled figures: {row['status']}, {row['verdicts']}"[:400]
    if what == "amp_speedup":
        return row["compiled"]["amp_speedup"] >= floor, f"{row['compiled']['amp_speedup']:.2f}x"
    mfu = row["compiled"]["mfu"][BF16]
    return mfu >= floor, (f"{mfu:.1%} of {row['matmul_peak_flops'][BF16] / 1e12:.0f} TFLOP/s measured (datasheet: "
                          f"{check.get('datasheet_bf16_flops')})")


def sync_cost(model: str, device: torch.device, sizes: dict, precision: str = BF16) -> dict:
    """Wall seconds per step with the records read every step and every LOG_EVERY_ACCELERATOR steps, in interleaved
    trials: the loop's wall time over its steps holds every host wait, the device's idle time per-step CUDA events miss."""
    steps = sizes["timing_warmup_steps"] + 2 * LOG_EVERY_ACCELERATOR
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
    device = dev.resolve_device(args.device)
    record = run_record(device, fp32_plan(device))
    out = args.out or ROOT / "benchmarks" / re.sub(r"[^A-Za-z0-9.]+", "-", record["device_name"]).strip("-")
    sizes = SIZES["quick" if args.quick else "full"]
    datasheet = next((v for k, v in DATASHEET_BF16_FLOPS.items()  # a whole word: an L40S is not an L4
                      if re.search(rf"\b{k}\b", record.get("device_name", ""))), None)
    check = {"record": record, "sizes": sizes, "gpu_tests": gpu_tests(device), "results": [], "sync": [],
             "datasheet_bf16_flops": datasheet}
    with tempfile.TemporaryDirectory() as tmp:
        gpt2, why_not = gpt2_small(Path(tmp) / "gpt2-small", args.quick)
        models = ["gpt-tiny" if args.quick else "gpt-small", *([gpt2] if gpt2 else [])]
        if why_not:
            check["results"].append({"model": "gpt2-small", "skipped": why_not})
        for model in models:
            for precision in GPU_CHECKED:
                row = benchmark(model, precision, device, {**sizes, "minimal_loop": model == models[0] and precision == BF16})
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
        if gpt2:
            row = benchmark(gpt2, BF16, device, {**LARGE["quick" if args.quick else "full"], "tf32": False})
            check["results"].append({**row, "model": "gpt2-small", "large": True})
    check["expectations"] = expectations(check)
    write_json_atomic(out / "gpu_check.json", check)
    plt.close(plot_check_speedups([r for r in check["results"] if not r.get("large")], record["device_name"],
                                  out / "gpu_check.png"))
    for e in check["expectations"]:
        print(f"[{'ok' if e['ok'] else 'FAIL'}] {e['expectation']}: {e['figure']}")
    print(f"wrote {out / 'gpu_check.json'} and gpu_check.png")
    unmet = [e for e in check["expectations"] if not e["ok"]]
    if args.quick:  # tiny sizes on any device: the plumbing, not the figures
        print(f"--quick: {len(unmet)} expectation(s) unmet at tiny sizes, not asserted")
        unmet = []
    tests_ok = check["gpu_tests"].get("exit_code", 0) == 0  # 0, or skipped off a GPU; None: timed out
    return 0 if tests_ok and not unmet else 1


if __name__ == "__main__":
    matplotlib.use("Agg")
    sys.exit(main())
