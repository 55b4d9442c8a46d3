"""Verdicts: every check in every tier ends in pass / warn / fail with a reason a person can act on. A verdict that rests on a
timing (latency, speedup) is marked `timing`: it can flip on a busy machine, so a tier's status, and everything that gates on
it, is decided by the other verdicts."""

from dataclasses import asdict, dataclass, field

import pandas as pd

from utils.results import read_json, write_json_atomic

STATUSES = ("pass", "warn", "fail")
CRASHED = "the check crashed: "


@dataclass(frozen=True)
class Verdict:
    check: str
    status: str
    reason: str
    timing: bool = False

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"verdict status must be one of {STATUSES}; got {self.status!r} for check {self.check!r}")


@dataclass
class CheckResult:
    """One check: its verdict, its data as a table, JSON-ready figures (extra) and arrays for charts."""

    verdict: Verdict
    data: pd.DataFrame
    extra: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)

    @property
    def crashed(self) -> bool:
        return self.verdict.reason.startswith(CRASHED)


@dataclass
class TierResult:
    """A tier's verdicts, the data behind each check, and what the run was: the one result layout
    that results.json, the notebooks, the batch runner and the tests all read."""

    tier: int
    checks: dict                                  # check name -> CheckResult
    parameters: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)    # device, precision, versions: see utils.environment.run_record
    figures: dict = field(default_factory=dict)   # headline numbers, one summary column each

    @property
    def verdicts(self) -> list:
        return [c.verdict for c in self.checks.values()]

    def verdict_table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(v) for v in self.verdicts], columns=["check", "status", "reason", "timing"])

    @property
    def status(self) -> str:
        """'fail' if any non-timing verdict failed, else 'warn' if any warned, else 'pass'."""
        statuses = {v.status for v in self.verdicts if not v.timing}
        return next((s for s in ("fail", "warn") if s in statuses), "pass")

    def to_dict(self) -> dict:
        return {"tier": self.tier, "status": self.status, "parameters": self.parameters, "record": self.record,
                "verdicts": self.verdict_table().to_dict("records"), "figures": self.figures,
                "extra": {name: c.extra for name, c in self.checks.items()},
                "tables": {name: c.data.to_dict("list") for name, c in self.checks.items()}}

    def save(self, path):
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "TierResult":
        d = read_json(path)
        checks = {v["check"]: CheckResult(Verdict(**v), pd.DataFrame(d["tables"][v["check"]]), d["extra"][v["check"]])
                  for v in d["verdicts"]}
        return cls(d["tier"], checks, d["parameters"], d["record"], d["figures"])


def run_check(name: str, check) -> CheckResult:
    """Run one check; an exception becomes its fail verdict, so one broken check never hides the others."""
    try:
        return check()
    except Exception as e:
        return CheckResult(Verdict(name, "fail", f"{CRASHED}{type(e).__name__}: {e}"), pd.DataFrame())
