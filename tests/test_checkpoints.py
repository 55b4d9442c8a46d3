"""Fine-tuning that survives: checkpoints written atomically and read without unpickling code, resume that
is bitwise the run that never stopped, Ctrl-C/SIGTERM that checkpoint and return, and runs that stop
themselves with a diagnosis when training breaks (an overflow storm, a NaN loss)."""

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.user_models import EmitsNaN, FaultOnce, OverflowsFp16
from utils.models import build_model
from utils.results import read_json
from utils.run import main
from utils.tier3_training_utilities import test_fine_tuning
from utils.tiers import run_tier
from utils.loop import stops
from utils.loop.checkpoint import CheckpointMismatch, load_latest

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(steps=60, batch_size=8, seq_len=32, eval_interval=20, eval_batches=2, progress=False, device="cpu")


def gpt(**overrides):
    torch.manual_seed(0)
    return build_model("gpt-tiny", **overrides)


class SignalAt:
    """Callback: sends this process `signum` after optimizer step `step` (as Ctrl-C or a scheduler would)."""

    def __init__(self, step, signum=signal.SIGINT, times=1):
        self.step, self.signum, self.times = step, signum, times

    def on_step_end(self, record):
        if record["step"] == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class OverflowAt:
    """Forward hook + callback: fp16 overflows (activations x 1e6) during the chosen steps, so the loss
    scale halves there, whichever process runs those steps."""

    def __init__(self, model, steps):
        self.steps, self.current = steps, 1
        model.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: o * 1e6 if self.current in self.steps else o)

    def on_step_end(self, record):
        self.current = record["step"] + 1


def same_run(a, b):
    columns = ["step", "loss", "lr", "grad_norm", "loss_scale", "skipped"]  # exactly: NaN where NaN, bit for bit
    pd.testing.assert_frame_equal(a.history[columns], b.history[columns], check_exact=True)
    pd.testing.assert_frame_equal(a.eval_history, b.eval_history, check_exact=True)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def straight():
    return {prec: test_fine_tuning(gpt(), precision=prec, **RUN) for prec in ("bf16-mixed", "32")}


