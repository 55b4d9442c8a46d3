"""The seed's API as its users call it: compute_effective_precision(requested, use_amp, cuda_available, use_gpu)
is a pure function with the seed's contract, and AmpWandbCallback(enabled, precision) is a Lightning callback
that logs AMP state per epoch, and still serves this project's own loop."""

import itertools
import math

import pytest
import torch

from tests.packages import optional
from tests.user_models import TinyGPTWrapper
from utils.data import load_corpus
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.amp_utils import AmpWandbCallback, compute_effective_precision

pytestmark = pytest.mark.versions  # what differs between versions: run in every environment (.ci/run)


def contract(requested, use_amp, cuda_available, use_gpu):
    """The seed's table, written out independently of the implementation."""
    if use_amp is None:
        return requested
    return "16" if use_amp and cuda_available and use_gpu else "32"


@pytest.fixture
def no_device_queries(monkeypatch):
    """Any look at the real device fails the test: the function must trust its arguments."""
    def forbidden(*args, **kwargs):
        raise AssertionError("compute_effective_precision queried the device")
    for name in ("cuda_available", "device_capability", "device_name", "cpu_has_native_bf16"):  # the device seam
        monkeypatch.setattr(f"utils.device.{name}", forbidden)


@pytest.mark.parametrize("requested, use_amp, cuda_available, use_gpu",
                         list(itertools.product(("32", "16", "bf16"), (None, True, False), (True, False), (True, False))))
def test_compute_effective_precision_follows_the_contract_without_touching_the_device(
        requested, use_amp, cuda_available, use_gpu, no_device_queries):
    assert compute_effective_precision(requested, use_amp, cuda_available, use_gpu) == \
        contract(requested, use_amp, cuda_available, use_gpu)


def test_the_reported_calls():
    assert compute_effective_precision("16", True, True, True) == "16"   # raised "Torch not compiled with CUDA" before
    assert compute_effective_precision("16", True, False, True) == "32"  # returned '16' (fp16 on a CPU) before


class Scaler:
    def __init__(self, scale):
        self.scale = scale

    def get_scale(self):
        return self.scale


class Trainer:
    """The pieces of a Lightning Trainer the callback reads."""

    def __init__(self, scaler=None, epoch=0, strategy=True, plugin=True):
        self.current_epoch = epoch
        if strategy:
            self.strategy = type("Strategy", (), {})()
            if plugin:
                self.strategy.precision_plugin = type("Plugin", (), {"scaler": scaler})()


def test_get_loss_scale_is_none_when_any_piece_is_missing_and_exact_otherwise():
    _get_loss_scale = AmpWandbCallback(enabled=True, precision="16")._get_loss_scale  # a method, as the seed's callers use it
    assert _get_loss_scale(None) is None
    assert _get_loss_scale(Trainer(strategy=False)) is None
    assert _get_loss_scale(Trainer(plugin=False)) is None
    assert _get_loss_scale(Trainer(scaler=None)) is None
    assert _get_loss_scale(Trainer(Scaler(torch.tensor(65536.0)))) == 65536.0
    for extreme in (2.0 ** 120, 2.0 ** -126, 1e-45, float("inf")):
        assert _get_loss_scale(Trainer(Scaler(extreme))) == extreme
    assert math.isnan(_get_loss_scale(Trainer(Scaler(float("nan")))))


def recorder():
    logged = []
    return logged, lambda data, step: logged.append((step, data))


def test_epoch_end_logs_the_three_keys_for_fp16_and_two_for_bf16():
    logged, log = recorder()
    AmpWandbCallback(True, "16-mixed", log=log).on_train_epoch_end(Trainer(Scaler(1024.0), epoch=3), None)
    AmpWandbCallback(True, "bf16-mixed", log=log).on_train_epoch_end(Trainer(Scaler(1.0), epoch=4), None)
    AmpWandbCallback(False, "32", log=log).on_train_epoch_end(Trainer(epoch=5), None)
    AmpWandbCallback(True, "16", log=log).on_train_epoch_end(Trainer(epoch=6), None)  # fp16 but no scaler: no scale
    assert logged == [(3, {"amp/enabled": 1, "amp/precision": "16-mixed", "amp/loss_scale": 1024.0}),
                      (4, {"amp/enabled": 1, "amp/precision": "bf16-mixed"}),
                      (5, {"amp/enabled": 0, "amp/precision": "32"}),
                      (6, {"amp/enabled": 1, "amp/precision": "16"})]


