"""Verdicts: every check in every tier ends in pass / warn / fail with a reason a person can act on."""

from dataclasses import asdict, dataclass, field

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


@dataclass
class CheckResult:
    """One check: its verdict, its data as a table, JSON-ready figures (extra) and arrays for charts."""

    verdict: Verdict
    data: pd.DataFrame
    extra: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


@dataclass
class TierResult:
    """A tier's verdicts and the data behind each check."""

    checks: dict  # check name -> CheckResult

    @property
    def verdicts(self) -> list:
        return [c.verdict for c in self.checks.values()]

    def verdict_table(self) -> pd.DataFrame:
        return verdict_table(self.verdicts)

    @property
    def status(self) -> str:
        return worst_status(self.verdicts)

    def to_dict(self) -> dict:
        return {"status": self.status, "verdicts": self.verdict_table().to_dict("records"),
                "extra": {name: c.extra for name, c in self.checks.items()}}


def run_check(name: str, check) -> CheckResult:
    """Run one check; an exception becomes its fail verdict, so one broken check never hides the others."""
    try:
        return check()
    except Exception as e:
        return CheckResult(Verdict(name, "fail", f"the check crashed: {type(e).__name__}: {e}"), pd.DataFrame())
