"""Hostile input to the library (run_tier, test_fine_tuning, the checks, the model loader, utils.train): a model that
cannot learn is failed or refused with the right reason, a healthy one still passes, and bad input gets one clear
error before any work starts."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.user_models import Detached, DetachedNoGrad, TinyGPTWrapper, ZeroGradient
from utils.loop.config import TrainConfig
from utils.models import ModelLoadError, UnsupportedModel, build_model, load_model, probe_model
from utils.params import ParamError
from utils.precision import UnsupportedPrecision, keep_in_fp32
from utils.run import main as run_main
from utils.runner import execute as execution
from utils.tier1_critical_validation import check_causality, check_gradient_flow
from utils.tier3_training_utilities import test_fine_tuning
from utils.tiers import run_tier

ROOT = Path(__file__).resolve().parents[1]
# Tier 3 in seconds: fp32 against bf16 at the batch asked for on any CPU (emulated_amp='full'), no remedies.
TIER3 = dict(seq_len=16, trials=1, warmup_steps=0, timed_steps=1, device="cpu", precision="bf16-mixed", remedy_runs=0,
             emulated_amp="full")
CUT_OFF = ("cannot be trained: no parameter gets a gradient from its loss, since its logits are cut off from every weight "
           "(.detach() or no_grad in the forward). Expected a model whose loss reaches its weights (tier 1's gradient_flow "
           "shows which parameters get one)")


@pytest.fixture
def no_kernel(monkeypatch):
    """Any notebook started fails the test: a usage error must be found before a kernel starts."""
    def started(*args, **kwargs):
        raise AssertionError("a notebook ran")
    monkeypatch.setattr(execution, "run_notebook", started)


def runner_refuses(args, tmp_path, capsys) -> str:
    """utils.run's exit 2 and its one line, with nothing created under --out."""
    assert run_main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "out").exists()
    return err.removeprefix("error: ").rstrip("\n")


# --- 1. a model that does not learn fails fp32_baseline; a healthy one passes ------------------------------------

def test_a_model_whose_gradients_are_all_zero_fails_the_fp32_baseline_and_amp_is_not_judged():
    r = run_tier(3, {**TIER3, "steps": 4, "batch_size": 2}, model=ZeroGradient())
    baseline = r.checks["fp32_baseline"].verdict
    assert baseline.status == "fail" and baseline.reason == (
        "every gradient was zero in all 4 fp32 steps (gradient norm 0 throughout), so nothing trained: eval loss 5.430 -> "
        "5.430. The loss reaches the weights only through terms whose gradient is zero (multiplied by 0, or cut off by "
        ".detach()); tier 1's gradient_flow lists them as vanishing. AMP is not judged against a model that cannot learn.")
    assert r.checks["amp_safe"].verdict.reason.startswith("not judged: the fp32 baseline failed")


def test_a_loss_that_does_not_move_fails_the_fp32_baseline_naming_the_learning_rate():
    r = run_tier(3, {**TIER3, "steps": 4, "batch_size": 2, "lr": 1e-12}, model=TinyGPTWrapper())
    baseline = r.checks["fp32_baseline"].verdict
    assert baseline.status == "fail" and re.fullmatch(
        r"the fp32 run did not learn: eval loss 5\.4301 -> 5\.4301 moved less than 0\.1% in 4 steps, though gradients "
        r"flowed \(norms up to [0-9.]+\)\. Check that the logits depend on the weights being trained, and that lr \(1e-12\) "
        r"is not too small; AMP is not judged against a baseline that does not learn\.", baseline.reason), baseline.reason


@pytest.mark.parametrize("model, params", [
    (TinyGPTWrapper, {"steps": 1, "batch_size": 1}),  # the least a healthy model moves: 0.7% after one step of 16 tokens
    ("encoder-tiny", {"steps": 4, "batch_size": 2, "seq_len": 32}),  # a classifier whose loss rises in its first steps
])
def test_a_healthy_model_passes_the_fp32_baseline_in_the_shortest_runs(model, params):
    r = run_tier(3, {**TIER3, **params}, model=model() if callable(model) else build_model(model))
    baseline = r.checks["fp32_baseline"].verdict
    assert baseline.status == "pass" and re.fullmatch(r"fp32 trains: eval loss [0-9.]+ -> [0-9.]+\.", baseline.reason)


# --- 2. tier 1 judges a detached model instead of crashing on it --------------------------------------------------

