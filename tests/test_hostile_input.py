"""Hostile input to the batch runner's parameters, grid files, names and lock: each is read as its parameter's type
or refused in one short line that names what was given and what is expected, before any kernel starts or any
grid is expanded."""

import argparse
import contextlib
import json
import os
import socket
import threading

import pytest

from tests.packages import optional
from tests.test_hostile import TINY1, refused
from utils import models
from utils import run as runner
from utils.params import SHOWN_CHARS, TIER_PARAMS, TRAIN_PARAMS, add_arguments, shown
from utils.runner import execute as execution
from utils.runner import lock


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """Any notebook started fails the test: hostile input must be answered before a kernel starts."""
    def started(*args, **kwargs):
        raise AssertionError("a notebook ran")
    monkeypatch.setattr(execution, "run_notebook", started)


def grid_file(tmp_path, text: str):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    return grid


def grid_refused(text: str, tmp_path, capsys) -> str:
    """The one line a grid file of `text` is refused with, less its 'grid file NAME: ' prefix."""
    grid = grid_file(tmp_path, text)
    return refused([*TINY1, "--grid", str(grid)], tmp_path, capsys).removeprefix(f"grid file {str(grid)!r}: ")


# --- 1. each value read as its parameter's type ---------------------------------------------------------------------

def test_a_string_parameter_takes_its_text_and_the_others_parse_as_data(tmp_path, capsys):
    [(_, _, params)] = runner.plan_runs([3], runner.parse_assignments(["precision=32"]), {})
    assert params == {"precision": "32"}  # was the int 32, refused: "expects a string ... got 32 (int)"
    assert runner.main(["--tiers", "3", "-p", "precision=32", "--dry-run"]) == 0
    assert "tier3_training.ipynb {'precision': '32'}" in capsys.readouterr().out
    assert runner.parse_assignments(["steps=10", "lr=1e-3", "batch_sizes=[1, 2]", "compile=True", "model= gpt-small "]) \
        == {"steps": 10, "lr": 1e-3, "batch_sizes": [1, 2], "compile": True, "model": "gpt-small"}
    train = argparse.ArgumentParser()
    add_arguments(train, TRAIN_PARAMS)  # utils.train's and the benchmark's options read values the same way
    options = train.parse_args(["--precision", "32", "--steps", "10"])
    assert (options.precision, options.steps) == ("32", 10)


def test_a_grid_keeps_a_string_for_a_string_parameter_and_takes_an_integer_as_its_text(tmp_path):
    for text, precisions in (('precision: ["32", "16-mixed"]\n', ["32", "16-mixed"]),
                             ('precision: ["16"]\n', ["16"]), ("precision: [32, 16-mixed]\n", ["32", "16-mixed"])):
        runs = runner.plan_runs([3], {}, runner.read_grid(grid_file(tmp_path, text)))
        assert [params["precision"] for _, _, params in runs] == precisions
    runs = runner.plan_runs([3], {}, runner.read_grid(grid_file(tmp_path, "lr: [1e-3]\nsweep_batch_sizes: ['[1, 2]']\n")))
    assert runs[0][2] == {"lr": 0.001, "sweep_batch_sizes": [1, 2]}  # YAML reads 1e-3 as text: a number parameter parses it


def test_every_tier_gives_a_parameter_name_one_type():
    """The runner reads a value by its name alone, before the tiers are chosen (utils.run._typed)."""
    types = {}
    for params in TIER_PARAMS.values():
        for p in params:
            types.setdefault(p.name, set()).add(p.type)
    assert {name: kinds for name, kinds in types.items() if len(kinds) > 1} == {}


# --- 2. a parameter given twice, or by -p and by the grid -------------------------------------------------------------

def test_a_parameter_given_twice_by_p_is_refused_with_both_values(tmp_path, capsys):
    assert refused(["--tiers", "1", "-p", "seed=1", "-p", "seed=2"], tmp_path, capsys) == \
        "parameter 'seed' is given twice (-p 'seed=1' and -p 'seed=2'); expected each once"


def test_a_parameter_given_by_p_and_by_the_grid_is_refused(tmp_path, capsys):
    grid = grid_file(tmp_path, "seed: [1, 2]\n")
    assert refused(["--tiers", "1", "-p", "seed=7", "--grid", str(grid)], tmp_path, capsys) == \
        "parameter 'seed' is given both by -p (7) and by the grid ([1, 2]); expected it once, in one of them"


# --- 3. a grid file's size, aliases and nesting, before it is expanded --------------------------------------------------