@pytest.mark.versions
def test_ctrl_c_at_step_30_checkpoints_there_and_resume_is_bitwise_the_straight_run(straight, tmp_path):
    stopped = test_fine_tuning(gpt(), precision="bf16-mixed", checkpoint_dir=tmp_path, callbacks=[SignalAt(30)], **RUN)
    assert stopped.interrupted and stopped.stop["step"] == 30 and len(stopped.history) == 30
    assert "interrupted at step 30 of 60" in stopped.stop["message"] and str(tmp_path) in stopped.stop["message"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000030.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    resumed = test_fine_tuning(build_model("gpt-tiny"), precision="bf16-mixed", checkpoint_dir=tmp_path, resume=True, **RUN)
    assert resumed.checkpoints["resumed_from"] == str(tmp_path / "step_00000030.pt") and not resumed.stop
    assert resumed.history["step"].tolist() == list(range(1, 61))
    same_run(straight["bf16-mixed"], resumed)


def test_fp16_resume_continues_the_loss_scale_where_it_left_off(tmp_path):
    def run(**kw):
        model = gpt()
        overflow = OverflowAt(model, steps={10, 40})
        return test_fine_tuning(model, precision="16-mixed", callbacks=[overflow, *kw.pop("callbacks", [])], **kw, **RUN)

    straight = run()
    scales = straight.history.set_index("step")["loss_scale"]
    assert scales[11] == scales[10] / 2 and scales[41] == scales[40] / 2  # the scale really moves
    assert run(checkpoint_dir=tmp_path, callbacks=[SignalAt(30)]).interrupted
    same_run(straight, run(checkpoint_dir=tmp_path, resume=True))


def test_sigterm_stops_like_ctrl_c_and_only_a_later_separate_signal_interrupts_at_once(tmp_path, monkeypatch):
    short = {**RUN, "steps": 8}
    r = test_fine_tuning(gpt(), precision="32", checkpoint_dir=tmp_path, callbacks=[SignalAt(3, signal.SIGTERM)], **short)
    assert r.interrupted and r.stop["step"] == 3 and (tmp_path / "step_00000003.pt").exists()
    # Two signals together (a key pressed twice, a scheduler's SIGTERM and the runner's copy) are one stop
    monkeypatch.setattr(stops, "STOP_WINDOW_S", float("inf"))  # however slowly this machine sends the second
    twice = test_fine_tuning(gpt(), precision="32", callbacks=[SignalAt(3, times=2)], **short)
    assert twice.interrupted and twice.stop["step"] == 3
    monkeypatch.setattr(stops, "STOP_WINDOW_S", -1.0)  # the second now comes after the window: a separate stop
    later_sigterm = test_fine_tuning(gpt(), precision="32", callbacks=[SignalAt(3, signal.SIGTERM, times=2)], **short)
    assert later_sigterm.interrupted and later_sigterm.stop["step"] == 3  # a SIGTERM is never "now": it is relayed
    with pytest.raises(KeyboardInterrupt):  # a later Ctrl-C is
        test_fine_tuning(gpt(), precision="32", callbacks=[SignalAt(3, times=2)], **short)
    no_dir = test_fine_tuning(gpt(), precision="32", callbacks=[SignalAt(3)], **short)
    assert no_dir.interrupted and "nothing was saved" in no_dir.stop["message"]


@pytest.fixture
def kernel_sigterm():
    """sigterm_as_ctrl_c installed in this process, as a notebook's set-up cell installs it; put back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stops._SIGNALS = stops.StopSignals()
    stops.sigterm_as_ctrl_c()
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_kernels_sigterm_acts_as_its_ctrl_c_and_the_same_stop_twice_is_one(kernel_sigterm, monkeypatch):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a kernel running a cell: Ctrl-C raises there
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # a point where the handler has run
    os.kill(os.getpid(), signal.SIGTERM)  # the runner's copy of the same stop: nothing more
    monkeypatch.setattr(stops, "STOP_WINDOW_S", -1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # relayed later (Ray's stop file): still that stop, the cells showing it run on
    stops._SIGNALS = stops.StopSignals()  # a kernel that has not been stopped yet
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an idle kernel ignores Ctrl-C, and so SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)


def test_periodic_checkpoints_keep_the_newest_and_leave_no_temporary_files(tmp_path):
    test_fine_tuning(gpt(), precision="32", checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=2,
                     **{**RUN, "steps": 9})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000008.pt", "step_00000009.pt"]  # the end is kept too


def test_a_truncated_checkpoint_is_named_and_the_one_before_it_is_used(straight, tmp_path, capsys):
    test_fine_tuning(gpt(), precision="32", checkpoint_dir=tmp_path, checkpoint_every=10, keep_checkpoints=5,
                     callbacks=[SignalAt(30)], **RUN)
    newest = tmp_path / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # a disk that filled up mid-write
    resumed = test_fine_tuning(gpt(), precision="32", checkpoint_dir=tmp_path, resume=True, **RUN)
    assert resumed.checkpoints["resumed_from"] == str(tmp_path / "step_00000020.pt")
    assert resumed.checkpoints["notes"] == [n for n in resumed.checkpoints["notes"] if str(newest) in n and "unreadable" in n]
    assert len(resumed.checkpoints["notes"]) == 1 and str(newest) in capsys.readouterr().out
    same_run(straight["32"], resumed)


class Payload:
    """Unpickling this would run code (create a file): a checkpoint must never be read that way."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.versions
def test_a_checkpoint_holding_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"format": 1, "step": 99, "payload": Payload(marker)}, folder / "step_00000099.pt")
    state, path, notes = load_latest(folder, {})
    assert state is None and path is None and not marker.exists()
    assert "step_00000099.pt is unreadable" in notes[0]


