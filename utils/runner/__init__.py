"""How the batch runner executes its runs: one run (execute), the one-runner lock (lock), and the engines that
run many at once: on this machine (local) or on a Ray cluster (ray_cluster). utils.run plans the grid and keeps
the summary; every engine executes a run through execute.execute, so a run's results do not depend on the engine."""


class UsageError(ValueError):
    """Bad arguments, or a batch that cannot start (its folder locked, its engine missing): reported before any
    notebook runs."""
