"""Checkpoints for the fine-tuning loop: everything a run needs to continue exactly where it stopped (states, RNGs,
step, history) and the run's identity, whose mismatch is refused by name. Written to a temporary file and renamed
into place (a crash mid-write never leaves a half file under a real name); read with weights_only=True (never
arbitrary pickled objects); an unreadable one is named and the one before it used."""

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn

FORMAT = 2  # 2: the LR schedule is saved as the count of steps applied (utils.loop.steps)
PATTERN = "step_*.pt"
KEYS = ("format", "identity", "step", "micro_done", "model", "optimizer", "scheduler", "scaler", "rng", "history", "evals")


class CheckpointMismatch(ValueError):
    """A checkpoint written by another run: resuming from it would mix two runs."""


def structure_digest(model: nn.Module) -> str:
    """The model's class and every state entry's name, shape and dtype: equal for the same architecture."""
    entries = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    return f"{type(model).__name__}:" + hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def save_checkpoint(folder, state: dict, keep: int) -> Path:
    """Write state as step_<step>.pt atomically, then keep only the newest `keep` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:08d}.pt"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        torch.save({"format": FORMAT, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in sorted(folder.glob(PATTERN))[:-keep]:
        old.unlink(missing_ok=True)
    for stray in folder.glob(".step_*.tmp"):  # left by a process killed mid-write (one run per folder)
        stray.unlink(missing_ok=True)
    return path


def clear_checkpoints(folder) -> list:
    """Remove a previous run's checkpoints and stray temporary files: a fresh run starts its own history."""
    folder = Path(folder)
    removed = [p for p in [*folder.glob(PATTERN), *folder.glob(".step_*.tmp")] if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def load_latest(folder, identity: dict):
    """(state, path, notes) for the newest readable checkpoint in `folder` (None, None, notes: none); notes name each
    unreadable one passed over. A checkpoint of another run raises CheckpointMismatch."""
    notes = []
    for path in sorted(Path(folder).glob(PATTERN), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if missing := [k for k in KEYS if k not in state]:
                raise ValueError(f"missing {missing}")
        except Exception as e:  # truncated, corrupt, or not a checkpoint: say so and try the one before
            notes.append(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); using the one before it")
            continue
        if state["format"] != FORMAT:
            raise CheckpointMismatch(f"checkpoint {path} has format {state['format']}; this version reads format {FORMAT}")
        saved = state["identity"]
        if diffs := [f"{k} is {saved.get(k)!r} there and {v!r} here" for k, v in identity.items() if saved.get(k) != v]:
            raise CheckpointMismatch(f"checkpoint {path} belongs to another run: " + "; ".join(diffs)
                                     + ". Point checkpoint_dir elsewhere, or resume=False to start over.")
        return state, path, notes
    return None, None, notes