@pytest.mark.parametrize("model", [Detached, DetachedNoGrad, TinyGPTWrapper])
def test_causality_judges_a_model_whose_logits_ask_for_a_gradient(model):
    verdict = check_causality(model(), seq_len=16).verdict
    assert verdict.status == "pass" and re.fullmatch(
        r"changing tokens 8\.\.15 leaves the logits of positions 0\.\.7 unchanged \(largest change [0-9.e+-]+\)\.",
        verdict.reason), verdict.reason


@pytest.mark.parametrize("model", [Detached, DetachedNoGrad])
def test_gradient_flow_says_no_parameter_gets_a_gradient(model):
    verdict = check_gradient_flow(model(), seq_len=16).verdict
    assert verdict.status == "fail" and verdict.reason == (
        "none of the model's 28 parameters gets a gradient: the loss is cut off from every weight (.detach() or no_grad "
        "in the forward), so training cannot change it. Compute the logits from the weights with autograd on.")


def test_gradient_flow_passes_a_healthy_model():
    assert check_gradient_flow(TinyGPTWrapper(), seq_len=16).verdict.status == "pass"


@pytest.mark.parametrize("model", [Detached, DetachedNoGrad])
def test_a_model_whose_loss_reaches_no_weight_is_refused_at_its_first_step(model):
    r = run_tier(3, {**TIER3, "steps": 4, "batch_size": 2}, model=model())
    assert list(r.checks) == ["supported"] and r.verdicts[0].reason == f"{model.__name__} {CUT_OFF}"
    with pytest.raises(UnsupportedModel) as e:
        test_fine_tuning(model(), precision="32", steps=2, batch_size=2, seq_len=16, device="cpu", progress=False)
    assert str(e.value) == f"{model.__name__} {CUT_OFF}"


# --- 3. fp32_modules never names the whole model -----------------------------------------------------------------

ROOT_MODULE = ("fp32_modules [''] names '', the root module (the whole model): nothing would be left to AMP, so fp32 "
               "would be compared with itself; expected submodule names from model.named_modules(), such as 'lm_head'")


def test_the_root_module_in_fp32_modules_is_refused_before_any_work(tmp_path, capsys, no_kernel):
    with pytest.raises(ParamError) as e:
        run_tier(3, {**TIER3, "fp32_modules": [""]}, model=TinyGPTWrapper())
    assert str(e.value) == f"parameter 'fp32_modules': {ROOT_MODULE}"
    with pytest.raises(UnsupportedPrecision) as e:
        keep_in_fp32(build_model("gpt-tiny"), [""])
    assert str(e.value) == ROOT_MODULE
    assert runner_refuses(["--tiers", "3", "-p", "fp32_modules=['']"], tmp_path, capsys) == \
        f"parameter 'fp32_modules': {ROOT_MODULE}"


