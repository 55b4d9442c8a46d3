"""The fine-tuning loop, `Trainer(model, TrainConfig(steps=60), plan, device).run()`: one code path for fp32 and mixed
precision, in named phases (each a Trainer method): set up, resume, train step (it reads nothing back to the host), log point
(the pending records in one transfer), stop check (Ctrl-C/SIGTERM on any rank, a NaN loss, an overflow storm), checkpoint.
Under precision '32' autocast and the GradScaler are no-ops, so fp32 and AMP runs differ in precision alone.
"""

import itertools
import math
import time
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from utils.loop import stops
from utils.loop.compile import compile_model
from utils.loop.checkpoint import clear_checkpoints, load_latest, save_checkpoint, structure_digest
from utils.loop.config import TrainConfig, fitted_seq_len
from utils.loop.distributed import gather, load_training_state, mean_over_ranks, ranks, rows, training_state, wrap
from utils.loop.steps import RECORD, LRSchedule, adamw, evaluate, log_interval, param_groups, to_device, train_step, warmup_cosine
from utils.measure import StepTimer
from utils.models import check_fp32_master_weights, checkpoint_blocks, load_model, load_task_data, model_vocab_size
from utils.params import ParamError
from utils import device as dev
from utils.precision import PrecisionPlan, convert_for


@dataclass
class FineTuneResult:
    """What a fine-tuning run did, step by step, and where it ended."""

    history: pd.DataFrame       # one row per optimizer step
    eval_history: pd.DataFrame  # one row per evaluation (step 0 is before training)
    plan: PrecisionPlan
    model: nn.Module = field(repr=False)
    config: dict = field(default_factory=dict)
    stop: dict = None  # why the run ended early (interrupted, overflow_storm, nonfinite_loss), else None
    checkpoints: dict = field(default_factory=dict)  # folder, files written, where it resumed from, notes
    loop_seconds: float = 0.0  # wall time of the training loop: its steps, log points, evaluations, checkpoints

    effective_precision = property(lambda self: self.plan.precision)
    precision_reason = property(lambda self: self.plan.reason)
    interrupted = property(lambda self: bool(self.stop) and self.stop["reason"] == stops.INTERRUPTED)

    def _eval(self, column: str, row: int):
        """None when no evaluation ran (eval_batches=0): there is no loss to report, and NaN would read as a diverged run."""
        return float(self.eval_history[column].iloc[row]) if len(self.eval_history) else None

    initial_eval_loss = property(lambda self: self._eval("eval_loss", 0))
    final_eval_loss = property(lambda self: self._eval("eval_loss", -1))
    final_perplexity = property(lambda self: self._eval("perplexity", -1))

    def summary(self) -> dict:
        """JSON-ready figures for reports and the batch runner."""
        timed = self.history.iloc[min(2, len(self.history) - 1):]  # the first steps warm up
        return {"precision": self.plan.to_dict(), **self.config,
                "initial_eval_loss": self.initial_eval_loss, "final_eval_loss": self.final_eval_loss,
                "final_perplexity": self.final_perplexity,
                "median_step_time_s": float(timed["step_time_s"].median()),
                "median_tokens_per_s": float(timed["tokens_per_s"].median()),
                "stop": self.stop, "checkpoints": self.checkpoints, **amp_summary(self.history)}


def amp_summary(history: pd.DataFrame) -> dict:
    """AMP statistics over a run's per-step history (loss_scale and skipped per step)."""
    if len(history) == 0:
        return {"steps": 0, "skipped_steps": 0, "nonfinite_grad_steps": 0, "final_loss_scale": None, "min_loss_scale": None}
    return {"steps": int(len(history)), "skipped_steps": int(history["skipped"].sum()),
            "nonfinite_grad_steps": int(history["nonfinite_grads"].sum()),
            "final_loss_scale": float(history["loss_scale"].iloc[-1]), "min_loss_scale": float(history["loss_scale"].min())}