def test_a_grid_file_too_large_is_refused_before_it_is_read(tmp_path, capsys, monkeypatch):
    def parsed(*args, **kwargs):
        raise AssertionError("the grid was read")
    monkeypatch.setattr(runner.yaml, "load", parsed)
    grid = grid_file(tmp_path, "seed: [1]\n" + "#" * runner.MAX_GRID_BYTES)
    assert refused([*TINY1, "--grid", str(grid)], tmp_path, capsys) == \
        f"grid file {str(grid)!r} is 262,154 bytes; expected at most 262,144 (a grid of names and lists fits in a few KiB)"


def test_yaml_aliases_are_refused_before_they_expand(tmp_path, capsys):
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
    text = "model_kwargs:\n" + "".join(f"  {line}" for line in laughs.splitlines(keepends=True))
    assert len(text) < 600  # 9^9 = 387 million strings, had it been expanded
    assert grid_refused(text, tmp_path, capsys) == \
        "alias '*a' at line 3 repeats a value by reference; expected every value written out (a grid takes no aliases)"


@pytest.mark.parametrize("nested", [
    "model_kwargs: " + "[" * 10000 + "]" * 10000,
    "model_kwargs: " + "{a: " * 20000 + "1" + "}" * 20000,
])
def test_a_grid_nested_thousands_deep_is_one_line(nested, tmp_path, capsys):
    assert grid_refused(nested + "\n", tmp_path, capsys) == \
        "lists and mappings nested more than 20 deep at line 1; expected at most 20 levels"


def test_a_grid_as_deep_as_the_limit_is_read(tmp_path):
    depth = runner.MAX_GRID_DEPTH - 1  # the grid's own mapping is the first level
    grid = runner.read_grid(grid_file(tmp_path, "model_kwargs: " + "[" * depth + "]" * depth + "\n"))
    assert grid["model_kwargs"] == eval("[" * depth + "]" * depth)
    with pytest.raises(runner.UsageError, match="nested more than 20 deep"):
        runner.read_grid(grid_file(tmp_path, "model_kwargs: " + "[" * (depth + 1) + "]" * (depth + 1) + "\n"))


def test_a_p_value_nested_thousands_deep_is_one_line(tmp_path, capsys):
    nested = "[" * 5000 + "]" * 5000  # deeper than Python's parser reads: the text itself, refused by type
    assert refused([*TINY1, "-p", f"model_kwargs={nested}"], tmp_path, capsys) == \
        f"parameter 'model_kwargs' expects a mapping of names to JSON values; got '{'[' * (SHOWN_CHARS - 1)}... " \
        "(10,000 characters) (str)"


def test_an_integer_longer_than_python_reads_is_one_line(tmp_path, capsys):
    assert grid_refused("seed: [" + "9" * 5000 + "]\n", tmp_path, capsys) == \
        f"integer '{'9' * (SHOWN_CHARS - 1)}... (5,000 characters) at line 1 has more than 4,300 digits; expected a " \
        "parameter's value"
    hexadecimal = "0x" + "f" * 5000  # read, but too long to print
    assert grid_refused(f"seed: [{hexadecimal}]\n", tmp_path, capsys) == \
        "parameter 'seed' expects an integer from 0 to 4294967295; got an integer of more than 4,300 digits (int)"
    assert refused([*TINY1, "-p", f"model_kwargs={{'n_layer': {hexadecimal}}}"], tmp_path, capsys) == \
        "parameter 'model_kwargs' expects a mapping of names to JSON values; got a dict holding an integer of more " \
        "than 4,300 digits (dict)"


# --- 4. a key that is a list or a mapping -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("? [a, b]\n: 1\n", "key ['a', 'b'] at line 1 is a list; expected a parameter name (or, inside a value, a field name)"),
    ("? {a: 1}\n: 2\n", "key {'a': 1} at line 1 is a mapping; expected a parameter name (or, inside a value, a field name)"),
    ("model_kwargs: [{[1]: 2}]\n", "key [1] at line 1 is a list; expected a parameter name (or, inside a value, a field "
                                   "name)"),
])
def test_a_key_that_is_a_list_or_a_mapping_is_named(text, message, tmp_path, capsys):
    assert grid_refused(text, tmp_path, capsys) == message


# --- 5. names the OS cannot take ---------------------------------------------------------------------------------------

def test_a_name_longer_than_a_folder_name_may_be_is_refused(tmp_path, capsys):
    assert refused([*TINY1, "--name", "n" * 300], tmp_path, capsys) == \
        f"--name '{'n' * (SHOWN_CHARS - 1)}... (300 characters) is 300 bytes long; expected a folder name of at most 128"


