"""The Ray engine (--executor ray; what a cluster needs: README): each run is a Ray task. A task that cannot see the
driver's marker in --out refuses rather than write a run the driver would never find; the driver's stop is a file beside
the marker: running tasks stop their notebooks as Ctrl-C would, queued ones return without running."""

import logging
import os
import secrets
import socket
import threading
from pathlib import Path

from utils.params import ROOT
from utils.runner import Job, UsageError
from utils.runner.execute import CRASHED, ask_stop, clear_stop, execute, stop_reason, unfinished_row
from utils.runner.local import kernel_env, wants_gpu
from utils.runner.lock import RAY_MARKER  # in --out: the token of the driver whose tasks may write there
STOP_POLL_S = 0.5


def _ray():
    try:
        import ray  # optional: only this engine needs it
    except ImportError:
        raise UsageError("--executor ray needs Ray, which is not installed: pip install ray (the same version on every "
                         "node of the cluster)") from None
    return ray


def _stop_file(out_dir: Path, token: str) -> Path:
    return out_dir / f"{RAY_MARKER}.{token}.stop"


def _watch_stop(stop_file: Path, done: threading.Event):
    while not done.wait(STOP_POLL_S):
        if stop_file.exists():
            ask_stop(f"{stop_file.read_text().strip() or 'a stop'} of the Ray driver")
            return


def run_task(job: Job, token: str, threads: int, shared: str):
    """One run on a Ray worker: the shared-folder check, then execute() as every engine runs it; None when the driver had
    stopped before it started."""
    ray = _ray()
    marker, stop_file = job.out_dir / RAY_MARKER, _stop_file(job.out_dir, token)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "") if ray.get_runtime_context().get_accelerator_ids().get("GPU") else ""
    node = f"{socket.gethostname()} {ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()[:8]}"
    where = {"executor": "ray", "node": node, "cuda_visible_devices": gpus, "threads": threads}
    try:
        seen = "another driver's token" if marker.read_text().strip() != token else ""
    except OSError as e:
        seen = f"no file there ({e.strerror or e})"
    if seen:
        return unfinished_row(job, CRASHED, f"node {node} cannot see this driver's marker {marker} (it found {seen}): "
                              "with --executor ray, --out must be one folder that every node sees at the same absolute path "
                              "(NFS or a cluster file system), not a node-local path", where)
    if stop_file.exists():
        return None
    clear_stop()  # a Ray worker process runs task after task: a stop belongs to its own task
    done = threading.Event()
    threading.Thread(target=_watch_stop, args=(stop_file, done), daemon=True).start()
    try:
        return execute(job.run_id, job.tier, job.params, job.out_dir, False, job.timeout,
                       env=kernel_env(threads, gpus, shared), where=where)
    finally:
        done.set()
        clear_stop()


class RayExecutor:
    """The engines' interface (utils.runner) over Ray tasks."""
    name = "ray"
    start_note = " (queued on Ray: it starts when the cluster has room)"  # a task is announced when submitted

    def __init__(self, out_dir: Path, address: str = None, threads: int = 1):
        self.ray = ray = _ray()
        self.owns = not ray.is_initialized()
        if self.owns:  # address None: RAY_ADDRESS, else the cluster `ray start` began on this machine, else a new local Ray
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            except Exception as e:  # Ray raises many kinds (a start that timed out is a bare Exception): each is one line
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise UsageError(f"could not start or join Ray (--ray-address {address!r}, RAY_ADDRESS "
                                 f"{os.environ.get('RAY_ADDRESS')!r}): {type(e).__name__}: {first}; check that the "
                                 "address is a running cluster's (ray status), that this machine is not too loaded to "
                                 "start a local Ray, and /tmp/ray/session_latest/logs") from None
        self.out_dir, self.threads, self.token = out_dir, threads, secrets.token_hex(8)
        (out_dir / RAY_MARKER).write_text(self.token)
        self.stop_file = _stop_file(out_dir, self.token)
        self.gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.refs, self.on_start = {}, None
        self.shared = "a Ray node runs other tasks beside this one, on its CPUs"
        self.task = ray.remote(max_retries=0, runtime_env={  # a worker's death is the run's crash, never a silent redo
            "env_vars": {"PYTHONPATH": str(ROOT), "SUITE_ROOT": str(ROOT)}})(run_task)

    def submit(self, job: Job):
        gpu = self.gpus and wants_gpu(job.params)
        task = self.task.options(num_gpus=1 if gpu else 0, num_cpus=self.threads, name=job.run_id)
        self.refs[task.remote(job, self.token, self.threads, self.shared)] = job
        if self.on_start:
            self.on_start(job)

    def collect(self, timeout: float) -> list:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        finished = []
        for ref in ready:
            job = self.refs.pop(ref)
            try:
                finished.append((job, self.ray.get(ref)))
            except self.ray.exceptions.RayError as e:  # the worker or its node died: the run crashed there
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"
                finished.append((job, unfinished_row(job, CRASHED, why, {"executor": self.name, "threads": self.threads})))
        return finished

    @property
    def busy(self) -> bool:
        return bool(self.refs)

    def cancel(self):
        self.stop_file.write_text(stop_reason())  # running tasks stop their notebooks; queued ones never run

    def kill(self):
        """A stop at once: every task's worker ended, its kernel with it."""
        if not self.refs:
            return
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        for ref in set(self.refs) - set(ready):  # cancelling a task that just finished can abort Ray's driver
            self.ray.cancel(ref, force=True)

    def close(self):
        for path in (self.stop_file, self.out_dir / RAY_MARKER):
            path.unlink(missing_ok=True)
        if self.owns:
            self.ray.shutdown()
