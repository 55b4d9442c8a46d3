"""A training step that never waits for the host: its record stays on the device and the loop reads the
records in one transfer at log points (utils.loop.steps). Every record, skipped step, LR and weight is
what a step-by-step read gives, whatever log_every is; the stops still happen, at log points.

On a CPU nothing waits, but the reads that would make a GPU wait (.item(), float(), bool() of a tensor)
still pass through torch's dispatcher, so a dispatch mode counts them here; on a GPU a `gpu` test runs
steps under torch.cuda.set_sync_debug_mode("error")."""

import os
import signal

import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.user_models import EmitsNaN, OverflowsFp16
from utils.models import build_model, load_task_data
from utils.loop.steps import RECORD, LRSchedule, adamw, log_interval, param_groups, to_device, train_step, warmup_cosine
from utils.params import LOG_EVERY_ACCELERATOR
from utils.precision import resolve as resolve_precision
from utils.tier3_training_utilities import test_fine_tuning

RUN = dict(steps=24, batch_size=4, seq_len=16, eval_interval=12, eval_batches=2, progress=False, device="cpu")
COLUMNS = ["step", "loss", "lr", "grad_norm", "loss_scale", "skipped", "nonfinite_grads", "micro_batches"]
# The reads of a tensor's value by the host: each makes Python wait for the device on a GPU.
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default, torch.ops.aten.nonzero.default}


# Reads that never reach the dispatcher as an op on a CPU (a copy to the CPU is no copy there), counted by name.
HOST_METHODS = ("tolist", "numpy", "cpu")


class HostReads(TorchDispatchMode):
    """Counts the host reads of tensor values made under it: value reads seen by the dispatcher, and calls of the
    tensor methods that hand values to the host (HOST_METHODS), which on a CPU bypass it."""

    def __init__(self):
        super().__init__()
        self.count, self.methods = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_READS
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_METHODS:
            self.methods[name] = method = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, lambda t, *a, _m=method, **k: (self._seen(), _m(t, *a, **k))[1])
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _seen(self):
        self.count += 1


class FaultsAt:
    """Forward hook: activations x `factor` on the chosen training forwards (counted by the model itself,
    not by callbacks, which run only at log points)."""

    def __init__(self, model, forwards, factor):
        self.seen, self.forwards, self.factor = 0, set(forwards), factor
        model.blocks[0].mlp[0].register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if not torch.is_grad_enabled():
            return output
        self.seen += 1
        return output * self.factor if self.seen in self.forwards else output


def gpt(faults=None, factor=1e6):
    torch.manual_seed(0)
    model = build_model("gpt-tiny")
    return model, (FaultsAt(model, faults, factor) if faults else None)


def step_parts(model, precision, device, steps=8):
    """What test_fine_tuning builds around train_step, for calling it directly."""
    plan = resolve_precision(precision, device)
    optimizer = adamw(param_groups(model, 0.01), 1e-3, device)
    schedule = LRSchedule(optimizer, 1e-3, warmup_cosine(2, steps), steps, device)
    data = load_task_data(model, None, 16)
    generator = torch.Generator().manual_seed(0)
    batches = [[tuple(to_device(t, device) for t in data.get_batch("train", 4, 16, generator))] for _ in range(steps)]
    return plan, plan.loss_scaler(), optimizer, schedule, batches


@pytest.mark.versions
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_a_training_step_reads_nothing_back_to_the_host(precision):
    device = torch.device("cpu")
    model, _ = gpt(faults={2}, factor=float("inf") if precision != "16-mixed" else 1e6)  # step 2 is skipped
    plan, scaler, optimizer, schedule, batches = step_parts(model, precision, device)
    with HostReads() as reads:
        records = [train_step(model, model, batch, scaler, optimizer, schedule, 1.0, "none", device)
                   for batch in batches[:4]]
    assert reads.count == 0
    with HostReads() as reads:  # the counter sees every kind of read, those that bypass the dispatcher on a CPU too
        torch.ones(2).tolist(), torch.ones(2).cpu(), torch.ones(2).numpy(), float(torch.ones(()))
    assert reads.count == 4
    skipped = [bool(r[RECORD.index("skipped")]) for r in records]
    assert skipped == [False, True, False, False]
    assert int(schedule.applied) == 3  # the LR schedule advanced on the three real steps only


def test_the_loops_host_reads_do_not_grow_with_its_steps():
    counts = {}
    for steps in (8, 24):
        with HostReads() as reads:
            test_fine_tuning(gpt()[0], precision="16-mixed", **{**RUN, "steps": steps, "eval_batches": 0,
                                                                  "eval_interval": steps, "log_every": steps})
        counts[steps] = reads.count
    assert counts[8] == counts[24], counts  # a read per step (3 to 5 before this loop) would add 48 to 80