@pytest.mark.parametrize("change, field", [
    (dict(precision="32"), "precision"),
    (dict(model=lambda: gpt(n_layer=3)), "model"),
    (dict(data="other text"), "data"),
    (dict(lr=3e-3), "lr"),  # the default is 1e-3
])
def test_a_checkpoint_of_another_run_is_refused_naming_the_field(tmp_path, change, field):
    folder = tmp_path / "ckpt"
    test_fine_tuning(gpt(), precision="bf16-mixed", checkpoint_dir=folder, callbacks=[SignalAt(2)], **{**RUN, "steps": 4})
    kwargs = {**RUN, "steps": 4, "precision": "bf16-mixed", "checkpoint_dir": folder, "resume": True}
    model = change.pop("model", gpt)()
    if "data" in change:
        (tmp_path / "other.txt").write_text(change.pop("data") * 2000)
        kwargs["data"] = str(tmp_path / "other.txt")
    with pytest.raises(CheckpointMismatch, match=rf"belongs to another run: {field} is"):
        test_fine_tuning(model, **{**kwargs, **change})


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_works(straight, tmp_path):
    """The process dies while writing the step-40 checkpoint (after half its bytes): step 20's is intact."""
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        import utils.loop.checkpoint as checkpoint
        from utils.models import build_model
        from utils.tier3_training_utilities import test_fine_tuning
        real_save = torch.save
        def slow_save(obj, path):
            if obj["step"] == 40:  # write half, then hang as a slow disk would, until killed
                real_save(obj, path)
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
                print("WRITING", flush=True)
                time.sleep(120)
            real_save(obj, path)
        checkpoint.torch.save = slow_save
        torch.manual_seed(0)
        test_fine_tuning(build_model("gpt-tiny"), precision="32", checkpoint_dir={str(tmp_path)!r}, checkpoint_every=20,
                         **{RUN!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # a child that never writes fails here, never hangs
        assert ready and proc.stdout.readline().strip() == "WRITING"
        proc.kill()  # SIGKILL: no handler, no cleanup
    finally:
        proc.wait(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["step_00000020.pt"]
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the half-written file never got a real name
    resumed = test_fine_tuning(gpt(), precision="32", checkpoint_dir=tmp_path, checkpoint_every=20, resume=True, **RUN)
    assert resumed.checkpoints["resumed_from"].endswith("step_00000020.pt") and not resumed.checkpoints["notes"]
    same_run(straight["32"], resumed)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the next save cleared it


def test_an_overflow_storm_stops_the_run_with_a_diagnosis():
    r = test_fine_tuning(OverflowsFp16(), precision="16-mixed", **{**RUN, "steps": 40})
    assert r.stop["reason"] == "overflow_storm" and r.stop["step"] == 20 and len(r.history) == 20
    assert r.history["skipped"].all()
    scales = r.stop["loss_scales"]
    assert scales[0] == 65536 and all(b == a / 2 for a, b in zip(scales, scales[1:]))
    assert r.stop["largest_activation"]["layer"] == "inner.blocks.1.mlp.0"
    assert "20 optimizer steps in a row skipped" in r.stop["message"] and "'inner.blocks.1.mlp.0'" in r.stop["message"]
    assert test_fine_tuning(OverflowsFp16(), precision="16-mixed", max_skipped_in_a_row=5, **RUN).stop["step"] == 5
    assert not test_fine_tuning(OverflowsFp16(), precision="16-mixed", max_skipped_in_a_row=None, **{**RUN, "steps": 25}).stop


def test_a_nan_loss_stops_the_run_and_names_where_it_starts():
    r = test_fine_tuning(EmitsNaN(), precision="bf16-mixed", **RUN)
    assert r.stop["reason"] == "nonfinite_loss" and r.stop["step"] == 1
    assert "went NaN/Inf at step 1 in bf16-mixed" in r.stop["message"] and "'<output>'" in r.stop["message"]


# --- Tier 3 and the batch runner ------------------------------------------------------------------

TIER3 = dict(batch_size=4, seq_len=32, trials=1, warmup_steps=1, timed_steps=1, steps=12, device="cpu",
             emulated_amp="full")  # the whole tier (its trials count forwards) on any CPU
TRIAL_FORWARDS = 2 * 2 + 2  # speed trials: 2 precisions x 2 steps; then one forward each for activation memory


def parity_losses(result) -> list:
    return result.checks["amp_safe"].data[["loss_fp32", "loss_amp"]].values.tolist()


def test_tier3_interrupted_in_fine_tuning_keeps_its_checkpoint_and_resume_gives_the_straight_result(tmp_path, monkeypatch):
    params = {**TIER3, "precision": "bf16-mixed", "checkpoint_dir": str(tmp_path)}
    straight = run_tier(3, {**TIER3, "precision": "bf16-mixed"}, model=FaultOnce())
    monkeypatch.setenv("SUITE_TEST_FAULT", f"interrupt:{TRIAL_FORWARDS + 5}")
    FaultOnce.forwards = 0
    stopped = run_tier(3, params, model=FaultOnce())
    assert list(stopped.checks) == ["interrupted"] and stopped.status == "warn"
    assert "the fp32 fine-tuning run was interrupted at step 5 of 12; resume=True" in stopped.figures["stop"]["message"]
    assert "resume=True" in stopped.verdicts[0].reason
    assert [p.name for p in (tmp_path / "32").iterdir()] == ["step_00000005.pt"]
    monkeypatch.delenv("SUITE_TEST_FAULT")
    resumed = run_tier(3, {**params, "resume": True}, model=FaultOnce())
    assert resumed.checks["amp_safe"].extra["checkpoints"]["32"]["resumed_from"].endswith("step_00000005.pt")
    assert parity_losses(resumed) == parity_losses(straight)
    assert [v for v in resumed.verdicts if not v.timing] == [v for v in straight.verdicts if not v.timing]


def test_the_runner_records_a_storm_as_a_fail_verdict_and_an_interruption_as_interrupted_then_resumes(tmp_path, monkeypatch,
                                                                                                      capsys):
    tiny = [f"{k}={v}" for k, v in TIER3.items() if k != "device"]
    args = ["--tiers", "3", "--out", str(tmp_path), "--name", "b", "-p", "precision=16-mixed", "-p", "checkpoint_every=4",
            *[x for kv in tiny for x in ("-p", kv)]]
    storm = [*args, "-p", f"model={ROOT}/tests/user_models.py:OverflowsFp16", "-p", "max_skipped_in_a_row=3"]
    faulty = [*args, "-p", f"model={ROOT}/tests/user_models.py:FaultOnce"]
    assert main(storm) == 0  # a failing verdict is a result, not a crash
    storm_row = pd.read_csv(tmp_path / "b" / "summary.csv").iloc[0]
    assert storm_row["run_status"] == "ok" and storm_row["verdict"] == "fail" and storm_row["verdict.amp_safe"] == "fail"
    notebook = (tmp_path / "b" / storm_row["run_id"] / "tier3_training.ipynb").read_text()
    assert "overflow storm: 3 optimizer steps in a row skipped" in notebook and "Traceback" not in notebook

    monkeypatch.setenv("SUITE_TEST_FAULT", f"interrupt:{TRIAL_FORWARDS + 14}")  # step 2 of the 16-mixed run
    assert main(faulty) == 1  # the batch is not complete
    assert "1 interrupted and 0 not started (--resume continues them)" in capsys.readouterr().out
    faulty_row = pd.read_csv(tmp_path / "b" / "summary.csv").iloc[0]
    assert faulty_row["run_status"] == "interrupted"
    assert "the 16-mixed fine-tuning run was interrupted at step 2" in faulty_row["error"]
    kept = tmp_path / "b" / "checkpoints" / faulty_row["run_id"]
    assert sorted(p.name for p in (kept / "32").iterdir()) == [f"step_{s:08d}.pt" for s in (4, 8, 12)]
    assert [p.name for p in (kept / "16-mixed").iterdir()] == ["step_00000002.pt"]

    monkeypatch.delenv("SUITE_TEST_FAULT")
    assert main([*faulty, "--resume"]) == 0
    row = pd.read_csv(tmp_path / "b" / "summary.csv").set_index("run_id").loc[faulty_row["run_id"]]
    assert row["run_status"] == "ok" and "it ended 'interrupted'" in row["rerun_reason"]
    results = read_json(tmp_path / "b" / faulty_row["run_id"] / "results.json")
    assert results["extra"]["amp_safe"]["checkpoints"]["16-mixed"]["resumed_from"].endswith("step_00000002.pt")
    assert results["extra"]["amp_safe"]["checkpoints"]["32"]["resumed_from"].endswith("step_00000012.pt")
