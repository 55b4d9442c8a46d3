"""The GPU check's plumbing, on this CPU at tiny sizes: every model and precision gets a row (fp8 refused
with the reason), the gpu tests are reported as skipped, the cost of a read every step is measured, and
the JSON and chart are written."""

import json

import pytest

from utils import gpu_check
from utils.precision import GPU_CHECKED


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_a_cpu_at_tiny_sizes(tmp_path):
    pytest.importorskip("transformers")
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert check["gpu_tests"] == {"skipped": "no CUDA device: the gpu tests need one"}
    rows = {(r["model"], r["precision"]): r for r in check["results"]}
    assert set(rows) == {(m, p) for m in ("gpt-tiny", "gpt2-small") for p in GPU_CHECKED}
    for model in ("gpt-tiny", "gpt2-small"):
        assert rows[(model, "bf16-mixed")]["speedup"]["median"] > 0 and rows[(model, "bf16-mixed")]["baseline"] == "fp32"
        assert "fp8 needs a CUDA GPU" in rows[(model, "fp8")]["verdicts"]["supported"][1]
    # what a read every step costs: wall time per step, read every step against every 10 steps, per model
    assert [c["model"] for c in check["sync"]] == ["gpt-tiny", "gpt2-small"]
    for cost in check["sync"]:
        assert set(cost["step_time_s"]) == {"read every step", "read every 10 steps"}
        assert all(t > 0 for t in cost["step_time_s"].values()) and cost["speedup"] > 0
    assert (tmp_path / "gpu_check.png").stat().st_size > 0
