"""--jobs N against --jobs 1 on this machine: the wall time of the same 4-run tier-1 grid, in interleaved trials.

    python benchmarks/parallel_runs.py            # writes benchmarks/parallel_runs.json; a few minutes on 2 cores

Each trial is one `python -m utils.run` into a fresh folder (nothing resumed), so a trial's time is what a user
waits for: kernel starts, imports and the tier itself. A benchmark, not a test: the ratio depends on the machine.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIER1 = ["--tiers", "1", "-p", "seq_len=16", "-p", "latency_iters=3", "-p", "batch_sizes=[1]", "-p", "device=cpu"]


def one_batch(jobs: int, grid: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "utils.run", *TIER1, "--grid", str(grid), "--jobs", str(jobs),
                    "--out", str(out), "--name", f"jobs{jobs}-{time.monotonic_ns()}"], cwd=ROOT, check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="the parallel setting measured against --jobs 1")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "parallel_runs.json")
    args = parser.parse_args()
    seconds = {1: [], args.jobs: []}
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "grid.yaml"
        grid.write_text("seed: [1, 2, 3, 4]\n")
        for trial in range(args.trials):  # interleaved, the order alternating: load drifts hit both alike
            for jobs in (1, args.jobs) if trial % 2 == 0 else (args.jobs, 1):
                seconds[jobs].append(one_batch(jobs, grid, Path(tmp)))
                print(f"--jobs {jobs}: {seconds[jobs][-1]:.1f} s", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    median = {jobs: statistics.median(s) for jobs, s in seconds.items()}
    result = {"grid": "tier 1, 4 runs (seed 1-4), gpt-tiny, seq_len 16, batch_sizes [1], cpu", "cpu": cpu,
              "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
              "torch": subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                      text=True).stdout.strip(),
              "threads_per_run": {"jobs 1": "torch's default", f"jobs {args.jobs}": "cores // jobs"},
              "seconds": {f"jobs {j}": s for j, s in seconds.items()},
              "median_s": {f"jobs {j}": m for j, m in median.items()}, "speedup": median[1] / median[args.jobs]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"--jobs {args.jobs} is {result['speedup']:.2f}x --jobs 1 (median of {args.trials}): wrote {args.out}")


if __name__ == "__main__":
    main()
