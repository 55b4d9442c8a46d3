"""Tier 1: does the model work at all? Seven checks (run_tier1 runs all), each its data and a Verdict whose reason names the
input, parameter or batch size at fault and what to try: shapes (edge-case inputs), causality, gradient_flow (one backward on
real data), numerics, initialization, memory (per batch size, stopping cleanly at out-of-memory), latency (p50/p95/p99)."""

import math
import re
import time

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from utils.loop.config import fitted_seq_len
from utils.models import (compute_loss, count_parameters, forward, load_task_data, model_device, model_max_len, model_task,
                          model_vocab_size)
from utils.measure import saved_activation_bytes
from utils import device as dev
from utils.precision import PrecisionPlan
from utils.prepare import Prepared
from utils.verdicts import CheckResult, TierResult, Verdict, run_check


# A bias on the key projection shifts every score of a query by the same amount, which softmax removes:
# its gradient is exactly zero (BERT's attention.self.key.bias, OPT's k_proj.bias, DistilBERT's k_lin.bias).
KEY_BIAS = re.compile(r"(^|\.)(k_proj|key|k_lin|k)\.bias$")


def _random_tokens(vocab: int, batch: int, seq: int, generator, device) -> torch.Tensor:
    return torch.randint(vocab, (batch, seq), generator=generator).to(device)


