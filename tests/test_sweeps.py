"""Sweeps beyond one notebook at a time: --jobs N on this machine, Ray (a local one, and a cluster of two nodes
simulated here), the executor seam between them, kernel starts that fail, and the lock on a shared folder.
Each engine runs a notebook the same way (utils.runner.execute), so each must give the same runs and numbers."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pandas as pd
import pytest

from tests.packages import optional
from tests.processes import start, wait_for
from utils import run, tiers
from utils.params import SHARED_MACHINE_ENV
from utils.plotting import plot_sweep, sweep_labels
from utils.run import main
from utils.runner import Job, UsageError, local, lock
from utils.runner.local import LocalExecutor
from utils.verdicts import CheckResult, TierResult, Verdict

# Ray binds its nodes to the machine's address unless told it is one machine: the simulated cluster stays on
# 127.0.0.1 (read when Ray is imported, so set before any test imports it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parents[1]
TINY1 = ["-p", "seq_len=16", "-p", "latency_iters=3", "-p", "batch_sizes=[1]", "-p", "device=cpu"]
TINY3 = ["-p", "model=gpt-tiny", "-p", "steps=4", "-p", "seq_len=32", "-p", "trials=1", "-p", "warmup_steps=1",
         "-p", "timed_steps=1", "-p", "batch_size=2", "-p", "precision=bf16-mixed", "-p", "remedy_runs=0"]


def grid(tmp_path: Path, text: str) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return str(path)


def summary(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name / "summary.csv")


# --- the local engine's pool, without notebooks ---------------------------------------------------------------------

class HeldRuns:
    """local.execute faked: each run records what its kernel would be given, then holds until the test releases it.
    The test sees which runs the engine has going at once by events, whatever the machine's speed."""

    def __init__(self):
        self.entered, self.released, self.changed = {}, set(), threading.Condition()

    def execute(self, run_id, tier, params, out_dir, progress, timeout, env, where):
        with self.changed:
            self.entered[run_id] = {"device": params["device"], "gpu": env.get("CUDA_VISIBLE_DEVICES"), "env": env,
                                    "where": where}
            self.changed.notify_all()
            if not self.changed.wait_for(lambda: run_id in self.released, timeout=60):
                raise AssertionError(f"{run_id} was never released")  # its row says crashed: the test fails
        return {"run_id": run_id, "run_status": "ok", "verdict": "pass", "timing_failed": False}

    def started(self, engine, done: list) -> list:
        """The runs going once the engine has started what it may (a collect), each seen inside execute."""
        done += engine.collect(0)
        running = list(engine.running)
        wait_for(lambda: set(running) <= set(self.entered), 30, f"runs {running} inside execute")
        return running

    def release(self, engine, run_id: str, done: list):
        """`run_id` let finish, and collected: its slot (and GPU) is free for the next started()."""
        with self.changed:
            self.released.add(run_id)
            self.changed.notify_all()
        wait_for(lambda: done.extend(engine.collect(0.05)) or run_id not in engine.running, 30, f"{run_id} collected")


