"""Results as files: JSON written atomically (a temp file in the same folder, then a rename), so a
reader never sees half a file and an interrupted run leaves nothing behind; and the commands' exit codes."""

import json
import math
import os
import tempfile
from pathlib import Path

# What utils.run and utils.train exit with: all ran; a run crashed or failed its gate; bad arguments (as argparse
# exits); every run finished but one is worse than the baseline (utils.run --baseline); stopped by Ctrl-C (what a
# shell reports for it).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REGRESSION, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
OK = "ok"  # run.json's and summary.csv's run_status of a run that finished (its verdict is its own)


def json_safe(value):
    """NaN and infinities become None (JSON has no NaN); tuples become lists; nested dicts and lists too."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())  # numpy and torch scalars
    return value


def write_json_atomic(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(obj), f, indent=2, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_json(path):
    return json.loads(Path(path).read_text())