def test_a_run_id_of_many_axes_is_cut_and_keeps_its_digest():
    long = 123456789012345678901234567890
    grid = {name: [long] for name in ("steps", "batch_size", "seq_len", "trials", "warmup_steps", "timed_steps",
                                      "remedy_runs", "checkpoint_every")}
    grid.update(lr=[0.00123456789012345], parity_tolerance=[0.0123456789012345], max_skipped_fraction=[0.0123456789])
    [(run_id, tier, params)] = runner.plan_runs([3], {}, grid)
    assert len(run_id) == runner.MAX_FOLDER_NAME  # uncut, 341 characters: more than the OS's 255-byte folder name
    assert run_id.startswith("tier3_steps-123456789012345678901234_") and run_id.endswith(f"_{execution.run_digest(tier, params)}")


# --- 6. a grid file that is not a regular file --------------------------------------------------------------------------

def test_a_grid_that_is_a_device_or_a_pipe_is_named_so(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for path in ("/dev/null", str(pipe)):
        assert refused([*TINY1, "--grid", path], tmp_path, capsys) == \
            f"grid file {path!r} is not a regular file (a device, a pipe or a socket); expected a YAML file"


# --- 7. lock records that name no valid pid -------------------------------------------------------------------------

@pytest.fixture
def quick_heartbeat(monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.1)


@pytest.mark.parametrize("record", [
    {"host": socket.gethostname(), "machine": lock.machine(), "pid": "abc"},
    {"host": socket.gethostname(), "machine": lock.machine(), "pid": 99999999999999},
    {"host": socket.gethostname(), "machine": lock.machine()},
    "abc", "99999999999999",
])
def test_a_lock_naming_no_valid_pid_is_taken_over_once_its_heartbeat_stopped(record, tmp_path, quick_heartbeat):
    (tmp_path / ".lock").write_text(record if isinstance(record, str) else json.dumps(record))
    with lock.batch_lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


@contextlib.contextmanager
def beating(path):
    """Another runner's heartbeat on `path`, while the block runs."""
    stop = threading.Event()
    beater = threading.Thread(target=lambda: [os.utime(path) for _ in iter(lambda: stop.wait(0.02), True)])
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()


@pytest.mark.parametrize("host, named", [(socket.gethostname(), socket.gethostname()),
                                         ("h" * 300, f"'{'h' * (SHOWN_CHARS - 1)}... (300 characters)")])
def test_a_live_lock_naming_no_pid_is_not_taken_over(host, named, tmp_path, quick_heartbeat):
    (tmp_path / ".lock").write_text(json.dumps({"host": host, "machine": lock.machine()}))
    with beating(tmp_path / ".lock"), pytest.raises(runner.UsageError) as e:
        with lock.batch_lock(tmp_path):
            pass
    assert str(e.value) == f"another runner (pid ? on {named}) is writing {tmp_path}; wait for it to finish, or use " \
                           "another --name"


# --- 8. a huge value, shortened in every message --------------------------------------------------------------------

def test_a_huge_value_is_shortened_in_the_message(tmp_path, capsys):
    assert shown("x" * 10_000_000) == f"'{'x' * (SHOWN_CHARS - 1)}... (10,000,000 characters)"
    assert shown([1, 2]) == "[1, 2]"
    assert refused([*TINY1, "-p", "device=" + "d" * 10_000], tmp_path, capsys) == \
        f"parameter 'device': expects 'auto', 'cpu', 'cuda' or 'cuda:N'; got '{'d' * (SHOWN_CHARS - 1)}... " \
        "(10,000 characters)"
    assert refused([*TINY1, "-p", "seed=" + "9" * 5000], tmp_path, capsys) == \
        f"parameter 'seed' expects an integer from 0 to 4294967295; got '{'9' * (SHOWN_CHARS - 1)}... (5,000 characters) " \
        "(str)"
    assert grid_refused("model: ['" + "m" * 200_000 + "']\n", tmp_path, capsys) == \
        f"parameter 'model': '{'m' * (SHOWN_CHARS - 1)}... (200,000 characters) is not a model spec; expected " \
        f"{models.SPEC_FORMS}"


# --- 9. a tokenizer that cannot be downloaded -----------------------------------------------------------------------

def test_a_tokenizer_that_cannot_be_downloaded_is_told_the_tokenizer_form(monkeypatch):
    optional("transformers")
    from huggingface_hub import constants  # transformers' own dependency: present with it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_silence", lambda url: "ConnectError: no network")
    with pytest.raises(models.ModelLoadError) as e:
        models.load_tokenizer("nosuch/tok")
    assert str(e.value) == f"cannot download tokenizer 'nosuch/tok': {constants.ENDPOINT} did not answer within 5 s " \
                           "(ConnectError: no network) and the tokenizer is not in the local cache; connect to the " \
                           "network, or give a local folder (tokenizer=path/to/folder, saved with save_pretrained)"
    with pytest.raises(models.ModelLoadError) as e:
        models._hub_access("nosuch/model")
    assert str(e.value).endswith("and the model is not in the local cache; connect to the network, or give a local "
                                 "folder (hf:path/to/model)")
