"""amp_safe judged the way the GradScaler works: update for update, calibration not held against AMP, what hurts
training held against it; bf16 offered only where it is native; tier 3 in short where the AMP precision is only
emulated; a GPU that waits for the host named as the cause of a speed verdict (faked at the device seam)."""

from types import SimpleNamespace

import pandas as pd
import pytest

from tests.test_checkpoints import SignalAt, same_run
from tests.user_models import CalibratesFp16, TinyGPTWrapper
from utils import device
from utils.diagnosis import candidates
from utils.loop.stops import OVERFLOW_STORM
from utils.parity import STAND, back_offs, calibration_text, compare, figures, problems
from utils.device import bf16_native
from utils.precision import BF16, FP16, FP32, emulated_here, instead_here, resolve
from utils.tier3_training_utilities import HOST_BOUND, _worth_verdict, test_fine_tuning
from utils.tiers import run_tier

CPU = device.resolve_device("cpu")
TIER3 = dict(batch_size=4, seq_len=32, trials=1, warmup_steps=1, timed_steps=1, device="cpu", remedy_runs=0)
LIMITS = {"steps": 30, "max_skipped_fraction": 0.05, "tolerance": 0.05}


def history(steps: int, skipped=(), init: float = 2.0 ** 16, loss=None) -> pd.DataFrame:
    """A run's per-step record: with a GradScaler (init > 1) the scale halves at each skipped step, without one it
    stays 1; the loss per *update* from `loss`."""
    rows, scale, update = [], init, 0
    for step in range(1, steps + 1):
        skip = step in skipped
        rows.append({"step": step, "loss": (loss or (lambda u: 5.0 - 0.05 * u))(update), "loss_scale": scale,
                     "skipped": skip})
        scale, update = (scale / 2 if init > 1 else scale, update) if skip else (scale, update + 1)
    return pd.DataFrame(rows)


def run(hist: pd.DataFrame, plan_precision=FP16, final_eval=3.0, stop=None):
    return SimpleNamespace(history=hist, final_eval_loss=final_eval, stop=stop,
                           plan=SimpleNamespace(precision=plan_precision))


def judged(amp_hist: pd.DataFrame, steps: int = 30, **amp):
    ref = run(history(steps), FP32)
    p = figures(compare(ref.history, amp_hist), ref, run(amp_hist, **amp), {**LIMITS, "steps": steps})
    return p, problems(p)


# --- calibration, from loss-scale histories ------------------------------------------------------------------

def test_a_back_off_after_good_steps_is_calibration_and_the_curves_align_by_update():
    # As on the H200: 8 good steps, the scale too high for the warm-up's gradients, halved at steps 9-12, then it holds.
    amp = history(34, skipped={9, 10, 11, 12})
    p, found = judged(amp)
    assert found == [] and (p["calibration_skips"], p["other_skips"], p["skipped_fraction"]) == (4, 0, 0.0)
    assert [(r["first"], r["last"], r["scale_to"], r["calibration"]) for r in p["back_offs"]] == [(9, 12, 4096.0, True)]
    # update for update: the AMP curve is fp32's, 4 steps later, so the gap is nil; the steps would have shown 4 updates
    assert p["max_relative_gap"] == 0 and p["updates"] == {"reference": 30, "amp": 30}
    table = compare(history(30), amp)
    assert list(table["update"]) == list(range(1, 31)) and table.loc[8, "skipped_before"] == 4 and table.loc[8, "step"] == 13
    assert calibration_text(p) == "4 skipped: 4 calibration (65536 -> 4096 at steps 9-12), 0 beyond it"


def test_isolated_back_offs_wherever_they_happen_are_calibration_but_skipping_that_keeps_coming_is_not():
    isolated = history(35, skipped={1, 2, 3, 15, 30})  # the descent, then one back-off mid-run and one near the end
    p, found = judged(isolated)
    assert found == [] and p["calibration_skips"] == 5
    keeps_coming = history(41, skipped={1, 2, 9, 11, 13, 15, 17, 19, 21, 23, 25})  # after the scale stood, again and again
    p, found = judged(keeps_coming)
    # 25 stands after it, but came one update after 23: the tail of the skipping, not an isolated back-off
    assert [r["calibration"] for r in p["back_offs"]] == [True] + [False] * 9
    assert (p["calibration_skips"], p["other_skips"]) == (2, 9)
    assert found == ["9 of 30 steps were skipped beyond the GradScaler's calibration (30% > 5%); 16-mixed overflows "
                     "here: look for activations beyond fp16's range (Tier 2 AMP readiness)"]
    # a back-off every 4th step, each made up: the updates match and the curves too, but it is not calibration
    periodic = history(41, skipped=set(range(4, 41, 4)))
    p, found = judged(periodic)
    assert p["calibration_skips"] == 0 and p["other_skips"] == 10 and found[0].startswith("10 of 30 steps were skipped")