@pytest.mark.parametrize("precision, factor, extra", [
    ("16-mixed", 1e6, {}),                                     # overflows: the GradScaler skips, the scale halves
    ("bf16-mixed", float("inf"), {"max_skipped_in_a_row": None}),  # non-finite gradients: the kernel skips
    ("32", 1.0, {"grad_accum_steps": 2}),
])
@pytest.mark.versions
def test_records_are_the_same_whatever_log_every(precision, factor, extra):
    runs = {}
    for log_every in (1, 10):
        model, _ = gpt(faults={3, 4, 9, 15} if factor != 1.0 else None, factor=factor)
        runs[log_every] = test_fine_tuning(model, precision=precision, log_every=log_every, **{**RUN, **extra})
    pd.testing.assert_frame_equal(runs[1].history[COLUMNS], runs[10].history[COLUMNS], check_exact=True)
    pd.testing.assert_frame_equal(runs[1].eval_history, runs[10].eval_history, check_exact=True)
    for (name, a), b in zip(runs[1].model.state_dict().items(), runs[10].model.state_dict().values()):
        assert torch.equal(a, b), name
    h = runs[10].history
    if factor != 1.0:
        assert list(h.loc[h["skipped"], "step"]) == [3, 4, 9, 15]
    # The LR schedule advances on the steps that really happened, as a step-by-step scheduler would.
    applied = (~h["skipped"]).cumsum().shift(fill_value=0)  # steps applied before each step
    f = warmup_cosine(2, 24)  # the default warm-up: 10% of the steps
    assert list(h["lr"]) == [runs[10].config["lr"] * f(n) for n in applied]


def test_records_reach_callbacks_once_each_in_order_at_log_points():
    model, faults = gpt(faults={10**9})  # counts forwards, changes nothing

    class Seen:
        def __init__(self):
            self.calls = []

        def on_step_end(self, record):
            self.calls.append((record["step"], faults.seen))

    seen = Seen()
    test_fine_tuning(model, precision="32", log_every=10, callbacks=[seen], **{**RUN, "eval_interval": 24})
    assert [s for s, _ in seen.calls] == list(range(1, 25))
    # read at steps 10, 20 and the end (24): the record of step 1 arrives after step 10 ran
    assert [f for _, f in seen.calls] == [10] * 10 + [20] * 10 + [24] * 4


def test_stops_happen_at_log_points_and_say_where_training_broke():
    storm = test_fine_tuning(OverflowsFp16(), precision="16-mixed", max_skipped_in_a_row=5, log_every=10, **RUN)
    assert storm.stop["reason"] == "overflow_storm" and storm.stop["step"] == 10 and len(storm.history) == 10
    assert "10 optimizer steps in a row skipped for non-finite gradients (to step 10)" in storm.stop["message"]
    nan = test_fine_tuning(EmitsNaN(), precision="bf16-mixed", log_every=10, **RUN)
    assert nan.stop["reason"] == "nonfinite_loss" and nan.stop["step"] == 10
    assert "went NaN/Inf at step 1 (seen at the log point of step 10)" in nan.stop["message"]


def test_ctrl_c_in_one_process_stops_at_the_end_of_the_current_step_whatever_log_every():
    model, _ = gpt()

    class CtrlCAt:  # a forward hook, since callbacks run only at log points
        def __init__(self):
            self.seen = 0

        def __call__(self, module, inputs, output):
            self.seen += torch.is_grad_enabled()
            if self.seen == 3 and torch.is_grad_enabled():
                os.kill(os.getpid(), signal.SIGINT)
            return output

    model.blocks[0].register_forward_hook(CtrlCAt())
    r = test_fine_tuning(model, precision="32", log_every=10, **RUN)
    assert r.interrupted and r.stop["step"] == 3 and len(r.history) == 3


def test_log_every_defaults_to_every_step_on_a_cpu_and_is_checked():
    assert log_interval(0, torch.device("cpu")) == 1 and log_interval(7, torch.device("cpu")) == 7
    assert log_interval(0, torch.device("cuda")) == LOG_EVERY_ACCELERATOR
    with pytest.raises(ValueError, match=r"parameter 'log_every' expects an integer >= 0; got -1"):
        test_fine_tuning(gpt()[0], log_every=-1, **RUN)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_on_a_gpu_a_training_step_never_synchronizes(precision):
    device = torch.device("cuda")
    model, _ = gpt(faults={2})
    model.to(device)
    plan, scaler, optimizer, schedule, batches = step_parts(model, precision, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host wait inside a step raises
    try:
        records = [train_step(model, model, batch, scaler, optimizer, schedule, 1.0, "none", device)
                   for batch in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.stack(records)[:, 0].isfinite().any()


@pytest.mark.gpu
def test_on_a_gpu_records_are_the_same_whatever_log_every():
    runs = [test_fine_tuning(gpt(faults={3, 9})[0], precision="16-mixed", log_every=n, **{**RUN, "device": "cuda"})
            for n in (1, 10)]
    pd.testing.assert_frame_equal(runs[0].history[COLUMNS], runs[1].history[COLUMNS], check_exact=True)
    assert list(runs[1].history.loc[runs[1].history["skipped"], "step"]) == [3, 9]
    assert (runs[1].history["step_time_s"] > 0).all()  # CUDA events, read at log points
