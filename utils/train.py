"""Fine-tune under torchrun: tier 3's loop and AMP semantics on several processes, devices or machines (README: torchrun).

    torchrun --nproc_per_node 2 -m utils.train --model gpt-small --precision bf16-mixed --steps 200
    python -m utils.train ...             # one process, no torchrun: the reference for --reference

Each rank trains on its rows of the same global batch (--batch-size per rank), under DDP or FSDP2; NCCL on CUDA, gloo on CPU.
Only rank 0 writes results.json, loss.png and the checkpoints. Ctrl-C/SIGTERM checkpoints and exits 130; --resume True continues.
"""

import argparse
import gc
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict
from pathlib import Path

import matplotlib
import torch.distributed as dist

from utils.loop.config import TrainConfig
from utils.loop.distributed import fsdp2_unavailable, gather, init_from_env, ranks
from utils.loop.stops import INTERRUPTED, status
from utils.loop.trainer import Trainer
from utils.models import ModelLoadError, UnsupportedModel
from utils.params import FINE_TUNING, TRAIN_PARAMS, ParamError, add_arguments, check_values
from utils.plotting import plot_training
from utils import device as dev
from utils.precision import resolve
from utils.prepare import prepare_training
from utils.results import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, read_json, write_json_atomic
from utils.verdicts import Verdict


def _reference(path: str) -> dict:
    """The one-process run to measure scaling against, checked before any work starts."""
    if not path:
        return {}
    try:
        ref = read_json(path)["distributed"]
        return {"path": path, "tokens_per_s": float(ref["tokens_per_s_total"]), "world_size": int(ref["world_size"]),
                "global_batch": int(ref["global_batch"])}
    except Exception as e:
        raise ParamError(f"parameter 'reference' expects the results.json of a utils.train run; {path!r} is not one "
                         f"({type(e).__name__}: {e})") from None


def _verdict(result) -> Verdict:
    if result.stop:
        return Verdict("training", status(result.stop), result.stop["message"])
    return Verdict("training", "pass", f"eval loss {result.initial_eval_loss:.3f} -> {result.final_eval_loss:.3f} "
                   f"in {len(result.history)} steps")


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown option, a missing value) in the one-line form of the others."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"utils.train: error: {message}\n")


def _checked_arguments(argv) -> tuple:
    """Every argument checked before a process group starts (a rank waiting for others that have exited would hang): on a
    usage error every rank exits 2, and only rank 0 says why, in one line (--help too)."""
    quiet = os.environ.get("RANK", "0") != "0"
    parser = _OneLineParser(prog="python -m utils.train",
                            description="Fine-tune with tier 3's loop on one or several processes (torchrun).")
    add_arguments(parser, TRAIN_PARAMS)
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull if quiet else sys.stdout), \
            redirect_stderr(devnull if quiet else sys.stderr):
        args = parser.parse_args(argv)
    params = {p.name: getattr(args, p.name) for p in TRAIN_PARAMS}
    try:
        checked = check_values(params, {p.name: p for p in TRAIN_PARAMS}, "utils.train")
        if checked["parallel"] == "fsdp2" and fsdp2_unavailable():
            raise ParamError(fsdp2_unavailable())
        resolve(checked["precision"], dev.resolve_device(checked["device"]))  # fp8 on a CPU: refused here, not on every rank
        return params, _reference(params["reference"])
    except (ParamError, UnsupportedModel) as e:
        if not quiet:
            print(f"utils.train: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def main(argv=None) -> int:
    params, reference = _checked_arguments(argv)
    if "RANK" in os.environ:  # started by torchrun: join its process group, take this rank's device
        params["device"] = str(init_from_env(str(params["device"])))
    r = ranks()
    # What only the model can tell, in one line too: its factory cannot build it, a batch cannot fit, or its loss reaches
    # no weight (found at the first step, before any update).
    try:
        run = prepare_training(None, params)
        p, out = run.params, Path(run.params["output_dir"])
        loop = {q.name: p[q.name] for q in FINE_TUNING if q.name in p}
        config = TrainConfig(**{**loop, "seq_len": run.seq_len,
                                "checkpoint_dir": p["checkpoint_dir"] or str(out / "checkpoints")})
        result = Trainer(run.model, config, run.plan, run.device, run.data).run()
    except (ParamError, ModelLoadError) as e:
        if r.main:
            print(f"utils.train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    summary = result.summary()
    tokens_per_step = p["batch_size"] * p["grad_accum_steps"] * run.seq_len  # one rank's
    per_rank = [tokens_per_step / t for t in gather(summary["median_step_time_s"], r)]
    verdict = _verdict(result)
    stop_reason = (result.stop or {}).get("reason")
    if r.main:
        distributed = {"world_size": r.world, "backend": dist.get_backend() if r.world > 1 else None,
                       "parallel": result.config["parallel"], "global_batch": p["batch_size"] * r.world,
                       "tokens_per_s_per_rank": per_rank, "tokens_per_s_total": sum(per_rank)}
        if reference:  # ideal: N processes give N times one process's tokens/s
            distributed["reference"] = reference
            distributed["scaling_efficiency"] = sum(per_rank) / (reference["tokens_per_s"] * r.world / reference["world_size"])
        write_json_atomic(out / "results.json", {
            "status": verdict.status, "verdict": asdict(verdict), "written_by_rank": r.rank, "parameters": p,
            "record": run.record, "distributed": distributed, "summary": summary,
            "history": result.history.to_dict("list"), "evals": result.eval_history.to_dict("list")})
        plot_training(result.history, result.eval_history, f"{p['model']}: {run.plan.precision}, {r.world} rank(s), "
                      f"{result.config['parallel']}", out / "loss.png")
        print(f"[{verdict.status}] {verdict.reason}; {sum(per_rank):,.0f} tokens/s on {r.world} rank(s)"
              + (f", scaling efficiency {distributed['scaling_efficiency']:.0%}" if reference else "") + f"; results in {out}")
    if r.world > 1:
        # Free the sharded model while the process group is alive: FSDP2's pending gloo work, left for the interpreter's
        # exit, aborted a rank ("terminate called without an active exception") in 5 of 16 loaded runs; here, 0 of 18.
        del run, result
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return EXIT_INTERRUPTED if stop_reason == INTERRUPTED else EXIT_FAILED if verdict.status == "fail" else EXIT_OK


if __name__ == "__main__":
    matplotlib.use("Agg")  # charts are files here, never windows
    sys.exit(main())