def test_a_descent_that_never_ends_and_a_collapsed_scale_are_held_against_amp():
    # every other step skipped to the end: the scale never holds STAND updates, so none of it is calibration
    never = history(40, skipped=set(range(2, 41, 2)))
    assert STAND > 1 and not any(r["calibration"] for r in back_offs(never))
    collapse = history(30, skipped=set(range(1, 19)))  # 18 halvings: 65536 -> 0.25
    p, found = judged(collapse, steps=12)
    assert p["min_loss_scale"] == 0.25 and found[0] == ("the loss scale collapsed to 0.25 (below 1 from step 18): gradients "
                                                        "overflow even unscaled")
    assert p["calibration_skips"] == 0
    storm = judged(history(12, skipped=set(range(1, 13))), steps=12, stop={"reason": OVERFLOW_STORM, "message": "storm."})[1]
    assert storm == ["the run stopped: storm"]


def test_without_a_grad_scaler_a_skipped_step_is_never_calibration():
    bf16 = history(32, skipped={5, 6}, init=1.0)  # non-finite gradients in bf16: the scale stays 1
    assert [r["calibration"] for r in back_offs(bf16)] == [False]


def test_a_lasting_gap_the_final_evaluation_and_missing_updates_count():
    drifted = history(30, loss=lambda u: 5.0 - 0.05 * u + (0.5 if u > 15 else 0))
    p, found = judged(drifted, final_eval=3.3)
    assert found[0].startswith("the AMP loss (rolling median of 10 updates) strays ") and "at update " in found[0]
    assert found[1] == "final eval loss differs by 10.0% after 30 updates (tolerance 5%)"
    short = history(34, skipped={1, 2, 3, 4, 5, 6, 7, 8})  # made up, and the allowance ran out: 26 updates of 30
    assert "skipping kept coming: the AMP run made 26 of the reference's 30 updates in 34 steps" in judged(short)[1]
    # without a GradScaler nothing is made up: one non-finite bf16 step in 60 is within max_skipped_fraction
    one = judged(history(60, skipped={30}, init=1.0), steps=60, plan_precision=BF16)[1]
    assert one == []


# --- the loop: skipped steps made up on the same batch ------------------------------------------------------

@pytest.fixture(scope="module")
def calibrating():
    return test_fine_tuning(CalibratesFp16(), precision=FP16, steps=30, batch_size=4, seq_len=32, device="cpu",
                            eval_batches=2, progress=False, make_up_skipped=True)


def test_a_skipped_step_is_made_up_on_its_own_batch(calibrating):
    h = calibrating.history
    skipped = list(h["step"][h["skipped"]])
    assert len(skipped) >= 5 and len(h) == 30 + len(skipped) and (~h["skipped"]).sum() == 30
    for step in skipped:  # same weights, same batch: the step that makes it up sees exactly the skipped step's loss
        assert h["loss"][step] == h["loss"][step - 1]
    end = 30 + len(skipped)  # evaluations every eval_interval (20) steps as ever, and at the true end
    assert list(calibrating.eval_history["step"]) == [*range(0, end, 20), end]


def test_making_up_resumes_bit_for_bit(calibrating, tmp_path):
    kwargs = dict(precision=FP16, steps=30, batch_size=4, seq_len=32, device="cpu", eval_batches=2, progress=False,
                  make_up_skipped=True, checkpoint_dir=tmp_path)
    stopped = test_fine_tuning(CalibratesFp16(), callbacks=[SignalAt(3)], **kwargs)  # inside the scale's descent
    assert stopped.interrupted and stopped.history["skipped"].iloc[-1]
    same_run(calibrating, test_fine_tuning(CalibratesFp16(), resume=True, **kwargs))


# --- tier 3 on a healthy model (the planted ones keep failing with their causes: tests/test_diagnosis.py) -----

@pytest.mark.parametrize("steps", [30, 60])
def test_a_healthy_model_whose_fp16_scale_calibrates_passes_amp_safe(steps):
    r = run_tier(3, {**TIER3, "steps": steps, "precision": FP16, "emulated_amp": "full"}, model=CalibratesFp16())
    safe = r.checks["amp_safe"]
    assert safe.verdict.status == "pass", safe.verdict.reason
    assert safe.extra["skipped_steps"] >= 10 and safe.extra["other_skips"] == 0
    assert safe.extra["updates"] == {"reference": steps, "amp": steps}
    assert f"{safe.extra['skipped_steps']} skipped: {safe.extra['skipped_steps']} calibration (65536 -> " in safe.verdict.reason
    assert r.checks["diagnosis"].verdict.reason == "nothing to diagnose: amp_safe passed."


# --- advice that fits the device --------------------------------------------------------------------------------

@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # as on a laptop CPU: oneDNN capped below its bf16 instructions


