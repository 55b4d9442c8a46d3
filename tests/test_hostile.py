"""Careless and hostile input, and stops from outside: each gets one clear line that names what was given and what
is expected, exit 2 before any kernel starts where it is a usage error, and nothing lost or left hanging."""

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.packages import optional
from tests import processes
from tests.user_models import NarrowLogits, NoisyLM
from utils import device, models as model_loading
from utils import run as runner
from utils.runner import execute as execution
from utils.loop import stops
from utils.loop.config import TrainConfig
from utils.models import ModelLoadError, load_model, probe_model
from utils.params import ParamError
from utils.results import read_json
from utils.run import main
from utils.tier1_critical_validation import check_causality
from utils.tiers import run_tier
from utils.tier3_training_utilities import test_fine_tuning

ROOT = Path(__file__).resolve().parents[1]
TINY1 = ["--tiers", "1", "-p", "seq_len=16", "-p", "latency_iters=3", "-p", "batch_sizes=[1]"]


@pytest.fixture
def no_kernel(monkeypatch):
    """Any notebook started fails the test: a usage error must be found before a kernel starts."""
    def started(*args, **kwargs):
        raise AssertionError("a notebook ran")
    monkeypatch.setattr(execution, "run_notebook", started)


def refused(args, tmp_path, capsys) -> str:
    """The runner's exit 2 and its one line; nothing was created under --out."""
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    return err.removeprefix("error: ")


@pytest.mark.parametrize("value, message", [
    ("cuda", "parameter 'device': 'cuda' asks for CUDA, but this machine has no CUDA device"),
    ("cuda:99", "parameter 'device': 'cuda:99' asks for CUDA, but this machine has no CUDA device"),
    ("cüda", "parameter 'device': expects 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'cüda'"),
    ("tpu", "parameter 'device': expects 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"),
    ("", "parameter 'device': expects 'auto', 'cpu', 'cuda' or 'cuda:N'; got ''"),
    ("mps", "parameter 'device': expects 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'mps'"),
    ("meta", "parameter 'device': expects 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'meta'"),
    ("cpu:1", "parameter 'device': expects 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'cpu:1'"),
])
def test_a_device_this_machine_lacks_is_refused_before_a_kernel_starts(value, message, tmp_path, capsys, no_kernel):
    if value.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert refused([*TINY1, "-p", f"device={value}"], tmp_path, capsys).startswith(message)


@pytest.mark.parametrize("assignment, message", [
    ("seed=99999999999999999999999999999",
     "parameter 'seed' expects an integer from 0 to 4294967295; got 99999999999999999999999999999 (int)"),
    ("batch_sizes=[]", "parameter 'batch_sizes' expects a list of at least 1 integers >= 1; got [] (list)"),
    ("model_kwargs={'n_layer': -1}", "parameter \"model_kwargs['n_layer']\" expects an integer >= 1; got -1 (int)"),
    ("model_kwargs={'d_model': 96, 'n_head': 5}",
     "parameter 'model_kwargs': 'gpt-tiny' with {'d_model': 96, 'n_head': 5}: d_model=96 must be divisible by n_head=5"),
    ("model_kwargs={'d_model': 1000000}", "parameter 'model_kwargs': 'gpt-tiny' with {'d_model': 1000000} has "
     "24,000,348,000,000 parameters, 89,408.3 GiB of fp32 weights alone, more than the device's"),
    ("model_kwargs={'n_layers': 2}", "parameter 'model_kwargs': unknown field 'n_layers' of 'gpt-tiny'; expected some of"),
    ("model=nosuch-model", "parameter 'model': 'nosuch-model' is not a model spec; expected a registry name (gpt-tiny"),
    ("model=hf:", "parameter 'model': 'hf:' is not a model spec"),
])
def test_a_value_that_would_fail_in_the_notebook_is_refused_before_it(assignment, message, tmp_path, capsys, no_kernel):
    name = assignment.partition("=")[0]  # in place of TINY1's own value: a parameter given twice is refused as such
    tiny = [arg for pair in zip(TINY1[::2], TINY1[1::2]) if not pair[1].startswith(f"{name}=") for arg in pair]
    assert refused([*tiny, "-p", assignment], tmp_path, capsys).startswith(message)