def check_batch_fits(model: nn.Module, batch_size: int, seq_len: int, device: torch.device, name: str = "batch_size"):
    """A batch whose token ids and fp32 logits alone (a lower bound on a step's memory) exceed the device's memory is
    refused before training, naming the largest that could fit; unchecked where the memory is not known."""
    memory = dev.memory_bytes(device)
    if memory is None:
        return
    if getattr(model, "task", None) == "classification":
        per_sequence = 8 * (seq_len + 1)  # int64 token ids and a label
    else:  # int64 token ids and targets, and fp32 logits over the output width at every position
        width = getattr(model, "suite_output_width", None) or model_vocab_size(model) or 0
        per_sequence = seq_len * (16 + 4 * width)
    if batch_size * per_sequence > memory:
        raise ParamError(f"parameter {name!r}: {batch_size:,} sequences of {seq_len} tokens need at least "
                         f"{batch_size * per_sequence / 2**30:,.1f} GiB for one step's token ids and fp32 logits alone, "
                         f"more than the device's {memory / 2**30:,.1f} GiB; expected at most {memory // per_sequence:,}")


class Trainer:
    """One fine-tuning run of `model` (an nn.Module or a load_model spec) under `plan` on `device`.
    callbacks: objects with an optional on_step_end(record), called once per step, in order, at log points."""

    def __init__(self, model, config: TrainConfig, plan: PrecisionPlan, device: torch.device, data=None, callbacks=(),
                 progress: bool = True):
        self.cfg, self.plan, self.device, self.callbacks, self.progress = config, plan, device, callbacks, progress
        self.r = ranks()
        self.parallel = config.parallel if self.r.world > 1 else "none"
        torch.manual_seed(config.seed + self.r.rank)  # dropout masks, if the model has any (each rank its own)
        self.model = load_model(model).to(device)
        check_fp32_master_weights(self.model)  # before any step: a 16-bit model would train on rounded weights
        self.model = convert_for(plan, self.model).train()  # fp8: float8 Linear layers; fp32_modules kept in fp32
        if config.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.cfg = config = replace(config, seq_len=fitted_seq_len(self.model, config.seq_len))
        self.data = load_task_data(self.model, data, config.seq_len)
        check_batch_fits(self.model, config.batch_size, config.seq_len, device)
        self._count_steps()
        self._build()
        self.records, self.evals, self.saved, self.notes, self.resumed_from = [], None, [], [], None
        self.start, self.micro_done, self.stop = 0, 0, None

    def _count_steps(self):
        """Micro-batches to run, and optimizer steps as windows of grad_accum_steps (the last may be partial); every rank
        draws the same global batch (batch_size x world) and keeps its rows."""
        cfg = self.cfg
        self.global_batch = cfg.batch_size * self.r.world
        if cfg.epochs is not None:
            self.micro_total = max(1, math.ceil(cfg.epochs * self.data.train_tokens / (self.global_batch * cfg.seq_len)))
        else:
            self.micro_total = cfg.steps * cfg.grad_accum_steps
        self.total_steps = math.ceil(self.micro_total / cfg.grad_accum_steps)
        self.micro_asked = self.micro_total  # make_up_skipped adds the skipped windows' micro-batches to it
        self.warmup_steps = max(1, self.total_steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps

    def _build(self):
        """What the run reports and a checkpoint must match; the wrapped model, AdamW, schedule, scaler, data generator."""
        cfg, r, device = self.cfg, self.r, self.device
        corpus = getattr(self.data, "source", "classification")
        self.config = {"steps": self.total_steps, "micro_batches": self.micro_total, "batch_size": cfg.batch_size,
                       "seq_len": cfg.seq_len, "lr": cfg.lr, "grad_accum_steps": cfg.grad_accum_steps, "seed": cfg.seed,
                       "device": str(device), "corpus": corpus, "corpus_fingerprint": getattr(self.data, "fingerprint", None),
                       "world_size": r.world, "parallel": self.parallel}
        # What a checkpoint must match to be resumed here: the same model, precision, data and schedule.
        made_up = {"make_up_skipped": True} if cfg.make_up_skipped else {}  # only where set: identities stay as they were
        self.identity = {"model": structure_digest(self.model), "precision": self.plan.precision,
                         **self.plan.remedies(), **made_up, "data": f"{corpus}:{self.config['corpus_fingerprint']}",
                         **{k: self.config[k] for k in ("steps", "micro_batches", "batch_size", "seq_len", "grad_accum_steps",
                                                        "seed", "world_size", "parallel")},
                         "lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_steps": self.warmup_steps,
                         "max_grad_norm": cfg.max_grad_norm}
        self.net = wrap(self.model, self.parallel, self.plan, device) if r.world > 1 else self.model
        self.optimizer = adamw(param_groups(self.net, cfg.weight_decay), cfg.lr, device, sharded=self.parallel == "fsdp2")
        self.config["optimizer"] = "AdamW (fused)" if self.optimizer.defaults["fused"] else "AdamW (foreach)"
        self.train_net = self.net  # what the training steps call: the compiled model when asked; evaluation stays eager
        if cfg.compile:
            self.train_net, self.config["compile"] = compile_model(self.net, self.data, self.plan, device,
                                                                   self.global_batch, cfg.seq_len, r, cfg.seed)
        self.schedule = LRSchedule(self.optimizer, cfg.lr, warmup_cosine(self.warmup_steps, self.total_steps),
                                   self.total_steps, device)
        self.scaler = self.plan.loss_scaler(sharded=self.parallel == "fsdp2")
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def resume(self):
        """Continue from the newest valid checkpoint of this run (resume=True), else start a fresh folder."""
        folder = self.cfg.checkpoint_dir
        if folder and self.cfg.resume:
            state, path, self.notes = load_latest(folder, self.identity)
            for note in self.notes if self.r.main else ():
                print(note)
            if state is not None:
                self._load(state)
                self.resumed_from = str(path)
        elif folder and self.r.main:
            clear_checkpoints(folder)
        if self.evals is None:
            self.evals = self.evaluate(0)

    def _load(self, state: dict):
        load_training_state(self.net, self.optimizer, state["model"], state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"][self.r.rank])
        if state["rng"]["cuda"]:
            dev.set_rng_state(state["rng"]["cuda"][self.r.rank], self.device)
        self.start, self.micro_done, self.records, self.evals = (state[k] for k in ("step", "micro_done", "history", "evals"))

    def checkpoint(self, step: int):
        """A collective under FSDP2: every rank gathers, rank 0 writes."""
        r, device = self.r, self.device
        model_state, optimizer_state = training_state(self.net, self.optimizer)
        rng = {"torch": gather(torch.get_rng_state(), r), "data": self.generator.get_state(),
               "cuda": gather(dev.rng_state(device), r) if device.type == "cuda" else []}
        if r.main:
            self.saved.append(str(save_checkpoint(self.cfg.checkpoint_dir, {
                "identity": self.identity, "config": self.config, "step": step, "micro_done": self.micro_done,
                "model": model_state, "optimizer": optimizer_state, "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "history": self.records, "evals": self.evals},
                self.cfg.keep_checkpoints)))

    def evaluate(self, step: int) -> list:
        """[the evaluation at `step`], or [] with eval_batches=0 (the benchmark times steps alone)."""
        if self.cfg.eval_batches == 0:
            return []
        loss = evaluate(self.net, self.data, self.plan, self.device, self.cfg.batch_size, self.cfg.seq_len,
                        self.cfg.eval_batches, self.r)
        return [{"step": step, "eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}]

    def run(self) -> FineTuneResult:
        self.resume()
        cfg, self.making_up = self.cfg, self.cfg.make_up_skipped and self.plan.use_scaler
        # Making up skips retries a skipped step's batch: its record is read every step, before the next draw.
        log_every = 1 if self.making_up else log_interval(cfg.log_every, self.device)
        self.in_a_row = sum(1 for _ in itertools.takewhile(lambda rec: rec["skipped"], reversed(self.records)))
        self.pending, self.windows, self.timer = [], [], StepTimer(self.device)  # records still on the device
        self.bar = tqdm(total=self.total_steps, initial=self.start, desc=f"fine-tune [{self.plan.precision}]",
                        disable=not self.progress or not self.r.main, leave=False)
        self.end, step = self.total_steps, self.start
        self.extend()  # a resumed run makes up the skips it had already
        loop_start = time.perf_counter()
        with stops.stop_requests() as stop_asked:
            while step < self.end:
                step += 1
                batches = self.train_step()
                periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                if not (step % log_every == 0 or step % cfg.eval_interval == 0 or periodic or step == self.end
                        or (self.r.world == 1 and stop_asked())):  # under torchrun, ranks agree on a stop at log points
                    continue
                broke_at, storm = self.log_point(step)
                last = step == self.extend()  # the end moves only once the skips are read
                if self.making_up and self.records[-1]["skipped"]:
                    self.generator.set_state(self.drawn_from)  # the step that makes it up draws the same batch
                if step % cfg.eval_interval == 0 or last:
                    self.evals += self.evaluate(step)
                self.stop = self.stop_check(step, stop_asked, broke_at, storm, batches[-1][0])
                if cfg.checkpoint_dir and ((cfg.checkpoint_every and (periodic or last))
                                           or (self.stop and self.stop["reason"] == stops.INTERRUPTED)):
                    self.checkpoint(step)
                if self.stop:
                    break
        self.bar.close()
        return self.result(time.perf_counter() - loop_start)

    def extend(self) -> int:
        """The last step: total_steps, and when making up (make_up_skipped, with a GradScaler) one more for each skipped
        step read so far (at most total_steps more), each the skipped window's micro-batches again."""
        if self.making_up:
            retried = [rec["micro_batches"] for rec in self.records if rec["skipped"]][:self.total_steps]
            self.micro_total = self.micro_asked + sum(retried)  # each retry draws its skipped window again, as it was
            self.end = self.bar.total = self.total_steps + len(retried)
        return self.end

    def train_step(self) -> list:
        """One optimizer step over this window's micro-batches; its record stays pending on the device."""
        window = min(self.cfg.grad_accum_steps, self.micro_total - self.micro_done)
        self.timer.start()
        self.drawn_from = self.generator.get_state()
        batches = [tuple(to_device(rows(t, self.r), self.device)
                         for t in self.data.get_batch("train", self.global_batch, self.cfg.seq_len, self.generator))
                   for _ in range(window)]
        self.pending.append(train_step(self.net, self.train_net, batches, self.scaler, self.optimizer, self.schedule,
                                       self.cfg.max_grad_norm, self.parallel, self.device))
        self.timer.stop()
        self.windows.append(window)
        self.micro_done += window
        return batches

    def log_point(self, step: int):
        """The pending records in one transfer (loss averaged over ranks), then callbacks and progress: (broke_at, storm)."""
        values, loss = torch.stack(self.pending), RECORD.index("loss")
        values[:, loss] = mean_over_ranks(values[:, loss], self.r)
        first, broke_at, storm = step - len(self.pending) + 1, None, None
        tokens_per_micro = self.global_batch * self.cfg.seq_len
        for n, (row, window, dt) in enumerate(zip(values.tolist(), self.windows, self.timer.read())):
            record = {"step": first + n, **dict(zip(RECORD, row)), "micro_batches": window, "step_time_s": dt,
                      "tokens_per_s": window * tokens_per_micro / dt}
            record["skipped"], record["nonfinite_grads"] = bool(record["skipped"]), bool(record["nonfinite_grads"])
            self.records.append(record)
            for cb in self.callbacks if self.r.main else ():
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(record)
            self.in_a_row = self.in_a_row + 1 if record["skipped"] else 0
            if self.cfg.max_skipped_in_a_row and self.in_a_row >= self.cfg.max_skipped_in_a_row:
                storm = (self.in_a_row, record["step"])
            if broke_at is None and not math.isfinite(record["loss"]):
                broke_at = record["step"]
        self.pending, self.windows = [], []
        self.bar.update(step - first + 1)
        self.bar.set_postfix(loss=f"{self.records[-1]['loss']:.3f}", refresh=False)
        return broke_at, storm

    def stop_check(self, step: int, stop_asked, broke_at, storm, x: torch.Tensor):
        """Stop early: asked to (any rank), or training broke (decided from values every rank shares)."""
        if mean_over_ranks(float(stop_asked()), self.r) > 0:
            return stops.interrupted(step, self.end, self.cfg.checkpoint_dir)
        if self.cfg.max_skipped_in_a_row and broke_at is not None and not self.plan.use_scaler:
            return stops.diagnosis(stops.NONFINITE_LOSS, step, broke_at, 1, self.records, self.net, x, self.plan)
        if storm:
            return stops.diagnosis(stops.OVERFLOW_STORM, step, storm[1], storm[0], self.records, self.net, x, self.plan)
        return None

    def result(self, loop_seconds: float) -> FineTuneResult:
        eval_history = pd.DataFrame(self.evals, columns=["step", "eval_loss", "perplexity"])
        checkpoints = {"dir": str(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else None, "saved": self.saved,
                       "resumed_from": self.resumed_from, "notes": self.notes}
        return FineTuneResult(pd.DataFrame(self.records), eval_history, self.plan, self.model, self.config, self.stop,
                              checkpoints, loop_seconds)