def test_the_callback_never_raises_into_training():
    def broken(data, step):
        raise RuntimeError("network down")
    with pytest.warns(UserWarning, match="could not log at step 2: RuntimeError: network down"):
        AmpWandbCallback(True, "16-mixed", log=broken).on_train_epoch_end(Trainer(Scaler(8.0), epoch=2), None)
    wandb = optional("wandb")
    assert wandb.run is None
    AmpWandbCallback(True, "16-mixed").on_train_epoch_end(Trainer(Scaler(8.0)), None)  # no run: nothing, no error
    assert wandb.run is None


def test_the_projects_loop_logs_through_the_same_class():
    logged, log = recorder()
    result = test_fine_tuning("gpt-tiny", precision="16-mixed", steps=3, batch_size=2, seq_len=16, eval_batches=0,
                              device="cpu", progress=False, callbacks=[AmpWandbCallback(True, "16-mixed", log=log)])
    assert [step for step, _ in logged] == [1, 2, 3]
    assert logged[-1][1]["amp/loss_scale"] == result.history["loss_scale"].iloc[-1]
    assert logged[-1][1]["amp/skipped_steps"] == int(result.history["skipped"].sum())


# --- a real Lightning Trainer ------------------------------------------------------------------

def lightning_run(precision: str, callback, epochs: int = 2):
    L = optional("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision  # optional package: imported once it is known to exist
    corpus = load_corpus()
    g = torch.Generator().manual_seed(0)
    x, y = corpus.get_batch("train", 6, 16, g)
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)  # 3 steps an epoch

    class TinyLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyGPTWrapper()

        def training_step(self, batch, _):
            x, y = batch
            logits = self.model(x).float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    # Lightning turns precision="16-mixed" on a CPU into bf16; its fp16 plugin, given explicitly, runs fp16 autocast
    # with a CPU GradScaler, the path a T4 takes.
    choice = {"plugins": [MixedPrecision("16-mixed", "cpu")]} if precision == "16-mixed" else {"precision": precision}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **choice)
    trainer.fit(TinyLM(), train_dataloaders=batches)
    return trainer


def test_is_a_real_lightning_callback():
    L = optional("lightning.pytorch")
    assert isinstance(AmpWandbCallback(True, "bf16-mixed"), L.Callback)  # not a plain class: Lightning can call it


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_a_lightning_run_logs_amp_state_every_epoch(precision):
    logged, log = recorder()
    trainer = lightning_run(precision, AmpWandbCallback(True, precision, log=log))
    assert [step for step, _ in logged] == [0, 1]
    for _, data in logged:
        assert data["amp/enabled"] == 1 and data["amp/precision"] == precision
    if precision == "16-mixed":  # Lightning's CPU fp16 runs a GradScaler: its scale is read per epoch
        assert [data["amp/loss_scale"] for _, data in logged][-1] == trainer.strategy.precision_plugin.scaler.get_scale()
    else:
        assert all("amp/loss_scale" not in data for _, data in logged)


def test_a_lightning_run_logs_to_an_offline_wandb_run(tmp_path, monkeypatch):
    wandb = optional("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="amp-seed-api")
    try:
        lightning_run("16-mixed", AmpWandbCallback(True, "16-mixed"))
        wandb.log({}, commit=True)  # W&B commits a step's row when the next step (or finish) arrives
        assert run.summary["amp/precision"] == "16-mixed" and run.summary["amp/enabled"] == 1
        assert run.summary["amp/loss_scale"] > 0
    finally:
        run.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))  # the run's file was written