def test_each_gpu_run_holds_its_own_gpu_and_the_cores_are_split(monkeypatch, tmp_path):
    """Six runs, up to three at once, on a machine of two GPUs and 7 cores: a run that computes on a GPU never shares
    one (a third waits for one), a CPU run takes none, and without --threads each kernel is given 7 // 3 = 2 threads."""
    held = HeldRuns()
    monkeypatch.setattr(local, "execute", held.execute)
    monkeypatch.setattr(local, "cpu_count", lambda: 7)
    engine = LocalExecutor(jobs=3, gpus=["0", "1"])  # no threads given: the engine splits the cores
    devices = ["auto", "cuda", "auto", "cpu", "auto", "cuda"]
    for i, device in enumerate(devices):
        engine.submit(Job(i, f"r{i}", 1, {"device": device}, tmp_path))
    done, at_once = [], []
    while engine.busy:  # the oldest run released each time: the others hold their GPUs meanwhile
        at_once.append(held.started(engine, done))
        on_gpus = [held.entered[r]["gpu"] for r in at_once[-1] if held.entered[r]["device"] != "cpu"]
        assert len(on_gpus) == len(set(on_gpus)), f"two runs at once on one GPU: {at_once[-1]}"
        held.release(engine, at_once[-1][0], done)
    assert sorted(job.index for job, _ in done) == list(range(len(devices))) and all(r["run_status"] == "ok" for _, r in done)
    assert at_once[0][:2] == ["r0", "r1"] and "r2" not in at_once[0]  # both GPUs held: the third GPU run waits
    assert max(map(len, at_once)) == 3  # and the engine does run three at once
    seen = held.entered.values()
    assert all(s["env"]["OMP_NUM_THREADS"] == s["env"]["MKL_NUM_THREADS"] == "2" and s["where"]["threads"] == 2 for s in seen)
    assert [s["gpu"] for s in seen if s["device"] == "cpu"] == [None]
    gpu_runs = [s for s in seen if s["device"] != "cpu"]
    assert {s["gpu"] for s in gpu_runs} == {"0", "1"} and all(s["where"]["cuda_visible_devices"] == s["gpu"] for s in gpu_runs)
    assert engine.shared == "up to 3 runs at once on this machine (--jobs 3), 2 CPU thread(s) each"


def test_a_run_that_names_its_gpu_waits_for_that_one_and_sees_them_all(monkeypatch, tmp_path):
    """On CUDA_VISIBLE_DEVICES=4,5 a run of device cuda:1 waits for GPU 5 while GPU 4 is free, and its kernel sees both
    GPUs (its index must stay valid); a run of 'auto' sees only the GPU it was given."""
    held = HeldRuns()
    monkeypatch.setattr(local, "execute", held.execute)
    engine = LocalExecutor(jobs=3, threads=1, gpus=["4", "5"])
    for i, (run_id, device) in enumerate([("a", "auto"), ("b", "auto"), ("named", "cuda:1")]):
        engine.submit(Job(i, run_id, 1, {"device": device}, tmp_path))
    done = []
    assert held.started(engine, done) == ["a", "b"]  # a holds GPU 4, b GPU 5
    held.release(engine, "a", done)
    assert held.started(engine, done) == ["b"]  # GPU 4 is free, but it named GPU 5
    held.release(engine, "b", done)
    assert held.started(engine, done) == ["named"]
    held.release(engine, "named", done)
    assert {r: (s["gpu"], s["where"]["cuda_visible_devices"]) for r, s in held.entered.items()} == {
        "a": ("4", "4"), "b": ("5", "5"), "named": (None, "5")}
    assert [row["run_status"] for _, row in done] == ["ok"] * 3


def test_timing_verdicts_measured_beside_other_runs_say_so(monkeypatch):
    def result():
        return TierResult(1, {"latency": CheckResult(Verdict("latency", "pass", "p50 1 ms", timing=True), pd.DataFrame()),
                              "shapes": CheckResult(Verdict("shapes", "pass", "all shapes right"), pd.DataFrame())})

    monkeypatch.delenv(SHARED_MACHINE_ENV, raising=False)
    alone = tiers._shared_machine_said(result())
    assert alone.checks["latency"].verdict.reason == "p50 1 ms" and "shared_machine" not in alone.record
    monkeypatch.setenv(SHARED_MACHINE_ENV, "up to 2 runs at once on this machine (--jobs 2)")
    shared = tiers._shared_machine_said(result())
    assert shared.checks["latency"].verdict.reason == ("p50 1 ms (measured while other runs could share this machine: "
                                                       "up to 2 runs at once on this machine (--jobs 2))")
    assert shared.checks["shapes"].verdict.reason == "all shapes right"
    assert shared.record["shared_machine"] == "up to 2 runs at once on this machine (--jobs 2)"


