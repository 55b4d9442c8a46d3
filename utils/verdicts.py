"""Verdicts: every check in every tier ends in pass / warn / fail with a reason a person can act on."""

from dataclasses import asdict, dataclass

import pandas as pd

STATUSES = ("pass", "warn", "fail")


@dataclass(frozen=True)
class Verdict:
    check: str
    status: str
    reason: str

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"verdict status must be one of {STATUSES}; got {self.status!r} for check {self.check!r}")


def verdict_table(verdicts) -> pd.DataFrame:
    """One row per verdict, columns check / status / reason."""
    return pd.DataFrame([asdict(v) for v in verdicts], columns=["check", "status", "reason"])


def worst_status(verdicts) -> str:
    """'fail' if any failed, else 'warn' if any warned, else 'pass'."""
    statuses = {v.status for v in verdicts}
    return next((s for s in ("fail", "warn") if s in statuses), "pass")