def check_shapes(model: nn.Module, seed: int = 0) -> CheckResult:
    """Output shapes over edge cases (batch 1, sequence 1, the maximum length, padding, mixed content), against the
    shape a reference input implies: (B, T, vocab) for a causal LM, (B, classes) for a classifier."""
    device, vocab, max_len = model_device(model), model_vocab_size(model) or 256, model_max_len(model)
    g = torch.Generator().manual_seed(seed)
    ref_len = min(8, max_len)
    model.eval()
    with torch.no_grad():
        ref = forward(model, _random_tokens(vocab, 2, ref_len, g, device))
    task, width = model_task(model, ref), ref.shape[-1]
    n = min(16, max_len)
    padded_mask = torch.ones(2, n, dtype=torch.long, device=device)
    padded_mask[1, n // 2:] = 0  # second row: half padding
    mixed = torch.stack([torch.zeros(n, dtype=torch.long), torch.full((n,), vocab - 1, dtype=torch.long),  # 0, the max id
                         torch.randint(vocab, (n,), generator=g)]).to(device)
    cases = [("batch 1", _random_tokens(vocab, 1, ref_len, g, device), None),
             ("sequence length 1", _random_tokens(vocab, 2, 1, g, device), None),
             (f"maximum length {max_len}", _random_tokens(vocab, 2, max_len, g, device), None),
             ("padding mask", _random_tokens(vocab, 2, padded_mask.shape[1], g, device), padded_mask),
             ("mixed content (zeros, max id, random)", mixed, None)]
    rows = []
    for name, x, mask in cases:
        want = (len(x), width) if task == "classification" else (*x.shape, width)
        try:
            with torch.no_grad():
                out = forward(model, x, mask)
            got, error = tuple(out.shape), ""
        except Exception as e:  # a crash on an edge case is the finding, not a reason to stop
            got, error = None, f"{type(e).__name__}: {e}"
        rows.append({"case": name, "input_shape": tuple(x.shape), "expected_shape": want, "output_shape": got,
                     "ok": got == want, "error": error})
    df = pd.DataFrame(rows)
    bad = df[~df["ok"]]
    if len(bad):
        first = bad.iloc[0]
        detail = first["error"] or f"got {first['output_shape']}, expected {first['expected_shape']}"
        verdict = Verdict("shapes", "fail", f"{len(bad)} of {len(df)} edge cases failed; first: {first['case']} "
                          f"(input {first['input_shape']}): {detail}. Check that the output follows the input's "
                          "batch and sequence length (no fixed sizes in reshapes or position tables).")
    else:
        verdict = Verdict("shapes", "pass", f"all {len(df)} edge cases give {task} shapes (last dim {width}), "
                          f"including sequence length 1 and the maximum {max_len}.")
    return CheckResult(verdict, df, {"task": task, "output_width": width})


def check_causality(model: nn.Module, seq_len: int = 32, seed: int = 0) -> CheckResult:
    """A causal LM's logits at position t may depend on tokens 0..t only: change the second half of the
    input, and the first half's logits must not move (beyond float noise)."""
    task, empty = model.task, pd.DataFrame(columns=["position", "max_abs_change", "leaked"])
    if task != "causal-lm":
        return CheckResult(Verdict("causality", "pass", f"not applicable: a {task} model sees the whole sequence by design."),
                           empty)
    device, vocab = model_device(model), model_vocab_size(model) or 256
    T = max(2, min(seq_len, 16))
    cut, g = T // 2, torch.Generator().manual_seed(seed)
    x = _random_tokens(vocab, 2, T, g, device)
    changed = x.clone()
    changed[:, cut:] = (x[:, cut:] + 1 + _random_tokens(vocab - 1, 2, T - cut, g, device)) % vocab  # every later token differs
    model.eval()
    with torch.no_grad():  # the same input twice first: a model whose outputs move by themselves leaks nothing
        # detached: a model may hand back a tensor that asks for a gradient even here (a fresh leaf), and only values are read
        a, again, b = (forward(model, t).detach().float() for t in (x, x, changed))
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return CheckResult(Verdict("causality", "fail", "the outputs are NaN/Inf, so causality cannot be judged "
                                   "(see numerics)."), empty)
    tolerance = 1e-5 * max(1.0, float(a.abs().max()))
    noise = float((a - again).abs().max()) if torch.isfinite(again).all() else math.inf
    if noise > tolerance:
        return CheckResult(Verdict("causality", "fail", f"the same input, twice in eval mode, gave logits {noise:.2g} apart: "
                                   "the model is nondeterministic (dropout or noise active in eval()?), so whether it sees "
                                   "future tokens cannot be judged. Make eval() deterministic."), empty)
    change = (a - b).abs().amax(dim=(0, 2)).cpu()
    df = pd.DataFrame({"position": range(T), "max_abs_change": change.numpy(), "leaked": (change > tolerance).numpy()})
    df.loc[df["position"] >= cut, "leaked"] = False  # those positions saw the change legitimately
    leaked = df[df["leaked"]]
    if len(leaked):
        verdict = Verdict("causality", "fail", f"the logits at position {int(leaked['position'].iloc[0])} change when only "
                          f"tokens {cut}..{T - 1} change: the model sees future tokens. A causal LM needs a causal attention "
                          "mask; if it is a masked LM, pass task='masked-lm'.")
    else:
        verdict = Verdict("causality", "pass", f"changing tokens {cut}..{T - 1} leaves the logits of positions 0..{cut - 1} "
                          f"unchanged (largest change {float(change[:cut].max()):.2g}).")
    return CheckResult(verdict, df)


def check_gradient_flow(model: nn.Module, data=None, batch_size: int = 4, seq_len: int = 32, seed: int = 0,
                        vanishing: float = 1e-8, exploding: float = 1e3) -> CheckResult:
    """One forward + backward on real data; every trainable parameter's gradient norm, classified."""
    device = model_device(model)
    seq_len = fitted_seq_len(model, seq_len)
    data = load_task_data(model, data, seq_len)
    x, y = data.get_batch("train", batch_size, seq_len, torch.Generator().manual_seed(seed))
    model.train()
    model.zero_grad(set_to_none=True)
    loss = compute_loss(model, x.to(device), y.to(device))
    if loss.requires_grad:  # a loss computed under no_grad has no graph: no parameter gets a gradient, the finding below
        loss.backward()
    loss = loss.detach()
    rows = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        norm = float("nan") if p.grad is None else float(p.grad.norm())
        status = ("unused" if p.grad is None else "nan" if not np.isfinite(norm) else "vanishing" if norm < vanishing
                  else "exploding" if norm > exploding else "ok")
        note = ""
        if status == "vanishing" and KEY_BIAS.search(name):
            status, note = "ok", "zero by design: softmax is invariant to a bias added to every key"
        rows.append({"parameter": name, "shape": tuple(p.shape), "grad_norm": norm, "status": status, "note": note})
    model.zero_grad(set_to_none=True)
    df = pd.DataFrame(rows)

    def names(status):
        listed = list(df[df["status"] == status]["parameter"])
        return ", ".join(listed[:5]) + (f" (+{len(listed) - 5} more)" if len(listed) > 5 else "")

    counts = df["status"].value_counts()
    if counts.get("nan", 0):
        verdict = Verdict("gradient_flow", "fail", f"NaN/Inf gradients in {counts['nan']} parameter(s): {names('nan')}. "
                          f"Loss was {float(loss):.4g}; look for log(0), division by zero or overflow in the forward.")
    elif counts.get("unused", 0) == len(df):
        verdict = Verdict("gradient_flow", "fail", f"none of the model's {len(df)} parameters gets a gradient: the loss "
                          "is cut off from every weight (.detach() or no_grad in the forward), so training cannot change "
                          "it. Compute the logits from the weights with autograd on.")
    elif counts.get("unused", 0):
        verdict = Verdict("gradient_flow", "fail", f"{counts['unused']} parameter(s) get no gradient: {names('unused')}. "
                          "They are not used in the forward or are cut off by .detach()/no_grad; remove them or "
                          "reconnect them (DDP will also refuse them without find_unused_parameters).")
    elif counts.get("vanishing", 0) or counts.get("exploding", 0):
        parts = [f"{counts.get(s, 0)} {s} ({names(s)})" for s in ("vanishing", "exploding") if counts.get(s, 0)]
        verdict = Verdict("gradient_flow", "warn", "gradient norms out of range: " + "; ".join(parts) + f" (bounds "
                          f"{vanishing:g}..{exploding:g}). Check initialization scale, normalization and the learning rate.")
    else:
        verdict = Verdict("gradient_flow", "pass", f"all {len(df)} parameters receive finite gradients "
                          f"(norms {df['grad_norm'].min():.2g}..{df['grad_norm'].max():.2g}); loss {float(loss):.3f}.")
    return CheckResult(verdict, df, {"loss": float(loss)})


def check_numerics(model: nn.Module, n_batches: int = 8, batch_size: int = 4, seq_len: int = 32, seed: int = 0,
                   large: float = 1e4) -> CheckResult:
    """NaN/Inf and statistics of the outputs over random, repeated-token and extreme-id inputs."""
    device, vocab = model_device(model), model_vocab_size(model) or 256
    seq_len = fitted_seq_len(model, seq_len)
    g = torch.Generator().manual_seed(seed)
    model.eval()
    rows = []
    for i in range(n_batches):
        kind = ("random", "repeated token", "extreme ids")[i % 3]
        if kind == "random":
            x = _random_tokens(vocab, batch_size, seq_len, g, device)
        elif kind == "repeated token":
            x = torch.full((batch_size, seq_len), int(torch.randint(vocab, (1,), generator=g)), device=device)
        else:
            x = torch.randint(2, (batch_size, seq_len), generator=g).to(device) * (vocab - 1)  # ids 0 and vocab-1
        with torch.no_grad():
            out = forward(model, x).detach().float()  # values only, whatever the model's output asks of autograd
        finite = torch.isfinite(out)
        vals = out[finite]
        rows.append({"batch": i, "input": kind, "nan": int(torch.isnan(out).sum()), "inf": int(torch.isinf(out).sum()),
                     "mean": float(vals.mean()) if vals.numel() else float("nan"),
                     "std": float(vals.std()) if vals.numel() > 1 else float("nan"),
                     "max_abs": float(vals.abs().max()) if vals.numel() else float("nan")})
    df = pd.DataFrame(rows)
    bad = df[(df["nan"] > 0) | (df["inf"] > 0)]
    if len(bad):
        first = bad.iloc[0]
        verdict = Verdict("numerics", "fail", f"non-finite outputs in {len(bad)} of {len(df)} batches (first: batch "
                          f"{first['batch']}, {first['input']} input: {first['nan']} NaN, {first['inf']} Inf). Look for "
                          "log/sqrt of non-positive values, division by zero or masked softmax rows with no allowed key.")
    elif df["max_abs"].max() > large:
        verdict = Verdict("numerics", "warn", f"outputs reach {df['max_abs'].max():.3g} (> {large:g}): finite, but "
                          "large logits saturate softmax and overflow fp16 (max 65504). Check the output scale.")
    elif (df["std"] < 1e-6).any():
        verdict = Verdict("numerics", "warn", "outputs are constant across positions and classes (std < 1e-6): "
                          "the model ignores its input, often zero-initialized output layers.")
    else:
        verdict = Verdict("numerics", "pass", f"{len(df)} batches, all outputs finite (|max| {df['max_abs'].max():.3g}, "
                          f"std {df['std'].min():.3g}..{df['std'].max():.3g}).")
    return CheckResult(verdict, df)


def check_initialization(model: nn.Module, tiny: float = 1e-4, huge: float = 1.0, huge_embedding: float = 1.5) -> CheckResult:
    """Per-parameter mean and std: all-zero matrices (units never differentiate) and tiny or huge stds are flagged, 1-D
    tensors (biases, norm gains) may be constant; embeddings get their own bound (nn.Embedding's default init is N(0, 1))."""
    embeddings = {f"{m_name}.weight".lstrip(".") for m_name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    rows = []
    for name, p in model.named_parameters():
        t = p.detach().float()
        std = float(t.std()) if t.numel() > 1 else 0.0
        status, limit = "ok", huge_embedding if name in embeddings else huge
        if p.dim() >= 2:
            status = "all_zero" if not t.any() else "tiny_std" if std < tiny else "huge_std" if std > limit else "ok"
        rows.append({"parameter": name, "shape": tuple(p.shape), "mean": float(t.mean()), "std": std, "status": status})
    df = pd.DataFrame(rows)
    zero, odd = df[df["status"] == "all_zero"], df[df["status"].isin(["tiny_std", "huge_std"])]
    if len(zero):
        verdict = Verdict("initialization", "fail", f"{len(zero)} weight matrix(es) are all zero: "
                          f"{', '.join(zero['parameter'][:5])}. Every unit then gets the same gradient and they never "
                          "differentiate; initialize with nn.init.normal_(std=0.02) or xavier/kaiming.")
    elif len(odd):
        first = odd.iloc[0]
        verdict = Verdict("initialization", "warn", f"{len(odd)} weight matrix(es) with unusual std (bounds {tiny:g}..{huge:g}); "
                          f"first: {first['parameter']} std={first['std']:.3g}. Check the init scale against its fan-in.")
    else:
        mats = df[df["shape"].map(len) >= 2]
        verdict = Verdict("initialization", "pass", f"{len(mats)} weight matrices with std {mats['std'].min():.3g}.."
                          f"{mats['std'].max():.3g}; no all-zero weights.")
    return CheckResult(verdict, df)


def check_memory(model: nn.Module, plan: PrecisionPlan, batch_sizes=(1, 2, 4, 8, 16), seq_len: int = 32,
                 seed: int = 0) -> CheckResult:
    """Training-step memory per batch size (the CUDA allocator's peak; on a CPU the activations saved for backward),
    stopping at the first out-of-memory with the largest batch that fit."""
    device, vocab = model_device(model), model_vocab_size(model) or 256
    seq_len = fitted_seq_len(model, seq_len)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        task = model_task(model, forward(model, _random_tokens(vocab, 1, 2, g, device)))
    rows, oom_at = [], None
    for bs in batch_sizes:
        x = _random_tokens(vocab, bs, seq_len, g, device)
        y = torch.zeros(bs, dtype=torch.long, device=device) if task == "classification" else x
        try:
            if device.type == "cuda":
                dev.start_peak(device, release_cached=True)
                with plan.autocast():
                    loss = compute_loss(model, x, y)
                if loss.requires_grad:  # no graph (no_grad in the forward): nothing to go back through; gradient_flow says so
                    loss.backward()
                dev.synchronize(device)
                measured, kind = dev.peak_bytes(device), "cuda_peak_allocated"
            else:
                measured, kind = saved_activation_bytes(model, plan, (x, y)), "saved_activations"
        except Exception as e:
            if not dev.out_of_memory(e):
                raise
            oom_at = bs
            break
        finally:
            model.zero_grad(set_to_none=True)
        rows.append({"batch_size": bs, "seq_len": seq_len, "bytes": measured, "measure": kind})
    df = pd.DataFrame(rows, columns=["batch_size", "seq_len", "bytes", "measure"])
    if df.empty:
        verdict = Verdict("memory", "fail", f"out of memory already at batch {batch_sizes[0]} x {seq_len} tokens: "
                          "use a smaller model, shorter sequences, AMP, or activation checkpointing.")
    elif oom_at is not None:
        verdict = Verdict("memory", "warn", f"out of memory at batch {oom_at}; largest batch that fit: "
                          f"{int(df['batch_size'].iloc[-1])} ({df['bytes'].iloc[-1] / 2**20:.1f} MiB). Use gradient accumulation "
                          "to reach larger effective batches.")
    else:
        sizes, mib = df["batch_size"], df["bytes"] / 2**20
        per_sample = (mib.iloc[-1] - mib.iloc[0]) / max(1, sizes.iloc[-1] - sizes.iloc[0])
        verdict = Verdict("memory", "pass", f"batch sizes {list(sizes)} all fit; {df['measure'].iloc[0]} grow by "
                          f"{per_sample:.2f} MiB per sample at {seq_len} tokens (largest: {mib.iloc[-1]:.1f} MiB).")
    return CheckResult(verdict, df, {"largest_batch": int(df["batch_size"].iloc[-1]) if len(df) else 0, "oom_at": oom_at})


def check_latency(model: nn.Module, batch_size: int = 1, seq_len: int = 32, warmup: int = 3, iters: int = 30,
                  seed: int = 0, jitter: float = 3.0, jitter_floor_ms: float = 1.0) -> CheckResult:
    """Inference latency after warm-up, synchronized: p50/p95/p99 and tokens/s. A tail over `jitter` times the median
    warns, unless within `jitter_floor_ms` of it (sub-millisecond wobble is scheduler noise, not the model's)."""
    device, vocab = model_device(model), model_vocab_size(model) or 256
    seq_len = fitted_seq_len(model, seq_len)
    x = _random_tokens(vocab, batch_size, seq_len, torch.Generator().manual_seed(seed), device)
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            dev.synchronize(device)
            t0 = time.perf_counter()
            forward(model, x)
            dev.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    df = pd.DataFrame({"iteration": range(iters), "latency_ms": ms})
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    stats = {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "tokens_per_s": batch_size * seq_len / (p50 / 1000)}
    shape = f"batch {batch_size} x {seq_len} tokens on {device.type}"
    if p99 > jitter * p50 and p99 - p50 > jitter_floor_ms:
        verdict = Verdict("latency", "warn", timing=True, reason=f"p50 {p50:.2f} ms but p99 {p99:.2f} ms ({shape}): tail latency "
                          f"over {jitter:g}x the median; look for data-dependent work, allocator churn or a busy machine.")
    else:
        verdict = Verdict("latency", "pass", timing=True, reason=f"p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms "
                          f"({shape}); {stats['tokens_per_s']:.0f} tokens/s.")
    return CheckResult(verdict, df, stats)


def run_tier1(run: Prepared) -> TierResult:
    """All Tier 1 checks on a prepared run (utils.prepare): checks run in fp32 on the one resolved device."""
    model, seq_len, seed, data = run.model, run.seq_len, run.params["seed"], run.data
    was_training = model.training
    checks = {"shapes": lambda: check_shapes(model, seed),
              "causality": lambda: check_causality(model, seq_len, seed),
              "gradient_flow": lambda: check_gradient_flow(model, data, seq_len=seq_len, seed=seed),
              "numerics": lambda: check_numerics(model, seq_len=seq_len, seed=seed),
              "initialization": lambda: check_initialization(model),
              "memory": lambda: check_memory(model, run.plan, run.params["batch_sizes"], seq_len, seed=seed),
              "latency": lambda: check_latency(model, seq_len=seq_len, iters=run.params["latency_iters"], seed=seed)}
    checks = {name: run_check(name, check) for name, check in checks.items()}
    model.train(was_training)
    return TierResult(1, checks, run.params, run.record, {"parameters": count_parameters(model)})
