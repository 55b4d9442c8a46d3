"""Tier 3 (utils.tier3_training_utilities: fp32 vs AMP speedup, memory, loss parity, MFU) from the command line, and the
seed's test_amp_speedup_benchmark. Usage: python -m utils.training.amp_benchmark --json (options: tier 3's, see --help)."""

import argparse
import json
import sys
import time

from utils.params import TIER_PARAMS, ParamError, add_arguments
from utils.precision import label
from utils.tiers import run_tier
from utils.verdicts import TierResult


def test_amp_speedup_benchmark(model=None, /, *, data=None, progress: bool = False, **params) -> TierResult:
    """Tier 3: benchmark fp32 against the AMP precision `precision` resolves to, on `model` (module or spec; default: the
    `model` parameter). params: tier 3's (utils.params), e.g. steps, batch_size, trials, sweep_batch_sizes (the speedup at
    each batch size too, with fewer trials: where AMP pays), minimal_loop (also time a bare hand-written loop). A model or
    precision the suite cannot run raises UnsupportedModel (or UnsupportedPrecision) with the reason, as it always has."""
    return run_tier(3, params, model=model, data=data, progress=progress, refusal_as_verdict=False)


test_amp_speedup_benchmark.__test__ = False  # a library function, not a pytest test


def _report(result: TierResult, args):
    """The short text report: the speedup in context, compile figures, every verdict."""
    if "amp_worth_it" in result.checks and "speedup" in result.checks["amp_worth_it"].extra:  # else nothing was timed
        speed = result.checks["amp_worth_it"].extra
        print(f"{args.model} on {result.record['device']}, batch {args.batch_size} x {args.seq_len}: "
              f"{speed['amp_precision']} vs fp32")
        print(f"  speedup {speed['speedup']['median']:.2f}x; matmul ratio {speed['matmul_ratio']:.2f}x; "
              f"Amdahl bound {speed['amdahl_speedup_bound']:.2f}x ({speed['speedup_of_amdahl_bound']:.0%} of it reached)")
        if "compile" in speed:
            c = speed["compile"]
            for prec, gain in c["speedup_over_eager"].items():
                print(f"  compiled {label(prec)}: {gain:.2f}x eager {label(prec)} "
                      f"(compile time {c['compile_time_s'][prec]:.1f} s, apart from step time)")
            print(f"  {c['why']}")
    for v in result.verdicts:
        print(f"  [{v.status}] {v.check}: {v.reason}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tier 3 from the command line: fp32 vs AMP speedup, memory, loss "
                                     "parity, MFU. Every option is a tier 3 parameter (see README: Parameters).")
    cli_params = [p for p in TIER_PARAMS[3] if p.name != "output_dir"]
    add_arguments(parser, cli_params)
    parser.add_argument("--out", default=None, help="also write the full result (results.json layout) here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (default: a short text report)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        result = run_tier(3, {p.name: getattr(args, p.name) for p in cli_params})  # a refusal is a verdict here
    except ParamError as e:
        parser.error(str(e))
    result.figures["wall_time_s"] = time.perf_counter() - t0
    if args.out:
        result.save(args.out)
    if args.json:
        d = result.to_dict()
        print(json.dumps({k: d[k] for k in ("status", "record", "figures", "verdicts", "extra")}, indent=2, default=float))
    else:
        _report(result, args)
    return 0 if result.status != "fail" else 1


if __name__ == "__main__":
    sys.exit(main())
