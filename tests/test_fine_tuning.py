import math
import re

import pandas as pd
import pytest
import torch

from utils.data import load_corpus
from utils.models import ModelLoadError, build_model, compute_loss
from utils.loop.callbacks import AmpWandbCallback
from utils.loop.steps import forward_backward, warmup_cosine
from utils.precision import resolve as resolve_precision
from utils.tier3_training_utilities import test_fine_tuning

FAST = dict(steps=6, batch_size=4, seq_len=16, eval_interval=3, eval_batches=2, progress=False)


def fresh_gpt(seed=0):
    torch.manual_seed(seed)
    return build_model("gpt-tiny")


def test_library_test_functions_are_not_collected():
    assert test_fine_tuning.__test__ is False


def test_same_seed_gives_the_same_history_exactly():
    a = test_fine_tuning(fresh_gpt(), precision="32", **FAST)
    b = test_fine_tuning(fresh_gpt(), precision="32", **FAST)
    pd.testing.assert_series_equal(a.history["loss"], b.history["loss"], check_exact=True)
    pd.testing.assert_series_equal(a.history["grad_norm"], b.history["grad_norm"], check_exact=True)
    c = test_fine_tuning(fresh_gpt(), precision="32", **{**FAST, "seed": 1})
    assert not a.history["loss"].equals(c.history["loss"])


def test_history_and_result_fields():
    r = test_fine_tuning(fresh_gpt(), precision="32", **FAST)
    assert list(r.history["step"]) == [1, 2, 3, 4, 5, 6]
    for col in ("loss", "lr", "grad_norm", "loss_scale", "skipped", "nonfinite_grads", "tokens_per_s"):
        assert col in r.history and r.history[col].notna().all()
    assert list(r.eval_history["step"]) == [0, 3, 6]
    assert r.final_perplexity == pytest.approx(math.exp(r.final_eval_loss))
    assert r.effective_precision == "32" and r.precision_reason == "fp32 requested"
    summary = r.summary()
    assert summary["skipped_steps"] == 0 and summary["precision"]["precision"] == "32"
    assert summary["corpus"] == "python-stdlib" and len(summary["corpus_fingerprint"]) == 16


def test_tiny_gpt_learns_the_corpus_and_bf16_matches_fp32():
    """The issue's acceptance run: 200 steps on the built-in corpus, fp32 vs bf16 with one seed."""
    fp32 = test_fine_tuning(fresh_gpt(), precision="32", steps=200, progress=False)
    bf16 = test_fine_tuning(fresh_gpt(), precision="bf16-mixed", steps=200, progress=False)
    assert fp32.final_eval_loss < 0.6 * fp32.initial_eval_loss
    assert bf16.final_eval_loss < 0.6 * bf16.initial_eval_loss
    assert abs(bf16.final_eval_loss - fp32.final_eval_loss) / fp32.final_eval_loss < 0.02


def test_bf16_forward_really_runs_in_bf16():
    model = fresh_gpt()
    dtypes = set()
    model.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    test_fine_tuning(model, precision="bf16-mixed", **FAST)
    assert dtypes == {torch.bfloat16}
    dtypes.clear()
    test_fine_tuning(model, precision="32", **FAST)
    assert dtypes == {torch.float32}


class PoisonOnStep:
    """Callback + forward hook: multiplies activations by 1e6 during one chosen optimizer step.
    Finite in fp32, beyond fp16's 65504 under autocast: an overflow a real model can have."""

    def __init__(self, model, step):
        self.step, self.current = step, 1
        model.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: o * 1e6 if self.current == self.step else o)

    def on_step_end(self, record):
        self.current = record["step"] + 1


def test_fp16_overflow_is_a_skipped_step_the_scale_halves_the_schedule_holds():
    model = fresh_gpt()
    poison = PoisonOnStep(model, step=3)
    r = test_fine_tuning(model, precision="16-mixed", device="cpu", callbacks=[poison], **FAST)
    h = r.history.set_index("step")
    assert r.plan.use_scaler and "forced on CPU" in r.plan.reason
    assert h.loc[3, "skipped"] and h.loc[3, "nonfinite_grads"]
    assert not h.drop(index=3)["skipped"].any()
    assert h.loc[4, "loss_scale"] == h.loc[3, "loss_scale"] / 2
    assert h.loc[4, "lr"] == h.loc[3, "lr"]  # the scheduler did not advance on the skipped step
    assert h.loc[3, "lr"] != h.loc[2, "lr"]  # ... but it does advance on real steps
    assert r.summary()["skipped_steps"] == 1


