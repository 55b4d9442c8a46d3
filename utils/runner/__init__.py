"""How the batch runner executes its runs: one run (execute), the one-runner lock (lock), and the engines that run many
at once, here (local) or on a Ray cluster (ray_cluster). Every engine runs a run through execute.execute, so its results
do not depend on the engine.

An engine, as utils.run.run_all uses it: submit(job) queues a run; collect(timeout) waits up to `timeout` s and returns the
finished runs as (job, row), row None for one that never started; busy: whether any is queued or running; cancel() keeps
the queued ones from starting; kill() ends the running ones at once; close() releases the engine; on_start(job), when
set, is called as a run starts (or, where the engine cannot see that, as it is queued: its start_note says which)."""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    """One run as the driver hands it to an engine; `index` is its place in the plan (the summary's order)."""
    index: int
    run_id: str
    tier: int
    params: dict
    out_dir: Path
    progress: bool = False
    timeout: int = None
    extra: dict = field(default_factory=dict)  # the driver's own fields for the row (rerun_reason)


class UsageError(ValueError):
    """Bad arguments, or a batch that cannot start (its folder locked, its engine missing): said before any notebook runs."""