@pytest.mark.seam
def test_a_cpu_without_native_bf16_is_not_offered_bf16(no_native_bf16):
    plan, found = resolve(FP16, CPU), {"layers": []}
    assert not bf16_native(CPU) and [what for what, _ in candidates(found, plan, CPU)] == [
        "a gentler loss scale (initial 256, doubling after 500 clean steps)"]
    assert emulated_here(resolve(BF16, CPU), CPU) == ("bf16 is only emulated here (this CPU has no AVX512-BF16/AMX "
                                                      "instructions)")
    p, _ = judged(history(41, skipped={1, 2, 9, 11, 13, 15, 17, 19, 21, 23, 25}))
    assert "bf16" not in problems(p, instead_here(FP16, CPU))[0] and "use bf16" in problems(p, BF16)[0]


@pytest.mark.seam
def test_a_cpu_with_native_bf16_is_offered_bf16(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(device, "cpuinfo", lambda: "flags : fpu avx512f avx512_bf16")
    assert "bf16 instead of fp16" in [what for what, _ in candidates({"layers": []}, resolve(FP16, CPU), CPU)]
    assert emulated_here(resolve(BF16, CPU), CPU) is None


def test_where_bf16_is_only_emulated_tier3_answers_in_short_and_says_so(no_native_bf16):
    r = run_tier(3, {**TIER3, "model": "gpt-tiny", "steps": 12, "precision": "auto"})
    worth, safe = r.checks["amp_worth_it"], r.checks["amp_safe"]
    assert worth.verdict.status == "warn" and worth.verdict.timing and worth.data.empty
    assert worth.verdict.reason.startswith("not measured: bf16 is only emulated here (this CPU has no AVX512-BF16/AMX")
    assert safe.verdict.status == "pass" and "(A short comparison: batch 1, because bf16 is only emulated" in safe.verdict.reason
    assert safe.extra["short"] and len(safe.extra["layer_drift"]) == 3 and len(safe.data) == 12
    assert r.figures["speedup"] is None and r.figures["amp_precision"] == BF16
    full = run_tier(3, {**TIER3, "model": "gpt-tiny", "steps": 4, "precision": "auto", "emulated_amp": "full"})
    assert len(full.checks["amp_worth_it"].data) == 2 and "short" not in full.checks["amp_safe"].extra


# --- a GPU that waits for the host, faked at the device seam ----------------------------------------------------

def speed(median, low, high, busy):
    return {"speedup": {"median": median, "ci_low": low, "ci_high": high}, "memory": {"activation_saving": 0.4},
            "amp_precision": BF16, "baseline": "fp32 (TF32 off)", "batch_size": 16, "seq_len": 256, "trials": 3,
            "gpu_busy": busy, "time_shares": {FP32: {"matmul_attention": 0.35}, BF16: {"casts": 0.1, "optimizer": 0.2}},
            "matmul_ratio": 13.0, "sweep": []}


def test_a_host_bound_loop_is_not_blamed_on_amp():
    plan = resolve(BF16, CPU)
    slower = _worth_verdict(speed(0.8, 0.7, 0.9, {FP32: 0.6, BF16: 0.3}), plan)
    assert slower.status == "warn" and slower.reason.startswith("not judged: 0.80x (95% CI 0.70-0.90) at batch 16 x 256, but "
                                                                "host-bound: the GPU computes 30% of a bf16-mixed step and "
                                                                "60% of an fp32 step")
    assert "a larger batch or seq_len, compile=True, or CUDA graphs" in slower.reason
    busy = _worth_verdict(speed(0.8, 0.7, 0.9, {FP32: 0.95, BF16: 0.9}), plan)
    assert busy.status == "fail" and "host-bound" not in busy.reason and "op time (aten ops timed on the host)" in busy.reason
    assert "host-bound" in _worth_verdict(speed(1.5, 1.2, 1.8, {FP32: 0.5, BF16: HOST_BOUND / 2}), plan).reason


@pytest.mark.seam
def test_tier3_measures_the_gpus_busy_share_through_the_seam(monkeypatch):
    def gpu_that_computes(seconds):  # the seam's kernel time: fixed, so no clock of this machine decides the verdict
        def kernel_seconds(fn, device, warmup=None):
            warmup()
            fn()
            return seconds
        return kernel_seconds
    params = {**TIER3, "steps": 2, "trials": 3, "precision": BF16, "emulated_amp": "full"}
    monkeypatch.setattr(device, "kernel_seconds", gpu_that_computes(1e-7))  # far under a step: the GPU waits
    worth = run_tier(3, params, model=TinyGPTWrapper()).checks["amp_worth_it"]
    assert set(worth.extra["gpu_busy"]) == {FP32, BF16} and all(0 < b < HOST_BOUND for b in worth.extra["gpu_busy"].values())
    assert "host-bound: the GPU computes" in worth.verdict.reason
    monkeypatch.setattr(device, "kernel_seconds", gpu_that_computes(1e3))  # far over a step: the GPU is busy throughout
    worth = run_tier(3, params, model=TinyGPTWrapper()).checks["amp_worth_it"]
    assert worth.extra["gpu_busy"] == {FP32: 1.0, BF16: 1.0} and "host-bound" not in worth.verdict.reason
    assert "the GPU computes 100% of a bf16-mixed step and 100% of an fp32 step" in worth.verdict.reason
