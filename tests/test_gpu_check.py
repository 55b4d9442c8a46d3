"""The GPU check's plumbing, on this CPU at tiny sizes: every model and precision gets a row (fp8 refused
with the reason), the gpu tests are reported as skipped, the cost of a read every step is measured, and
the JSON and chart are written."""

import json

import pytest

from tests.packages import optional
from utils import gpu_check
from utils.precision import GPU_CHECKED


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_a_cpu_at_tiny_sizes(tmp_path):
    optional("transformers")
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


def gpu_row(model, precision, safe="pass", compiled=None, **figures):
    return {"model": model, "precision": precision, "verdicts": {"amp_safe": [safe, f"{precision} ..."],
            "amp_worth_it": [figures.pop("worth", "pass"), figures.pop("worth_reason", "1.9x faster")]},
            **({"compiled": compiled} if compiled else {}), **figures}


def healthy_check(**changes):
    """The rows of a GPU check where everything holds (figures as an H200 should give them)."""
    rows = {"small_fp16": gpu_row("gpt-small", "16-mixed"),
            "small_bf16": gpu_row("gpt-small", "bf16-mixed", loop_efficiency={"32": 0.99, "bf16-mixed": 0.98},
                                  gpu_busy={"32": 0.9, "bf16-mixed": 0.7}, worth_reason="1.9x ...; the GPU computes 70% ..."),
            "gpt2_fp16": gpu_row("gpt2-small", "16-mixed"),
            "gpt2_bf16": gpu_row("gpt2-small", "bf16-mixed"),
            "compiled": gpu_row("gpt2-small", "bf16-mixed", compiled={"amp_speedup": 3.4, "mfu": {"bf16-mixed": 0.41}},
                                matmul_peak_flops={"bf16-mixed": 7.5e14}, large=True)}
    rows.update(changes)
    return {"results": list(rows.values()), "datasheet_bf16_flops": 989e12}


def test_the_gpu_checks_expectations_hold_on_healthy_figures_and_each_fails_on_its_own():
    assert all(e["ok"] for e in gpu_check.expectations(healthy_check())), gpu_check.expectations(healthy_check())

    def unmet(**changes):
        return [e["expectation"] for e in gpu_check.expectations(healthy_check(**changes)) if not e["ok"]]
    assert unmet(small_fp16=gpu_row("gpt-small", "16-mixed", safe="fail")) == [
        "gpt-small 16-mixed: amp_safe passes"]
    slow_loop = gpu_row("gpt-small", "bf16-mixed", loop_efficiency={"32": 0.99, "bf16-mixed": 0.9}, gpu_busy={"32": 0.9, "bf16-mixed": 0.7},
                        worth_reason="the GPU computes 70% ...")
    assert unmet(small_bf16=slow_loop) == ["gpt-small bf16 eager: our loop >= 0.97x the bare loop"]
    unsaid = gpu_row("gpt-small", "bf16-mixed", loop_efficiency={"32": 1.0, "bf16-mixed": 1.0}, gpu_busy={"32": 0.4, "bf16-mixed": 0.2},
                     worth="fail", worth_reason="0.8x: slower; the GPU computes 20% ...")
    assert unmet(small_bf16=unsaid) == [
        "gpt-small bf16 eager: the GPU's busy share is measured and quoted where the GPU waits"]
    said = {**unsaid, "verdicts": {**unsaid["verdicts"], "amp_worth_it": ["warn", "not judged: ... host-bound: the GPU computes 20% ..."]}}
    assert unmet(small_bf16=said) == []
    weak = gpu_row("gpt2-small", "bf16-mixed", compiled={"amp_speedup": 2.1, "mfu": {"bf16-mixed": 0.2}},
                   matmul_peak_flops={"bf16-mixed": 7.5e14}, large=True)
    assert unmet(compiled=weak) == ["gpt2-small compiled bf16 >= 3.0x compiled fp32 (TF32 off)",
                                    "gpt2-small compiled bf16: MFU >= 30% of the bf16 matmul peak measured here"]
    missing = [e for e in gpu_check.expectations({"results": []}) if not e["ok"]]
    assert len(missing) == 8 and all(e["figure"].startswith("no such run") for e in missing)
    refused = gpu_row("gpt2-small", "bf16-mixed", large=True, status="fail")  # the large run gave no compiled figures
    assert [e["figure"][:40] for e in gpu_check.expectations(healthy_check(compiled=refused)) if not e["ok"]] == [
        "no compiled figures: fail, {'amp_safe': "] * 2