def test_the_sweep_chart_labels_runs_by_the_axes_that_vary(tmp_path):
    rows = pd.DataFrame({"run_id": ["a", "b", "c"], "tier": [3, 3, 1], "param.precision": ["bf16-mixed", "16-mixed", None],
                         "param.seed": [1, 1, 1], "param.batch_size": [8, 8, None], "amp_precision": ["bf16-mixed", "16-mixed", None],
                         "speedup": [1.4, 0.9, None], "speedup_ci_low": [1.3, 0.8, None], "speedup_ci_high": [1.5, 1.0, None],
                         "parity_gap": [0.01, float("inf"), None], "parity_tolerance": [0.05, 0.05, None]})
    assert sweep_labels(rows[rows["speedup"].notna()]) == ["precision=bf16-mixed", "precision=16-mixed"]
    fig = plot_sweep(rows, path=tmp_path / "sweep.png")
    speed, gap = fig.axes
    assert [t.get_text() for t in speed.get_yticklabels()] == ["precision=bf16-mixed", "precision=16-mixed"]
    assert [round(p.get_width(), 3) for p in speed.patches] == [1.4, 0.9]
    assert [round(p.get_width(), 3) for p in gap.patches] == [1.0, 1000.0]  # the infinite gap drawn at its cap
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_sweep(rows[rows["tier"] == 1]) is None


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be at least 1; got 0"),
    (["--threads", "0"], "--threads must be at least 1; got 0"),
    (["--threads", "4096"], "--threads 4096 is more than this machine's"),
    (["--executor", "ray", "--jobs", "2"], "--jobs is the local engine's"),
    (["--executor", "ray", "--out", "relative/out"], "--out 'relative/out' is relative: with --executor ray"),
])
def test_engine_arguments_are_checked_before_anything_runs(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--tiers", "1", *TINY1, *args] + ([] if "--out" in args else ["--out", str(tmp_path / "out")])
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_on_ray_a_run_that_names_a_gpu_other_than_its_one_is_refused():
    runs = [("r0", 1, {"device": "cuda:0"}), ("r1", 1, {"device": "cuda:1"})]
    with pytest.raises(UsageError, match="device 'cuda:1': with --executor ray each GPU run is given one GPU by Ray"):
        run._check_gpus(argparse.Namespace(executor="ray"), runs)
    run._check_gpus(argparse.Namespace(executor="local"), runs)  # locally it waits for GPU 1 (above)
    run._check_gpus(argparse.Namespace(executor="ray"), runs[:1])


def test_without_ray_the_ray_engine_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["--tiers", "1", *TINY1, "--executor", "ray", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: --executor ray needs Ray, which is not installed: pip install ray "
                                               "(the same version on every node of the cluster)")
    assert not (tmp_path / "default" / ".lock").exists()



def test_any_failure_of_rays_start_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """Ray's start that times out on a loaded machine raises a bare Exception: one line with what to check, no lock left."""
    def times_out(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the Ray processes "
                        "failed to startup.\nmore detail")
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=times_out)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["--tiers", "1", *TINY1, "--executor", "ray", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == ("error: could not start or join Ray (--ray-address None, RAY_ADDRESS None): Exception: The current node "
                   "timed out during startup. This could happen because some of the Ray processes failed to startup.; "
                   "check that the address is a running cluster's (ray status), that this machine is not too loaded to "
                   "start a local Ray, and /tmp/ray/session_latest/logs\n")
    assert not (tmp_path / "default" / ".lock").exists()

# --- the lock on a folder that several machines share ---------------------------------------------------------------

@pytest.fixture
def quick_heartbeat(monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.1)


def test_a_live_lock_from_another_host_is_never_taken_for_an_absent_pid(tmp_path, quick_heartbeat):
    held = tmp_path / ".lock"
    held.write_text(json.dumps({"host": "node-elsewhere", "pid": 999999999}))  # no such pid here: says nothing there
    stop = threading.Event()

    def beat():  # the other host's runner renews its heartbeat
        while not stop.wait(0.05):
            os.utime(held)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        with pytest.raises(UsageError, match="another runner \\(pid 999999999 on node-elsewhere\\) is writing"):
            with lock.batch_lock(tmp_path):
                pass
    finally:
        stop.set()
        beater.join()
    assert json.loads(held.read_text())["host"] == "node-elsewhere"  # untouched


def test_a_lock_whose_heartbeat_stopped_is_taken_over_and_ours_beats(tmp_path, quick_heartbeat):
    (tmp_path / ".lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1}))
    (tmp_path / ".tier1_x.abc").mkdir()  # the dead runner's temporary run folder
    (tmp_path / ".tier1_y.old").mkdir()  # a finished run, cut off between its two renames (no tier1_y)
    (tmp_path / ".ray-driver").write_text("its token")
    with lock.batch_lock(tmp_path):
        mine = json.loads((tmp_path / ".lock").read_text())
        assert mine["host"] == socket.gethostname() and mine["pid"] == os.getpid()
        before = (tmp_path / ".lock").stat().st_mtime_ns
        wait_for(lambda: (tmp_path / ".lock").stat().st_mtime_ns > before, 30, "the lock's heartbeat (its mtime moving)")
        assert not (tmp_path / ".tier1_x.abc").exists() and not (tmp_path / ".ray-driver").exists()
        assert (tmp_path / "tier1_y").is_dir() and not (tmp_path / ".tier1_y.old").exists()  # put back
    assert not (tmp_path / ".lock").exists()


def test_a_runner_never_removes_a_lock_that_is_not_its_own(tmp_path):
    with lock.batch_lock(tmp_path):
        (tmp_path / ".lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 7}))  # taken over meanwhile
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "node-elsewhere"


# --- many kernels at once, and kernels that fail to start -----------------------------------------------------------

def failing_kernel_starts(tmp_path: Path, failures: int, monkeypatch):
    """The python3 kernel, except that its first `failures` starts die at once (as ZeroMQ's port race kills a
    kernel when many start together): a kernel spec of our own, found first through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (tmp_path / "starts").mkdir()
    wrapper = spec / "start.py"
    wrapper.write_text(f"""import os, sys
starts = {str(tmp_path / 'starts')!r}
for i in range({failures}):
    try:
        os.close(os.open(os.path.join(starts, f"fail-{{i}}"), os.O_CREAT | os.O_EXCL))
        sys.exit(1)
    except FileExistsError:
        pass
open(os.path.join(starts, f"start-{{os.getpid()}}"), "w").close()
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *sys.argv[1:]])
""")
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, str(wrapper), "-f", "{connection_file}"],
                                                  "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


@pytest.mark.slow
def test_twelve_runs_at_once_with_failed_kernel_starts_all_finish(tmp_path, monkeypatch, capsys):
    failing_kernel_starts(tmp_path, 3, monkeypatch)
    seeds = grid(tmp_path, f"seed: {list(range(1, 13))}\n")
    assert main(["--tiers", "1", *TINY1, "--grid", seeds, "--jobs", "12", "--out", str(tmp_path / "out")]) == 0, \
        capsys.readouterr().out
    runs = summary(tmp_path / "out", "default")
    assert len(runs) == 12 and (runs["run_status"] == "ok").all() and (runs["verdict"] == "pass").all()
    assert sorted(runs["param.seed"]) == list(range(1, 13)) and (runs["threads"] == 1).all()
    starts = [p.name for p in (tmp_path / "starts").iterdir()]
    assert runs["kernel_start_retries"].sum() == 3 and sum(s.startswith("fail-") for s in starts) == 3
    assert sum(s.startswith("start-") for s in starts) == 12
    retried = runs[runs["kernel_start_retries"] > 0].iloc[0]
    assert "the kernel did not start" in (tmp_path / "out" / "default" / retried["run_id"] / "kernel.log").read_text()
    assert sorted(p.name for p in (tmp_path / "out" / "default").iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_ctrl_c_with_jobs_2_stops_both_running_notebooks_and_starts_no_other(tmp_path):
    """Four runs, two at a time, each pausing in its first training step (FaultOnce): Ctrl-C of the runner records
    the two running ones interrupted and starts neither of the others; --resume then runs all four."""
    args = ["-m", "utils.run", "--tiers", "1", *TINY1, "-p", f"model={ROOT}/tests/user_models.py:FaultOnce", "--jobs", "2",
            "--grid", grid(tmp_path, "seed: [1, 2, 3, 4]\n"), "--out", str(tmp_path)]
    env = {**os.environ, "SUITE_TEST_FAULT": "pause:1", "SUITE_TEST_MARK": str(tmp_path / "mark"), "PYTHONPATH": str(ROOT)}
    with start([sys.executable, *args], cwd=ROOT, env=env) as child:
        child.wait_for((tmp_path / "mark").exists, 240, "a run paused in its first training step (its mark)")
        child.proc.send_signal(signal.SIGINT)
        returncode, stdout, stderr = child.finish(300)
    assert returncode == 1, stdout + stderr
    runs = summary(tmp_path, "default")
    assert list(runs["run_status"]) == ["interrupted", "interrupted", "not_started", "not_started"], stdout
    assert "SIGINT: 2 run(s) not started; --resume runs them" in stdout and stdout.count(" ...") == 2
    assert sorted(p.name for p in (tmp_path / "default").iterdir() if p.is_dir()) == sorted(runs["run_id"][:2])
    again = subprocess.run([sys.executable, *args, "--resume"], cwd=ROOT, env={**env, "SUITE_TEST_FAULT": "none:0"},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (summary(tmp_path, "default")["run_status"] == "ok").all(), again.stdout


@pytest.mark.slow
def test_a_kernel_that_dies_in_a_cell_is_a_finding_not_retried(tmp_path, monkeypatch):
    failing_kernel_starts(tmp_path, 0, monkeypatch)
    model = f"model={ROOT}/tests/user_models.py:Exits"
    assert main(["--tiers", "1", *TINY1, "-p", model, "--out", str(tmp_path / "out")]) == 1
    row = summary(tmp_path / "out", "default").iloc[0]
    assert row["run_status"] == "crashed" and "DeadKernelError" in row["error"], row["error"]
    assert len(list((tmp_path / "starts").iterdir())) == 1  # started once: a death in a cell is never retried


# --- the same grid through every engine, and a cluster of two nodes simulated here (Ray) ----------------------------

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray cluster of two nodes on this machine, each declaring one GPU and two CPUs, joined by this process. Its
    workers see SUITE_TEST_FAULT, which only tests/user_models.py:FaultOnce reads: it pauses at its first training
    forward and touches SUITE_TEST_MARK, so a test can act on a run in the middle of it."""
    ray = optional("ray")
    from ray.cluster_utils import Cluster
    mark = tmp_path_factory.mktemp("ray") / "mark"
    os.environ.update(SUITE_TEST_FAULT="pause:1", SUITE_TEST_MARK=str(mark))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield types.SimpleNamespace(mark=mark, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
        for name in ("SUITE_TEST_FAULT", "SUITE_TEST_MARK"):
            os.environ.pop(name, None)


def losses(batch: Path, run_id: str) -> dict:
    tables = json.loads((batch / run_id / "results.json").read_text())["tables"]
    return {"fp32": tables["fp32_baseline"]["loss"], "amp": tables["amp_safe"]["loss_amp"]}


@pytest.mark.slow
def test_the_same_grid_through_every_engine_gives_the_same_runs_and_losses(tmp_path, ray_cluster):
    """--jobs 1 (today's runner), --jobs 2 and Ray, each run given one thread: the same runs, the same non-timing
    verdicts and bit for bit the same tier-3 losses."""
    seeds = grid(tmp_path, "seed: [1, 2]\n")
    engines = {"jobs1": ["--jobs", "1"], "jobs2": ["--jobs", "2"], "ray": ["--executor", "ray"]}
    for name, flags in engines.items():
        assert main(["--tiers", "1", "3", *TINY1[2:], *TINY3[2:], "--grid", seeds, "--threads", "1", *flags,  # TINY3's seq_len
                     "--out", str(tmp_path), "--name", name]) == 0
    runs = {name: summary(tmp_path, name) for name in engines}
    verdicts = [c for c in runs["jobs1"].columns if c.startswith("verdict.") and c not in ("verdict.latency", "verdict.amp_worth_it")]
    assert len(runs["jobs1"]) == 4 and (runs["jobs1"]["threads"] == 1).all()
    for name in ("jobs2", "ray"):
        assert list(runs[name]["run_id"]) == list(runs["jobs1"]["run_id"])  # the plan's order, whatever finished first
        assert runs[name][verdicts].equals(runs["jobs1"][verdicts]) and (runs[name]["threads"] == 1).all()
        for run_id in runs["jobs1"][runs["jobs1"]["tier"] == 3]["run_id"]:
            assert losses(tmp_path / name, run_id) == losses(tmp_path / "jobs1", run_id)
    assert set(runs["ray"]["executor"]) == {"ray"} and set(runs["jobs2"]["executor"]) == {"local"}
    shared = json.loads((tmp_path / "jobs2" / runs["jobs2"]["run_id"][0] / "results.json").read_text())["record"]
    assert shared["shared_machine"] == "up to 2 runs at once on this machine (--jobs 2), 1 CPU thread(s) each"
    assert (tmp_path / "jobs1" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_on_a_cluster_gpu_runs_spread_over_the_nodes_one_per_gpu(tmp_path, ray_cluster):
    seeds = grid(tmp_path, "seed: [1, 2, 3, 4]\n")
    tiny_auto = [a for a in TINY1 if a != "device=cpu"][:-1]  # device 'auto': a GPU run wherever there is one
    assert main(["--tiers", "1", *tiny_auto, "--grid", seeds, "--executor", "ray", "--out", str(tmp_path)]) == 0
    runs = summary(tmp_path, "default")
    assert (runs["run_status"] == "ok").all() and runs["node"].nunique() == 2
    assert (runs["cuda_visible_devices"].astype(str) == "0").all()  # each node's one GPU, as Ray gave it
    for _, on_node in runs.groupby("node"):
        spans = sorted(zip(on_node["started_at"], on_node["ended_at"]))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two runs at once on one GPU"


def kernel_of_a_run(out: Path) -> int:
    """The pid of a notebook kernel working in one of out's temporary run folders (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).parent == out and "ipykernel" in (proc / "cmdline").read_text():
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no kernel runs in {out}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="finds the kernel through /proc")
def test_a_killed_ray_worker_crashes_its_run_only_and_resume_completes(tmp_path, ray_cluster):
    args = ["--tiers", "1", *TINY1, "-p", f"model={ROOT}/tests/user_models.py:FaultOnce",
            "--grid", grid(tmp_path, "seed: [1, 2, 3]\n"), "--executor", "ray", "--out", str(tmp_path)]
    ray_cluster.mark.unlink(missing_ok=True)
    killed = []

    def kill_a_worker():  # in a thread while main() runs: a deadline it misses is said below, in the test's thread
        deadline = time.time() + 240
        while not ray_cluster.mark.exists():
            if time.time() > deadline:
                killed.append(None)
                return
            time.sleep(0.05)
        kernel = kernel_of_a_run(tmp_path / "default")
        worker = int((Path("/proc") / str(kernel) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        killed.append(Path(os.readlink(f"/proc/{kernel}/cwd")).name.split(".")[1])  # the run id
        os.kill(worker, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    code = main(args)
    killer.join()
    assert killed != [None], "no run paused in its first training step (its mark) within 240 s"
    assert code == 1
    runs = summary(tmp_path, "default")
    crashed = runs[runs["run_status"] == "crashed"]
    assert list(crashed["run_id"]) == killed and "WorkerCrashedError" in crashed["error"].iloc[0]
    assert (runs[runs["run_status"] != "crashed"]["verdict"] == "pass").all() and len(runs) == 3
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "default").glob("*/run.json")}
    assert len(finished) == 2  # the killed run left no record, only its temporary folder
    assert main([*args, "--resume"]) == 0
    assert (summary(tmp_path, "default")["run_status"] == "ok").all()
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # the finished runs were kept, not redone
    assert (tmp_path / "default" / killed[0] / "run.json").exists() and not list((tmp_path / "default").glob(".tier1*"))


@pytest.mark.slow
def test_a_node_that_cannot_see_out_refuses_with_the_reason(tmp_path, ray_cluster):
    from utils.runner.lock import RAY_MARKER as MARKER
    from utils.runner.ray_cluster import RayExecutor
    engine = RayExecutor(tmp_path)
    (tmp_path / MARKER).write_text("not this driver's token")  # as a node-local folder of the same path would hold
    engine.submit(Job(0, "r0", 1, {"device": "cpu"}, tmp_path))
    done = []
    while engine.busy:
        done += engine.collect(1.0)
    engine.close()
    [(_, row)] = done
    assert row["run_status"] == "crashed" and row["executor"] == "ray"
    assert f"cannot see this driver's marker {tmp_path / MARKER} (it found another driver's token)" in row["error"]
    assert "--out must be one folder that every node sees at the same absolute path" in row["error"]


@pytest.mark.slow
def test_sigterm_of_a_ray_driver_keeps_finished_runs_and_resume_finishes(tmp_path, ray_cluster):
    """Two runs finish; the batch grows to four and its driver gets SIGTERM (a scheduler's stop; Ray's own handler
    would exit at once) while the new two run, paused mid-tier by FaultOnce: they are recorded interrupted, the
    finished two are untouched, and --resume finishes the grid."""
    args = ["-m", "utils.run", "--tiers", "1", *TINY1, "-p", f"model={ROOT}/tests/user_models.py:FaultOnce",
            "--executor", "ray", "--out", str(tmp_path), "--resume"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)}
    first = subprocess.run([sys.executable, *args, "--grid", grid(tmp_path, "seed: [1, 2]\n")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "default").glob("*/run.json")}
    ray_cluster.mark.unlink(missing_ok=True)
    four = grid(tmp_path, "seed: [1, 2, 3, 4]\n")
    with start([sys.executable, *args, "--grid", four], cwd=ROOT, env=env) as child:
        child.wait_for(ray_cluster.mark.exists, 240, "a new run paused in its first training step (its mark)")
        child.proc.send_signal(signal.SIGTERM)  # to the driver alone: its tasks learn of it through --out
        returncode, stdout, stderr = child.finish(300)
    assert returncode == 1, stdout + stderr
    assert any(line.startswith("SIGTERM: the running notebooks are stopped as by Ctrl-C") for line in stderr.splitlines())
    runs = summary(tmp_path, "default")
    assert sorted(runs["run_status"]) == ["interrupted", "interrupted", "ok", "ok"], runs["error"]
    assert set(runs[runs["run_status"] == "interrupted"]["error"]) == {
        "SIGTERM of the Ray driver stopped it before it wrote its results (--resume runs it again)"}
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    again = subprocess.run([sys.executable, *args, "--grid", four], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and (summary(tmp_path, "default")["run_status"] == "ok").all(), again.stdout
    assert again.stdout.count("complete, skipped (--resume)") == 2