def test_nonfinite_gradients_in_fp32_skip_the_step_instead_of_corrupting_weights():
    model = fresh_gpt()
    hook = model.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: o * float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = test_fine_tuning(model, precision="32", **{**FAST, "steps": 2})
    hook.remove()
    assert r.history["skipped"].all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_accumulation_divides_by_the_window():
    corpus = load_corpus()
    x, y = corpus.get_batch("train", 8, 16, torch.Generator().manual_seed(0))
    plan = resolve_precision("32", "cpu")
    scaler = plan.loss_scaler()
    whole, halves = fresh_gpt(), fresh_gpt()
    forward_backward(whole, (x, y), scaler, window=1)
    forward_backward(halves, (x[:4], y[:4]), scaler, window=2)
    forward_backward(halves, (x[4:], y[4:]), scaler, window=2)
    for (name, p), q in zip(whole.named_parameters(), halves.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_partial_last_window_with_epochs():
    corpus = load_corpus()
    epochs = 5 * 4 * 16 / len(corpus.train)  # exactly 5 micro-batches
    r = test_fine_tuning(fresh_gpt(), data=corpus, precision="32", epochs=epochs, grad_accum_steps=2,
                         batch_size=4, seq_len=16, eval_batches=1, progress=False)
    assert list(r.history["micro_batches"]) == [2, 2, 1]


def test_weight_decay_skips_biases_and_norms():
    model = fresh_gpt()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    # lr tiny, decay huge: only decayed tensors move noticeably toward zero, undecayed ones stay put
    test_fine_tuning(model, precision="32", lr=1e-9, weight_decay=1e6, **{**FAST, "steps": 1})
    for name, p in model.named_parameters():
        moved = not torch.allclose(p, frozen[name], atol=1e-6)
        assert moved == (p.dim() >= 2), name


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_seed_use_amp_flag_and_callbacks():
    logged = []
    plan = resolve_precision("auto", "cpu", use_amp=True)
    r = test_fine_tuning(fresh_gpt(), use_amp=True, callbacks=[AmpWandbCallback.from_plan(plan, log=lambda d, step: logged.append(step))], **FAST)
    assert r.plan == plan
    assert logged == [1, 2, 3, 4, 5, 6]
    assert test_fine_tuning(fresh_gpt(), use_amp=False, **FAST).effective_precision == "32"


def test_user_models_and_specs():
    r = test_fine_tuning("tests.user_models:make_hf_style", precision="32", **FAST)
    assert r.history["loss"].notna().all()
    r = test_fine_tuning("tests.user_models:make_tuple_lm", precision="bf16-mixed", **FAST)
    assert r.history["loss"].notna().all()


def test_encoder_classifier_trains_on_the_classification_set(tiny_encoder):
    r = test_fine_tuning(tiny_encoder, precision="32", steps=60, batch_size=16, seq_len=64, eval_interval=60,
                         eval_batches=4, lr=1e-3, progress=False)
    assert r.config["corpus"] == "classification"
    assert r.final_eval_loss < r.initial_eval_loss


def test_user_text_file_as_data(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    r = test_fine_tuning(fresh_gpt(), data=str(path), precision="32", **FAST)
    assert r.config["corpus"] == str(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "parameter 'steps' expects an integer >= 1; got 0"),
    ({"batch_size": 2.5}, "parameter 'batch_size' expects an integer >= 1; got 2.5"),
    ({"precision": "int8"}, "unknown precision 'int8'"),
    ({"stepz": 5}, r"unknown parameter\(s\) 'stepz' for test_fine_tuning; known: \['activation_checkpointing', 'batch_size'"),
])
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        test_fine_tuning(fresh_gpt(), **{**FAST, **kwargs})


def test_loss_is_computed_in_fp32_under_autocast():
    model = fresh_gpt()
    x = torch.randint(0, 256, (2, 8))
    with resolve_precision("bf16-mixed", "cpu").autocast():
        loss = compute_loss(model, x, x)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("kwargs, message", [({"lr": float("nan")}, "parameter 'lr' expects a number from 1e-12 to 10; got nan"),
                                             ({"lr": 0}, "parameter 'lr' expects a number from 1e-12 to 10; got 0"),
                                             ({"epochs": -1}, "parameter 'epochs' expects a number >= 1e-12, or None; got -1"),
                                             ({"warmup_steps": -5}, "parameter 'warmup_steps' expects an integer >= 0, or None; got -5"),
                                             ({"max_grad_norm": float("nan")}, "parameter 'max_grad_norm' expects a number >= 1e-12; got nan"),
                                             ({"weight_decay": -0.1}, "parameter 'weight_decay' expects a number >= 0; got -0.1")])
def test_bad_numbers_are_refused_by_name_before_training(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        test_fine_tuning("gpt-tiny", **{**FAST, **kwargs})


def test_a_model_without_parameters_is_refused_with_the_reason():
    with pytest.raises(ModelLoadError, match="NoParameters .* has no parameters; expected a model with weights"):
        test_fine_tuning("tests.user_models:NoParameters", **FAST)


def test_a_model_that_fails_to_compile_trains_eager_with_the_reason_recorded(monkeypatch):
    eager = test_fine_tuning(fresh_gpt(), precision="32", **FAST)

    def no_compiler(model, **kwargs):  # what a machine without a C++ compiler gives at the first call
        def call(*args, **kw):
            raise RuntimeError("BackendCompilerFailed: no working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    r = test_fine_tuning(fresh_gpt(), precision="32", compile=True, **FAST)
    info = r.config["compile"]
    assert info["compiled"] is False and "no working C++ compiler" in info["fallback"] and "eager" in info["fallback"]
    pd.testing.assert_frame_equal(r.history[["loss", "grad_norm"]], eager.history[["loss", "grad_norm"]], check_exact=True)


def test_seq_len_is_capped_at_the_models_maximum_as_in_the_tiers():
    """The default seq_len (128, tier 3's) on a model of max_len 64 trains at 64 and says so, as the tiers do."""
    r = test_fine_tuning(fresh_gpt(), precision="32", **{**FAST, "seq_len": 128})
    assert r.config["seq_len"] == 64 and r.summary()["seq_len"] == 64