def test_strengths_need_one_value_too(tmp_path, capsys, no_kernel):
    err = refused(["--tiers", "2", "-p", "strengths=[]"], tmp_path, capsys)
    assert err == "parameter 'strengths' expects a list of at least 1 numbers from 0 to 1; got [] (list)"


def test_a_standard_library_callable_is_never_called_as_a_model(tmp_path, capsys, no_kernel):
    """os:system with model_kwargs {command: ...} would run the command: refused before any call, by the runner and
    by the loader, also when a user's file re-exports it."""
    mark = tmp_path / "PWNED"
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"model: ['os:system']\nmodel_kwargs: [{{command: 'touch {mark}'}}]\n")
    err = refused([*TINY1, "--grid", str(grid)], tmp_path, capsys)
    assert err.startswith("parameter 'model': model spec 'os:system' names 'os', part of Python's standard library, "
                          "not a model factory;") and "not a sandbox" in err
    factory = tmp_path / "reexport.py"
    factory.write_text("from os import system as make\n")
    for spec in ("builtins:exec", "subprocess:run", f"{factory}:make"):
        with pytest.raises(ModelLoadError, match="part of Python's standard library"):
            load_model(spec, command=f"touch {mark}")
    assert not mark.exists()


def test_a_factory_file_with_a_syntax_error_names_the_spec_and_the_line(tmp_path):
    factory = tmp_path / "broken.py"
    factory.write_text("import torch\ndef make(:\n    pass\n")
    with pytest.raises(ModelLoadError) as e:
        load_model(f"{factory}:make")
    assert str(e.value) == f"model file {str(factory)!r} (from spec '{factory}:make') has a syntax error at line 2: " \
                           "invalid syntax"


