"""A tier's result in a notebook: its headline, each section's verdict, table and charts, and the summary.
Everything a notebook shows comes from here, so a notebook holds no result layout, precision or verdict logic."""

from IPython.display import Image, display

from utils.verdicts import TierResult


def verdict_line(verdict) -> str:
    """'[status] check: reason'; timing verdicts say so (nbval masks them, see tests/nbval_sanitize.cfg)."""
    return f"[{verdict.status}] {'(timing) ' if verdict.timing else ''}{verdict.check}: {verdict.reason}"


def headline(result: TierResult):
    """The run in one line: the model and its task, or why it is not supported."""
    if "supported" in result.checks:
        print(f"unsupported model: {result.checks['supported'].verdict.reason}")
    else:
        print(f"{result.parameters['model']}: {result.figures['parameters']:,} parameters, task {result.record['task']}")


def present(result: TierResult, name: str, charts: dict):
    """A notebook section: the check's verdict, its table's columns and rows, and its charts."""
    if name not in result.checks:
        why = (result.figures.get("stop") or {}).get("message") or "the model is not supported, see above"
        print(f"{name}: not run ({why})")
        return
    check = result.checks[name]
    print(verdict_line(check.verdict))
    if check.crashed or check.data.empty:
        print("no table or chart: " + ("the check crashed" if check.crashed else "nothing was measured") + " (see the verdict)")
        return
    print(f"table: {len(check.data)} rows; columns {', '.join(map(str, check.data.columns))}")
    for path in charts.get(name, []):
        display(Image(filename=str(path)))


def summarize(result: TierResult):
    """Every verdict, then the tier's status (decided by the non-timing verdicts)."""
    for verdict in result.verdicts:
        print(verdict_line(verdict))
    print(f"Tier {result.tier}: {result.status}")


def describe(result: TierResult):
    """What ran (device, precision and why, versions) and the headline figures. Differs from machine to machine."""
    for key, value in {**result.record, **result.figures}.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
