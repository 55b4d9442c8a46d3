import pandas as pd
import pytest
import torch

from tests.packages import optional
from utils import device
from utils.loop.trainer import amp_summary
from utils.precision import resolve as resolve_precision
from utils.training.amp_utils import AmpWandbCallback

pytestmark = pytest.mark.versions  # what differs between versions: run in every environment (.ci/run)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA device of a given compute capability is present (only the resolver asks)."""
    def install(major, minor, name):
        monkeypatch.setattr(device, "device_capability", lambda device: (major, minor))
        monkeypatch.setattr(device, "device_name", lambda device: name)
    return install


@pytest.fixture
def cpu_bf16(monkeypatch):
    def install(native):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    return install


@pytest.mark.seam
def test_t4_gets_fp16_with_scaler(gpu):
    gpu(7, 5, "Tesla T4")
    plan = resolve_precision("auto", "cuda")
    assert (plan.precision, plan.autocast_dtype, plan.use_scaler) == ("16-mixed", torch.float16, True)
    assert "Tesla T4 (sm_75) predates sm_80" in plan.reason and "emulated" in plan.reason


@pytest.mark.seam
def test_a100_gets_bf16_without_scaler(gpu):
    gpu(8, 0, "NVIDIA A100")
    plan = resolve_precision("auto", "cuda")
    assert (plan.precision, plan.autocast_dtype, plan.use_scaler) == ("bf16-mixed", torch.bfloat16, False)
    assert "sm_80" in plan.reason


@pytest.mark.seam
def test_bf16_forced_on_t4_is_honoured_with_a_warning(gpu):
    gpu(7, 5, "Tesla T4")
    plan = resolve_precision("bf16-mixed", "cuda")
    assert plan.precision == "bf16-mixed" and "honoured, but" in plan.reason


def test_cpu_rules(cpu_bf16):
    cpu_bf16(True)
    assert resolve_precision("auto", "cpu").precision == "bf16-mixed"
    cpu_bf16(False)
    plan = resolve_precision("auto", "cpu")
    assert plan.precision == "32" and not plan.enabled and "lacks native bf16" in plan.reason
    forced = resolve_precision("16-mixed", "cpu")
    assert forced.precision == "16-mixed" and forced.use_scaler and "forced on CPU" in forced.reason


@pytest.mark.parametrize("alias, expected", [("32-true", "32"), ("fp32", "32"), ("16", "16-mixed"),
                                             ("BF16", "bf16-mixed"), ("bf16-mixed", "bf16-mixed")])
def test_aliases(alias, expected, cpu_bf16):
    cpu_bf16(True)
    assert resolve_precision(alias, "cpu").precision == expected


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="unknown precision 'fp4'; expected one of 'auto', '32', '16-mixed', 'bf16-mixed', "
                       "'fp8', 'fp8-emulated'"):
        resolve_precision("fp4", "cpu")


@pytest.mark.seam
def test_use_amp_flag(cpu_bf16, gpu):
    cpu_bf16(True)
    assert resolve_precision("bf16-mixed", "cpu", use_amp=False).precision == "32"
    assert resolve_precision("32", "cpu", use_amp=True).precision == "bf16-mixed"
    cpu_bf16(False)
    plan = resolve_precision("32", "cpu", use_amp=True)
    assert plan.precision == "32" and plan.reason.startswith("use_amp=True: CPU lacks native bf16")


def test_fp32_plan_makes_autocast_and_scaler_no_ops():
    plan = resolve_precision("32", "cpu")
    with plan.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.float32
    scaler = plan.grad_scaler()
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0


def test_bf16_plan_autocasts_matmuls():
    plan = resolve_precision("bf16-mixed", "cpu")
    with plan.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16


def test_plan_serializes():
    d = resolve_precision("16-mixed", "cpu").to_dict()
    assert d["autocast_dtype"] == "float16" and d["grad_scaler"] is True and d["precision"] == "16-mixed"


def _records():
    return [{"step": 1, "skipped": False, "loss_scale": 65536.0},
            {"step": 2, "skipped": True, "loss_scale": 65536.0},
            {"step": 3, "skipped": False, "loss_scale": 32768.0}]


def test_wandb_callback_logs_through_the_hook():
    logged = []
    cb = AmpWandbCallback.from_plan(resolve_precision("16-mixed", "cpu"), log=lambda data, step: logged.append((step, data)))
    for r in _records():
        cb.on_step_end(r)
    assert [s for s, _ in logged] == [1, 2, 3]
    assert logged[-1][1] == {"amp/enabled": 1, "amp/precision": "16-mixed", "amp/loss_scale": 32768.0, "amp/skipped_steps": 1}


def test_wandb_callback_is_silent_without_a_run():
    wandb = optional("wandb")
    assert wandb.run is None
    cb = AmpWandbCallback.from_plan(resolve_precision("32", "cpu"))
    cb.on_step_end(_records()[1])  # must not raise, must not start a run
    assert cb.skipped_steps == 1 and wandb.run is None


def test_wandb_callback_logs_to_a_real_offline_run(tmp_path, monkeypatch):
    wandb = optional("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="amp-test")
    try:
        cb = AmpWandbCallback.from_plan(resolve_precision("16-mixed", "cpu"))
        for r in _records():
            cb.on_step_end(r)
        wandb.log({}, commit=True)  # W&B commits a step's row when the next step (or finish) arrives
        assert run.summary["amp/skipped_steps"] == 1
        assert run.summary["amp/loss_scale"] == 32768.0
        assert run.summary["amp/precision"] == "16-mixed"
    finally:
        run.finish()


def test_amp_summary():
    history = pd.DataFrame([{**r, "nonfinite_grads": r["skipped"]} for r in _records()])
    assert amp_summary(history) == {"steps": 3, "skipped_steps": 1, "nonfinite_grad_steps": 1,
                                    "final_loss_scale": 32768.0, "min_loss_scale": 32768.0}