# --- 4. utils.train checks its folders before it trains ----------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--output-dir", "/etc/passwd"], "parameter 'output_dir': '/etc/passwd' is a file; expected a folder (created when "
                                      "missing)"),
    (["--checkpoint-dir", "/proc/nope"], "parameter 'checkpoint_dir': '/proc/nope' cannot be created in '/proc' (No such "
                                         "file or directory); expected a folder this process can write (created when "
                                         "missing)"),
])
def test_utils_train_refuses_a_folder_it_cannot_write_before_training(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "utils.train", "--model", "gpt-tiny", "--steps", "1", "--seq-len", "16",
                           "--device", "cpu", "--output-dir", str(tmp_path / "out"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == f"utils.train: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_a_folder_that_can_be_created_is_accepted_and_not_created_by_the_check(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ParamError) as e:
        TrainConfig.from_params({"checkpoint_dir": str(tmp_path / "file" / "below")})
    assert str(e.value) == (f"parameter 'checkpoint_dir': {str(tmp_path / 'file' / 'below')!r} cannot be created: "
                            f"{str(tmp_path / 'file')!r} is a file; expected a folder (created when missing)")
    config = TrainConfig.from_params({"checkpoint_dir": str(tmp_path / "a" / "b")})
    assert config.checkpoint_dir == str(tmp_path / "a" / "b") and not (tmp_path / "a").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # the probe's temporary file is gone


# --- 5. test_fine_tuning: the suite's errors, not torch's or the OS's ---------------------------------------------

def test_fine_tuning_refuses_a_checkpoint_dir_a_device_and_a_batch_it_cannot_use(tmp_path):
    fast = dict(precision="32", steps=1, seq_len=16, progress=False)
    with pytest.raises(ParamError) as e:
        test_fine_tuning("gpt-tiny", checkpoint_dir="/proc/nope", checkpoint_every=1, device="cpu", **fast)
    assert str(e.value) == ("parameter 'checkpoint_dir': '/proc/nope' cannot be created in '/proc' (No such file or "
                            "directory); expected a folder this process can write (created when missing)")
    with pytest.raises(ParamError) as e:
        test_fine_tuning("gpt-tiny", device="gpu", **fast)
    assert str(e.value) == "parameter 'device': expects 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"
    with pytest.raises(ParamError) as e:
        test_fine_tuning("gpt-tiny", batch_size=10**12, device="cpu", **fast)
    # 16 tokens x (8-byte id + 8-byte target + 256 fp32 logits) = 16,640 bytes a sequence
    found = re.fullmatch(r"parameter 'batch_size': 1,000,000,000,000 sequences of 16 tokens need at least 15,497,207\.6 "
                         r"GiB for one step's token ids and fp32 logits alone, more than the device's [0-9,.]+ GiB; expected "
                         r"at most ([0-9,]+)", str(e.value))
    assert found, str(e.value)
    fits = int(found[1].replace(",", ""))
    assert test_fine_tuning("gpt-tiny", batch_size=min(fits, 2), device="cpu", **fast).history["step"].tolist() == [1]


def test_tier3_refuses_a_sweep_batch_that_cannot_fit_before_any_trial():
    with pytest.raises(ParamError, match=r"^parameter 'sweep_batch_sizes': 1,000,000,000,000 sequences of 16 tokens "):
        run_tier(3, {**TIER3, "steps": 1, "batch_size": 2, "sweep_batch_sizes": [2, 10**12]}, model=TinyGPTWrapper())


# --- 6. run_tier's params are a mapping -------------------------------------------------------------------------

@pytest.mark.parametrize("params, given", [("notadict", "str 'notadict'"), ([("seq_len", 8)], "list [('seq_len', 8)]")])
def test_run_tier_params_must_be_a_mapping(params, given):
    with pytest.raises(ParamError) as e:
        run_tier(1, params)
    assert str(e.value) == ("params must be a mapping of parameter names to values, such as {'seq_len': 16}; got "
                            f"{given}")


# --- 7. a deserializer is never called as a model -----------------------------------------------------------------

def deserializer(spec: str, named: str) -> str:
    return (f"model spec {spec!r} names {named!r}, a deserializer (it builds whatever its input describes, running code "
            "on the way), not a model factory; a model spec must name a callable that builds an nn.Module (a guard against "
            "misuse, not a sandbox: a model spec is code, see the README's trust boundary)")


def test_a_deserializer_is_never_called_as_a_model(tmp_path, capsys, no_kernel):
    """yaml:unsafe_load with a python/object/apply stream in model_kwargs would run the command: refused before any
    call, by the runner and by the loader, also when a user's file re-exports a deserializer."""
    mark = tmp_path / "PWNED"
    stream = f"!!python/object/apply:os.system ['touch {mark}']"
    assert runner_refuses(["--tiers", "1", "-p", "model=yaml:unsafe_load", "-p", f"model_kwargs={{'stream': {stream!r}}}"],
                          tmp_path, capsys) == f"parameter 'model': {deserializer('yaml:unsafe_load', 'yaml.unsafe_load')}"
    for spec, named in (("yaml:load", "yaml.load"), ("yaml:full_load_all", "yaml.full_load_all"),
                        ("yaml.constructor:UnsafeConstructor", "yaml.constructor.UnsafeConstructor"),
                        ("torch:load", "torch.load"), ("numpy:load", "numpy.load"), ("pandas:read_pickle", "pandas.read_pickle"),
                        ("joblib:load", "joblib.load"), ("dill:loads", "dill.loads"), ("cloudpickle:loads", "cloudpickle.loads")):
        with pytest.raises(ModelLoadError) as e:
            load_model(spec, stream=stream)
        assert str(e.value) == deserializer(spec, named)
    factory = tmp_path / "reexport.py"
    factory.write_text("from yaml import unsafe_load as make\nfrom torch import load as make_torch\n")
    for attr, named in (("make", "yaml.unsafe_load"), ("make_torch", "torch.serialization.load")):
        with pytest.raises(ModelLoadError) as e:
            load_model(f"{factory}:{attr}", stream=stream)
        assert str(e.value) == deserializer(f"{factory}:{attr}", named)
    assert not mark.exists()


def test_a_factory_that_uses_yaml_itself_is_still_a_model_factory(tmp_path):
    factory = tmp_path / "config_factory.py"
    factory.write_text("import yaml\nfrom utils.models import build_model\n\n"
                       "def make(config):\n    return build_model('gpt-tiny', **yaml.safe_load(config))\n")
    model = load_model(f"{factory}:make", config="n_layer: 1")
    assert probe_model(model) == "causal-lm" and len(model.blocks) == 1
