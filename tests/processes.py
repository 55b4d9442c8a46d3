"""Child processes in tests, and waits that fail. A child's stdout and stderr are drained by threads as it writes them
(an unread pipe fills at 64 KiB and blocks the child until the test's deadline), and every wait has a deadline that
fails the test with what the child said so far: a test never acts (signals, asserts) on a state that never came."""

import contextlib
import os
import signal
import subprocess
import threading
import time

import pytest

POLL_S = 0.05  # how often a condition with no event of its own (a file appearing) is looked at again


def wait_for(condition, deadline_s: float, what: str, says=lambda: "", ended=lambda: None):
    """Returns condition()'s first true value; fails the test when `deadline_s` seconds pass first, or when `ended()`
    says why the thing awaited can no longer come (a child that exited). `says()` adds what was seen so far."""
    end = time.monotonic() + deadline_s
    while True:
        gone = ended()  # asked before the condition: a child that wrote its mark and then exited still passes
        value = condition()
        if value:
            return value
        if gone or time.monotonic() > end:
            pytest.fail(f"waited for {what}: {gone or f'not there within {deadline_s} s'}{says()}", pytrace=False)
        time.sleep(POLL_S)


class Child:
    """A process started by start(): .proc, its output so far, waits that fail, and finish()."""

    def __init__(self, proc: subprocess.Popen, new_session: bool):
        self.proc, self.new_session = proc, new_session
        self.lines = {"stdout": [], "stderr": []}
        self.changed, self.closed = threading.Condition(), set()
        self.readers = [threading.Thread(target=self._drain, args=(name,), daemon=True) for name in self.lines]
        for reader in self.readers:
            reader.start()

    def _drain(self, name: str):
        for line in getattr(self.proc, name):
            with self.changed:
                self.lines[name].append(line)
                self.changed.notify_all()
        with self.changed:  # its end: no more lines will come
            self.closed.add(name)
            self.changed.notify_all()

    def stdout_text(self) -> str:
        with self.changed:
            return "".join(self.lines["stdout"])

    def stderr_text(self) -> str:
        with self.changed:
            return "".join(self.lines["stderr"])

    def says(self) -> str:
        return f"\n--- its stdout so far:\n{self.stdout_text()}\n--- its stderr so far:\n{self.stderr_text()}"

    def _exited(self):
        code = self.proc.poll()
        return None if code is None else f"the child exited ({code}) first"

    def wait_for(self, condition, deadline_s: float, what: str):
        """wait_for above, also failing when the child exits before `condition()` holds; the child is killed then."""
        try:
            return wait_for(condition, deadline_s, what, self.says, self._exited)
        except pytest.fail.Exception:
            self.kill()
            raise

    def wait_for_line(self, stream: str, match, deadline_s: float) -> str:
        """The first line of `stream` ('stdout' or 'stderr') that `match` accepts (a predicate, or a prefix), as soon
        as the child has written it: a test can act at once on a line (the second SIGTERM of GNU timeout, right after
        the runner said it took the first)."""
        accept = match if callable(match) else (lambda line: line.startswith(match))
        end = time.monotonic() + deadline_s
        with self.changed:
            while True:
                found = next((line for line in self.lines[stream] if accept(line)), None)
                if found is not None:
                    return found
                left = end - time.monotonic()
                if left <= 0 or stream in self.closed:
                    break
                self.changed.wait(left)  # woken by each line the child writes
        self.kill()
        pytest.fail(f"no line of its {stream} matched {match!r} within {deadline_s} s, or it closed {stream} first"
                    f"{self.says()}", pytrace=False)

    def finish(self, timeout: float) -> tuple:
        """(returncode, stdout, stderr) once the child exits; the test fails (and the child is killed) after
        `timeout` seconds."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the child did not exit within {timeout} s{self.says()}", pytrace=False)
        for reader in self.readers:  # the rest of its output (a grandchild holding the pipe open is not awaited long)
            reader.join(10)
        return self.proc.returncode, self.stdout_text(), self.stderr_text()

    def kill(self):
        """SIGKILL to the child (and its process group when it has its own session); reaped."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may end between the poll and the signal
                if self.new_session:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
            self.proc.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()  # a test that failed midway leaves no child running


def start(cmd: list, cwd=None, env: dict = None, new_session: bool = False) -> Child:
    """`cmd` started with text pipes drained as it writes them; use as `with start(...) as child:`."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=new_session)
    return Child(proc, new_session)
