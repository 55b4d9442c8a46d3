"""The local engine (--jobs): up to `jobs` notebooks at once, each driven by a thread of the runner (its kernel is its own
process); each GPU run holds a GPU of its own from a pool, and the cores are split between the runs (README)."""

import contextlib
import os
import queue
import socket
import threading
from collections import deque

from utils.params import SHARED_MACHINE_ENV
from utils import device as dev
from utils.runner import Job
from utils.runner.execute import CRASHED, execute, kill_kernels, stop_reason, unfinished_row


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> list:
    """The GPUs this runner may hand out: CUDA_VISIBLE_DEVICES's entries where it is set, else 0..N-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and not g.strip().startswith("-")]
    return [str(i) for i in range(dev.cuda_device_count())]


def wants_gpu(params: dict) -> bool:
    """A run that computes on a GPU when there is one ('auto' and 'cuda'; 'cpu' never)."""
    return str(params.get("device", "auto")).split(":")[0] in ("auto", "cuda")


def named_gpu(params: dict):
    """N of a run that names its GPU ('cuda:N'), else None."""
    device = str(params.get("device", "auto"))
    return int(device.split(":")[1]) if device.startswith("cuda:") else None


def kernel_env(threads: int = None, gpu: str = None, shared: str = "") -> dict:
    """Added to a run's kernel environment by every engine: its intra-op threads (torch reads them as it starts), the one
    GPU it may see, and why other runs may share its machine (utils.tiers says so)."""
    return {**({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}),
            **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {}), **({SHARED_MACHINE_ENV: shared} if shared else {})}


class LocalExecutor:
    """The engines' interface (utils.runner) on this machine. A queued run starts at the next collect(), so the
    driver has recorded the runs that finished before others take their slots."""
    name = "local"
    start_note = ""  # a run is announced as it starts

    def __init__(self, jobs: int = 1, threads: int = None, gpus: list = None):
        # --jobs 1 without --threads leaves the kernel's threads to torch, as a single run always had them.
        self.jobs, self.threads = jobs, threads or (max(1, cpu_count() // jobs) if jobs > 1 else None)
        self.all_gpus = list(visible_gpus() if gpus is None else gpus)
        self.free_gpus = list(self.all_gpus)
        self.queued, self.running, self.done, self.on_start = deque(), {}, queue.Queue(), None
        # Timing verdicts measured beside other runs say so (utils.tiers reads this in the kernel).
        self.shared = (f"up to {jobs} runs at once on this machine (--jobs {jobs}), {self.threads} CPU thread(s) each"
                       if jobs > 1 else "")

    def submit(self, job: Job):
        self.queued.append(job)

    def _start(self):
        while self.queued and len(self.running) < self.jobs and not stop_reason():  # after a stop, no run starts
            job = self.queued[0]
            gpu, named = None, named_gpu(job.params)
            if self.all_gpus and wants_gpu(job.params):
                # cuda:N waits for GPU N and sees them all (N must stay valid); any other gets the first free one as its only GPU
                gpu = self.all_gpus[named] if named is not None else (self.free_gpus or [None])[0]
                if gpu not in self.free_gpus:
                    return  # its GPU is held: the run waits rather than share it
                self.free_gpus.remove(gpu)
            self.queued.popleft()
            env = kernel_env(self.threads, gpu if named is None else None, self.shared)
            where = {"executor": self.name, "node": socket.gethostname(), "cuda_visible_devices": gpu or "",
                     "threads": self.threads}
            thread = threading.Thread(target=self._run, args=(job, env, where), daemon=True, name=job.run_id)
            self.running[job.run_id] = (job, gpu)
            thread.start()
            if self.on_start:
                self.on_start(job)

    def _run(self, job: Job, env: dict, where: dict):
        try:
            row = execute(job.run_id, job.tier, job.params, job.out_dir, job.progress, job.timeout, env=env, where=where)
        except BaseException as e:  # never lose a run's end: the driver waits for it
            row = unfinished_row(job, CRASHED, f"{type(e).__name__}: {e}", where)
        self.done.put((job, row))

    def collect(self, timeout: float) -> list:
        self._start()  # into the slots the last collect freed: after the driver recorded those runs
        finished = []
        with contextlib.suppress(queue.Empty):
            finished.append(self.done.get(timeout=timeout))
            while True:
                finished.append(self.done.get_nowait())
        for job, _ in finished:
            _, gpu = self.running.pop(job.run_id)
            if gpu is not None:
                self.free_gpus.append(gpu)
        return finished

    @property
    def busy(self) -> bool:
        return bool(self.queued or self.running)

    def cancel(self):
        self.queued.clear()

    def kill(self):  # each run's thread then ends on its dead kernel
        kill_kernels()

    def close(self):
        pass
