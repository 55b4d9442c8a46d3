"""The tests' own helpers: an optional package skips only where it is absent (tests/packages.py), and a child's
output is drained while a test waits on it, each wait failing the test at its deadline (tests/processes.py)."""

import sys

import pytest

from tests.packages import optional
from tests.processes import start, wait_for


@pytest.fixture
def planted_packages(tmp_path, monkeypatch):
    """A folder on sys.path to plant packages in; what they import is forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.mark.parametrize("body", ['raise ImportError("cannot import name \'gone\' from \'torch\'")',
                                  "import no_such_dependency_of_it",
                                  "import broken_pkg.no_such_submodule_of_its_own"])
def test_an_installed_package_that_breaks_on_import_fails_and_is_not_skipped(planted_packages, body):
    (planted_packages / "broken_pkg").mkdir()
    (planted_packages / "broken_pkg" / "__init__.py").write_text(body + "\n")
    if "no_such_dependency" in body:
        with pytest.raises(pytest.skip.Exception):  # the control: importorskip skips it silently (any pytest version)
            pytest.importorskip("broken_pkg")
    try:
        optional("broken_pkg")
        outcome = "imported"
    except (pytest.skip.Exception, pytest.fail.Exception) as e:  # a skip is caught too: it must fail this test
        outcome = f"{type(e).__name__}: {e}"
    assert outcome.startswith("Failed: broken_pkg is installed but does not import: "), outcome


def test_an_absent_package_is_skipped_and_a_present_one_returned(planted_packages):
    with pytest.raises(pytest.skip.Exception, match="no_such_pkg is not installed"):
        optional("no_such_pkg")
    with pytest.raises(pytest.skip.Exception, match="no_such_pkg.sub is not installed"):
        optional("no_such_pkg.sub")  # as lightning.pytorch without lightning
    (planted_packages / "fine_pkg.py").write_text("VALUE = 7\n")
    assert optional("fine_pkg").VALUE == 7


CHILD = [sys.executable, "-c"]


def test_a_child_that_writes_more_than_a_pipe_holds_is_not_blocked(tmp_path):
    """1 MiB on each pipe before the mark: an undrained pipe (64 KiB) would hold the child until the deadline."""
    mark = tmp_path / "mark"
    code = f"import sys; sys.stdout.write('o' * 2**20); sys.stderr.write('e' * 2**20); open({str(mark)!r}, 'w').close()"
    with start([*CHILD, code]) as child:
        child.wait_for(mark.exists, 60, "the mark")
        returncode, stdout, stderr = child.finish(60)
    assert returncode == 0 and len(stdout) == len(stderr) == 2**20


def test_a_wait_fails_with_the_childs_output_when_the_child_exits_first():
    with start([*CHILD, "print('it said this'); raise SystemExit(3)"]) as child:
        with pytest.raises(pytest.fail.Exception, match="(?s)waited for a mark: the child exited \\(3\\) first.*it said this"):
            child.wait_for(lambda: False, 60, "a mark")


def test_a_wait_fails_at_its_deadline_and_the_child_is_killed():
    with start([*CHILD, "import time; print('waiting', flush=True); time.sleep(600)"]) as child:
        child.wait_for_line("stdout", "waiting", 60)
        with pytest.raises(pytest.fail.Exception, match="waited for a mark that never comes: not there within 0.1 s"):
            child.wait_for(lambda: False, 0.1, "a mark that never comes")
        assert child.proc.poll() is not None  # killed: a failed test leaves no child running
    with pytest.raises(pytest.fail.Exception, match="waited for a heartbeat: not there within 0.1 s"):
        wait_for(lambda: False, 0.1, "a heartbeat")


def test_a_line_is_seen_while_the_child_runs_and_a_missing_one_fails():
    code = "import sys, time; print('SIGINT: stopping', file=sys.stderr, flush=True); time.sleep(600)"
    with start([*CHILD, code], new_session=True) as child:
        assert child.wait_for_line("stderr", "SIGINT:", 60) == "SIGINT: stopping\n"
        assert child.wait_for_line("stderr", lambda line: "stopping" in line, 60) == "SIGINT: stopping\n"
        assert child.proc.poll() is None  # seen as it was written, not once the child ended
        with pytest.raises(pytest.fail.Exception, match="(?s)no line of its stdout matched 'done'.*SIGINT: stopping"):
            child.wait_for_line("stdout", "done", 0.1)
        assert child.proc.poll() is not None