def test_a_module_spec_with_a_syntax_error_names_the_spec(tmp_path, monkeypatch):
    (tmp_path / "badmod.py").write_text("def make(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError) as e:
        load_model("badmod:make")
    assert str(e.value) == "cannot import module 'badmod' from spec 'badmod:make': invalid syntax (badmod.py, line 1)"


def test_a_partial_of_a_users_class_is_not_taken_for_the_standard_library(tmp_path):
    factory = tmp_path / "partial_factory.py"
    factory.write_text("import functools\nfrom tests.user_models import TinyGPTWrapper\n"
                       "make = functools.partial(TinyGPTWrapper)\n")
    assert type(load_model(f"{factory}:make")).__name__ == "TinyGPTWrapper"


def test_a_cuda_device_past_the_machines_count_names_what_it_has(monkeypatch):
    monkeypatch.setattr(device, "cuda_device_count", lambda: 1)
    with pytest.raises(ValueError) as e:
        device.check_device("cuda:3")
    assert str(e.value) == "'cuda:3' asks for CUDA device 3, but this machine has 1 (cuda:0)"
    device.check_device("cuda:0")
    device.check_device("cuda")


def test_a_factory_that_builds_on_the_meta_device_is_refused_by_name():
    with pytest.raises(ModelLoadError, match=r"model GPT \(from tests.user_models:on_meta_device\) has its parameters on "
                                             "the meta device, which holds no values"):
        load_model("tests.user_models:on_meta_device")


@pytest.mark.parametrize("text, message", [
    (b"model: [gpt-tiny]\nlr: \xff\xfe\n", "is not UTF-8 text (byte 0xff at offset 22); expected a YAML file saved as UTF-8"),
    (b"just a string\n", "holds str 'just a string'; expected a mapping of parameter names to values"),
    (b"- 1\n- 2\n", "holds list [1, 2]; expected a mapping of parameter names to values"),
    (b"lr: [0.1]\nseed: 1\nlr: [0.2]\n", "parameter 'lr' is given twice (lines 1 and 3); expected each once"),
    (b"lr: [0.1\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1"),
])
def test_a_bad_grid_file_is_named_with_what_is_wrong(text, message, tmp_path, capsys, no_kernel):
    grid = tmp_path / "grid.yaml"
    grid.write_bytes(text)
    err = refused([*TINY1, "--grid", str(grid)], tmp_path, capsys)
    assert err.startswith(f"grid file {str(grid)!r}") and message in err


def test_a_grid_folder_is_not_a_grid_file(tmp_path, capsys, no_kernel):
    assert refused([*TINY1, "--grid", str(tmp_path)], tmp_path, capsys) == \
        f"grid file {str(tmp_path)!r} is a folder, not a file; expected a YAML file"


def test_a_grid_of_ten_million_runs_is_refused_before_it_is_expanded(tmp_path, capsys, monkeypatch, no_kernel):
    def expanded(grid):
        raise AssertionError("the grid was expanded")
    monkeypatch.setattr(runner, "expand_grid", expanded)
    grid = tmp_path / "grid.yaml"
    grid.write_text("".join(f"{k}: {list(range(1, 11))}\n" for k in
                            ("seed", "seq_len", "batch_size", "lr", "steps", "trials", "timed_steps")))
    start = time.perf_counter()
    err = refused(["--tiers", "3", "--grid", str(grid), "--dry-run"], tmp_path, capsys)
    print(f"refused in {time.perf_counter() - start:.3f} s")  # the closing note quotes it; no test asserts a time
    assert err == ("the grid makes 10,000,000 runs (10 seed x 10 seq_len x 10 batch_size x 10 lr x 10 steps x 10 trials "
                   "x 10 timed_steps, on tier(s) 3), more than --max-runs 1,000; raise --max-runs to run them all, "
                   "or make the grid smaller")
    monkeypatch.undo()
    small = tmp_path / "small.yaml"
    small.write_text("seed: [1, 2, 3]\n")
    assert main([*TINY1, "--grid", str(small), "--max-runs", "2", "--dry-run"]) == 2
    assert main([*TINY1, "--grid", str(small), "--max-runs", "3", "--dry-run"]) == 0
    assert main(["--tiers", "1", "3", "--grid", str(small), "--max-runs", "6", "--dry-run"]) == 0
    small.write_text("seed: [1, 2, 3]\nsteps: [1, 2]\n")  # tier 1 has no steps: 3 + 3 x 2 runs, not 2 x 3 x 2
    assert main(["--tiers", "1", "3", "--grid", str(small), "--max-runs", "9", "--dry-run"]) == 0
    assert main(["--tiers", "1", "3", "--grid", str(small), "--max-runs", "8", "--dry-run"]) == 2


def test_a_lock_that_is_a_folder_is_named(tmp_path, capsys, no_kernel):
    (tmp_path / "out" / "default" / ".lock").mkdir(parents=True)
    assert main([*TINY1, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'out' / 'default' / '.lock'} is a folder (or another non-file), not a runner's " \
                  "lock file; remove it and run again\n"


@pytest.mark.parametrize("name", ["a\nb", "tab\tname", ".hidden", "a b"])
def test_a_name_with_control_characters_or_a_leading_dot_is_refused(name, tmp_path, capsys, no_kernel):
    assert refused([*TINY1, "--name", name], tmp_path, capsys).startswith(f"--name {name!r} must be a plain folder name")


def test_a_name_that_links_out_of_out_is_refused(tmp_path, capsys, no_kernel):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "escape").symlink_to(tmp_path / "elsewhere")
    assert main([*TINY1, "--out", str(tmp_path / "out"), "--name", "escape"]) == 2
    assert f"is a link to {str(tmp_path / 'elsewhere')!r}, outside --out" in capsys.readouterr().err
    assert not list((tmp_path / "elsewhere").iterdir())


def test_relative_paths_are_made_absolute_once_at_the_edge(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text("from tests.user_models import TinyGPTWrapper as make\n")
    [(_, _, params)] = runner.plan_runs([3], {"model": "m.py:make", "checkpoint_dir": "ck"}, {})
    assert params["model"] == f"{tmp_path / 'm.py'}:make" and params["checkpoint_dir"] == str(tmp_path / "ck")
    (tmp_path / "hf_model").mkdir()
    [(_, _, params)] = runner.plan_runs([1], {"model": "hf:hf_model", "tokenizer": "hf_model"}, {})
    assert params["model"] == f"hf:{tmp_path / 'hf_model'}" and params["tokenizer"] == str(tmp_path / "hf_model")
    assert TrainConfig.from_params({"checkpoint_dir": "ck"}).checkpoint_dir == str(tmp_path / "ck")


def test_a_checkpoint_dir_that_is_a_file_is_named(tmp_path, capsys, monkeypatch, no_kernel):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    message = f"parameter 'checkpoint_dir': {str(tmp_path / 'f')!r} is a file; expected a folder (created when missing)"
    with pytest.raises(ParamError) as e:
        TrainConfig.from_params({"checkpoint_dir": "f", "checkpoint_every": 2})
    assert str(e.value) == message
    assert refused(["--tiers", "3", "-p", "checkpoint_dir=f"], tmp_path, capsys) == message


def test_no_evaluation_is_none_not_nan(tiny_gpt):
    r = test_fine_tuning(tiny_gpt, precision="32", steps=2, batch_size=2, seq_len=16, eval_batches=0, device="cpu")
    assert r.final_eval_loss is None and r.initial_eval_loss is None and r.summary()["final_eval_loss"] is None
    assert len(r.history) == 2


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_logits_narrower_than_the_token_ids_are_refused_in_the_run_never_a_pass(tier):
    params = {1: {"seq_len": 16, "latency_iters": 2, "batch_sizes": [1]}, 2: {"seq_len": 16},
              3: {"steps": 2, "batch_size": 2, "seq_len": 16, "trials": 1, "timed_steps": 1}}[tier]
    result = run_tier(tier, {**params, "device": "cpu"}, model=NarrowLogits())
    assert result.status == "fail" and list(result.checks) == ["supported"]
    found = re.fullmatch(r"parameter 'model' 'NarrowLogits': NarrowLogits returns 10 logits per position, but the data "
                         r"\(.+\) has token ids up to (\d+): a causal-lm's logits must score every token id \(expected a "
                         r"width of at least (\d+)\); check the model's output layer, or the tokenizer parameter",
                         result.verdicts[0].reason)
    assert found and int(found[2]) == int(found[1]) + 1 > 10


def test_a_nondeterministic_model_is_not_blamed_for_seeing_the_future():
    model = NoisyLM()
    probe_model(model)
    verdict = check_causality(model, seq_len=16).verdict
    assert verdict.status == "fail" and re.fullmatch(
        r"the same input, twice in eval mode, gave logits [0-9.e+-]+ apart: the model is nondeterministic \(dropout or "
        r"noise active in eval\(\)\?\), so whether it sees future tokens cannot be judged. Make eval\(\) deterministic.",
        verdict.reason)


def test_a_masked_lm_built_in_code_is_read_as_a_masked_lm_by_its_class():
    transformers = optional("transformers")
    config = transformers.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=70)
    model = transformers.RobertaForMaskedLM(config)
    assert probe_model(model, "auto") == "masked-lm"
    verdict = check_causality(model, seq_len=16).verdict
    assert verdict.status == "pass" and verdict.reason.startswith("not applicable: a masked-lm model")


# --- utils.train: every argument checked before a process group starts ------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--steps", "ten"], "parameter 'steps' expects an integer >= 1; got 'ten' (str)"),
    (["--parallel", "zero3"], "parameter 'parallel' expects a string in 'ddp', 'fsdp2'; got 'zero3' (str)"),
    (["--model", "nosuch-model"], "parameter 'model': 'nosuch-model' is not a model spec"),
    (["--precision", "fp8", "--device", "cpu"], "fp8 needs a CUDA GPU with float8 tensor cores"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--model", "tests.user_models:make_failing"], "factory 'tests.user_models:make_failing' raised RuntimeError: "
                                                    "weights file missing"),
])
def test_utils_train_says_one_line_and_exits_2(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "utils.train", *args, "--output-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"utils.train: error: {message}") and proc.stderr.count("\n") == 1


def test_utils_train_help_is_printed_by_rank_0_only():
    for rank, lines in (("0", True), ("1", False)):
        proc = subprocess.run([sys.executable, "-m", "utils.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "RANK": rank}, timeout=300)
        assert proc.returncode == 0 and bool(proc.stdout) is lines and proc.stderr == ""


@pytest.mark.slow
def test_under_torchrun_a_bad_argument_is_said_once_and_no_rank_trains(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "utils.train",
                           "--steps", "ten", "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("utils.train: error: parameter 'steps' expects an integer >= 1") == 1
    assert "exitcode  : 2" in proc.stdout + proc.stderr and not (tmp_path / "results.json").exists()


# --- stops from outside, and a hub that never answers ----------------------------------------------------------

TIER3 = ["--tiers", "3", "-p", f"model={ROOT}/tests/user_models.py:FaultOnce", "-p", "batch_size=4", "-p", "seq_len=32",
         "-p", "trials=1", "-p", "warmup_steps=1", "-p", "timed_steps=1", "-p", "steps=12", "-p", "device=cpu",
         "-p", "precision=bf16-mixed", "-p", "emulated_amp=full", "--name", "b"]  # speed trials on any CPU
PAUSE_STEP = 3  # FaultOnce's pause at training forward 9: after 6 speed-trial forwards, fp32 fine-tuning's step 3


def _descendants(pid: int) -> list:
    """The processes below `pid` (its notebook kernels), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _stop(how: str, runner: processes.Child):
    """Stop a runner paused at fine-tuning step PAUSE_STEP as `how` does; the second signal of a pair is sent after
    the runner said its first stop line (never by luck)."""
    pid, stop_line = runner.proc.pid, f"SIGTERM: {execution.STOP_LINE}\n"
    if how == "ctrl-c":  # a terminal's Ctrl-C, to the runner alone
        runner.proc.send_signal(signal.SIGINT)
    elif how == "timeout":  # GNU timeout: SIGTERM to the command, then to its process group
        runner.proc.send_signal(signal.SIGTERM)
        runner.wait_for_line("stderr", stop_line, 60)
        os.killpg(pid, signal.SIGTERM)
    elif how == "slurm":  # scancel, a time limit, systemd: SIGTERM to every process of the job at once
        for each in [*_descendants(pid), pid]:
            os.kill(each, signal.SIGTERM)
    elif how == "kernel":  # SIGTERM to the notebook's kernel alone
        kernels = runner.wait_for(lambda: _descendants(pid), 60, "the runner's kernel process")
        os.kill(kernels[0], signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("how, first, then", [("ctrl-c", "absolute", "relative"), ("timeout", "relative", "absolute"),
                                              ("slurm", "absolute", "absolute"), ("kernel", "relative", "relative")])
def test_a_stop_however_sent_checkpoints_records_interrupted_and_resume_continues(how, first, then, tmp_path):
    out = {"relative": "out", "absolute": str(tmp_path / "out")}
    env = {**os.environ, "SUITE_TEST_FAULT": f"pause:{6 + PAUSE_STEP}", "SUITE_TEST_MARK": str(tmp_path / "mark"),
           "PYTHONPATH": str(ROOT)}
    with processes.start([sys.executable, "-m", "utils.run", *TIER3, "--out", out[first]], cwd=tmp_path, env=env,
                         new_session=True) as runner:
        runner.wait_for((tmp_path / "mark").exists, 300, "the model's pause at fine-tuning step 3")
        _stop(how, runner)
        code, stdout, stderr = runner.finish(300)
    assert code == 1, stdout + stderr
    said = {"ctrl-c": f"SIGINT: {execution.STOP_LINE}\n", "kernel": ""}.get(how, f"SIGTERM: {execution.STOP_LINE}\n")
    assert stderr == said  # one line, or none where only the kernel was signalled
    batch = tmp_path / "out" / "b"
    row = pd.read_csv(batch / "summary.csv").iloc[0]
    assert row["run_status"] == "interrupted"
    assert f"the fp32 fine-tuning run was interrupted at step {PAUSE_STEP} of 12" in row["error"]
    kept = batch / "checkpoints" / row["run_id"] / "32"
    assert [p.name for p in kept.iterdir()] == [f"step_{PAUSE_STEP:08d}.pt"]
    assert not (batch / ".lock").exists() and not list(batch.glob(".tier3*"))

    resumed = subprocess.run([sys.executable, "-m", "utils.run", *TIER3, "--out", out[then], "--resume"], cwd=tmp_path,
                             env={k: v for k, v in env.items() if k != "SUITE_TEST_FAULT"}, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    results = read_json(batch / row["run_id"] / "results.json")
    assert results["extra"]["amp_safe"]["checkpoints"]["32"]["resumed_from"].endswith(f"step_{PAUSE_STEP:08d}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("args, where, error", [
    (TINY1, "tier 1's checks", f"{execution.KERNEL_STOP} stopped it before it wrote its results (--resume runs it again)"),
    (TIER3, "tier 3's speed trials",  # timed with the loop, which stops as in training
     "a fp32 speed trial was interrupted at step 1 of 2 (no checkpoint_dir, so nothing was saved to resume from)"),
])
def test_sigterm_to_a_kernel_outside_fine_tuning_is_recorded_interrupted_never_crashed(args, where, error, tmp_path):
    env = {**os.environ, "SUITE_TEST_FAULT": "pause:1", "SUITE_TEST_MARK": str(tmp_path / "mark"), "PYTHONPATH": str(ROOT)}
    model = [] if "model" in " ".join(args) else ["-p", f"model={ROOT}/tests/user_models.py:FaultOnce"]
    with processes.start([sys.executable, "-m", "utils.run", *args, *model, "--out", "out", "--name", "b"], cwd=tmp_path,
                         env=env, new_session=True) as runner:
        runner.wait_for((tmp_path / "mark").exists, 300, f"the model's pause in {where}")
        os.kill(_descendants(runner.proc.pid)[0], signal.SIGTERM)
        code, stdout, stderr = runner.finish(300)
    assert code == 1 and stderr == "", stdout + stderr
    row = pd.read_csv(tmp_path / "out" / "b" / "summary.csv").iloc[0]
    assert row["run_status"] == "interrupted", row["error"]
    assert row["error"] == error


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_the_runners_stop_comes_once_however_often_it_is_sent_together(signum, capfd, monkeypatch):
    """Any stop signal (SIGHUP: a closed terminal) is one line and one stop; the same stop sent again at once (GNU
    timeout's second SIGTERM, a bounced key) is nothing more; only a later, separate one stops at once."""
    monkeypatch.setattr(stops, "STOP_WINDOW_S", float("inf"))  # however slowly this machine sends the second
    with execution.stops_passed_to_notebooks():
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signal.SIGTERM)
        assert execution.stop_reason() == signum.name
        monkeypatch.setattr(stops, "STOP_WINDOW_S", -1.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert capfd.readouterr().err == f"{signum.name}: {execution.STOP_LINE}\n" and not execution.stop_reason()


HUNG_UP = """
import sys, time
from utils.runner import execute
with execute.stops_passed_to_notebooks():
    print("ready", flush=True)
    while not execute.stop_reason():  # until the terminal hangs up (signal.pause() would miss a hang-up before it)
        time.sleep(0.01)
    for _ in range(100):  # a batch goes on logging its runs' ends to the closed terminal
        print("a run ended", flush=True)
    with open(sys.argv[1], "w") as f:
        f.write(execute.stop_reason())
"""


def test_a_closed_terminal_is_a_stop_and_printing_after_it_ends_nothing(tmp_path):
    """SIGHUP (an SSH drop, a closed terminal) is a stop like Ctrl-C, and the batch goes on to record its runs: writes
    to the hung-up terminal (EIO) go nowhere instead of ending it."""
    terminal, its_end = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", HUNG_UP, str(tmp_path / "stops")], cwd=ROOT, stdin=its_end,
                            stdout=its_end, stderr=its_end, start_new_session=True,  # the terminal is its own:
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # it gets the hang-up
    os.close(its_end)
    said = b""
    while b"ready" not in said:
        chunk = os.read(terminal, 1024)
        assert chunk, f"the child closed its terminal first: {said!r}"
        said += chunk
    os.close(terminal)  # the terminal hangs up: SIGHUP to the session's leader
    assert proc.wait(60) == 0
    assert (tmp_path / "stops").read_text() == "SIGHUP"


def test_under_nohup_a_hang_up_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with execution.stops_passed_to_notebooks():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_factory_that_raises_keyboardinterrupt_is_one_line_naming_it(tmp_path, capsys):
    assert main([*TINY1, "-p", "model=tests.user_models:raises_keyboard_interrupt", "--out", str(tmp_path)]) == 1
    row = pd.read_csv(tmp_path / "default" / "summary.csv").iloc[0]
    assert row["run_status"] == "interrupted"
    assert row["error"] == f"{execution.KERNEL_STOP} stopped it before it wrote its results (--resume runs it again)"
    assert "Traceback" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_second_signal_a_second_later_stops_at_once_and_the_next_run_clears_what_it_left(tmp_path):
    env = {**os.environ, "SUITE_TEST_FAULT": f"pause:{6 + PAUSE_STEP}", "SUITE_TEST_MARK": str(tmp_path / "mark"),
           "PYTHONPATH": str(ROOT)}
    with processes.start([sys.executable, "-m", "utils.run", *TIER3, "--out", "out"], cwd=tmp_path, env=env) as runner:
        runner.wait_for((tmp_path / "mark").exists, 300, "the model's pause at fine-tuning step 3")
        runner.proc.send_signal(signal.SIGTERM)
        runner.wait_for_line("stderr", "SIGTERM: ", 60)
        time.sleep(1)  # the one sleep that is the point: a separate, later stop (the model's pause holds the step)
        runner.proc.send_signal(signal.SIGINT)
        code, stdout, stderr = runner.finish(300)
    batch = tmp_path / "out" / "b"
    left = [p.name for p in batch.glob(".tier3*")]
    assert code == 130, stdout + stderr
    assert len(left) == 1 and stderr.splitlines()[-1] == (
        "stopped at once: the running notebooks did not finish; finished runs are kept, --resume runs the rest; the next "
        f"run into {batch} removes their temporary folder(s) {left[0]}") and "Traceback" not in stderr
    assert not (batch / ".lock").exists()
    resumed = subprocess.run([sys.executable, "-m", "utils.run", *TIER3, "--out", "out", "--resume"], cwd=tmp_path,
                             env={k: v for k, v in env.items() if k != "SUITE_TEST_FAULT"}, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not list(batch.glob(".tier3*"))


class _SilentHub:
    """An endpoint on 127.0.0.1 that accepts connections and never answers: a network that hangs."""

    def __enter__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.server.accept()[0])

    def __exit__(self, *exc):
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.mark.slow
def test_hf_with_a_hub_that_never_answers_is_refused_and_recorded_crashed_not_timed_out(tmp_path, monkeypatch, capsys):
    """A real silent endpoint, end to end: the run is refused with the hub's reason before the runner's limit. How
    long the hub may hold it (seconds) is the next test's."""
    optional("transformers")
    with _SilentHub() as endpoint:
        for name, value in {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}.items():
            monkeypatch.setenv(name, value)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        assert main([*TINY1, "-p", "model=hf:gpt2", "--out", str(tmp_path), "--timeout", "90"]) == 1
    row = pd.read_csv(tmp_path / "default" / "summary.csv").iloc[0]
    assert row["run_status"] == "crashed"  # not 'timeout': it did not wait for the runner's limit
    assert re.fullmatch(f"ModelLoadError: cannot download hf:gpt2: {endpoint} did not answer within 5 s \\(.+\\) and the "
                        "model is not in the local cache; connect to the network, or give a local folder "
                        "\\(hf:path/to/model\\)", row["error"]), row["error"]
    print(f"refused in {row['duration_s']} s")


def test_a_silent_hub_holds_hf_for_5_s_and_a_hung_lookup_for_one_more(monkeypatch):
    """What bounds the wait on a hub that does not answer, without timing it: the hub is asked with a 5 s timeout (on
    connecting and on each read), and a request that never returns (a name lookup, which no socket timeout bounds) is
    abandoned HUB_TIMEOUT_S + 1 s later; the refusal names the 5 s and the reason."""
    hub_utils, hub = optional("huggingface_hub.utils"), optional("huggingface_hub.constants")
    asked, hang, release = [], threading.Event(), threading.Event()

    class Session:
        def head(self, url, timeout=None):
            asked.append((url, timeout))
            if hang.is_set():
                release.wait(30)  # does not return while the test waits: only the join's bound ends the wait
            raise TimeoutError("timed out")

    monkeypatch.setattr(hub_utils, "get_session", Session)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    model_loading._hub_access.cache_clear()
    try:
        with pytest.raises(ModelLoadError) as refused:
            model_loading._hub_access("suite-test/never-cached")
    finally:
        model_loading._hub_access.cache_clear()
    assert asked == [(f"{hub.ENDPOINT}/api/models/suite-test/never-cached", 5)] and model_loading.HUB_TIMEOUT_S == 5
    assert str(refused.value).startswith("cannot download hf:suite-test/never-cached: "
                                         f"{hub.ENDPOINT} did not answer within 5 s (TimeoutError: timed out)")
    hang.set()
    monkeypatch.setattr(model_loading, "HUB_TIMEOUT_S", 0.1)  # the bound is HUB_TIMEOUT_S + 1: 1.1 s here
    try:
        assert model_loading._hub_silence("http://hub.invalid/api/models/x") == "no answer, not even a name lookup"
    finally:
        release.set()  # the abandoned request's thread ends
