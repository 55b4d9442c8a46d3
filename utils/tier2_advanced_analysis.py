"""Tier 2: how does the model behave? `run_tier2` runs these and returns one table of verdicts.

  attention       per layer and head: entropy, max weight, collapsed heads (our models and nn.MultiheadAttention)
  robustness      prediction agreement, KL divergence and flip rate under embedding noise and token substitution
  amp_readiness   the forward in fp32 and under autocast side by side, layer by layer: where does it first drift,
                  which activations leave fp16's range, and is fp16, bf16 or neither safe?
"""

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.loop.config import fitted_seq_len
from utils.models import count_parameters, forward, load_task_data, model_device, model_vocab_size
from utils.measure import beyond_range, layer_comparison
from utils.precision import PrecisionPlan, compared, resolve, safe_fields, short_label, spec
from utils.prepare import Prepared
from utils.verdicts import CheckResult, TierResult, Verdict, run_check


def sample_batch(model: nn.Module, data=None, batch_size: int = 4, seq_len: int = 32, seed: int = 0):
    """Real inputs for the model's task: validation windows of the built-in (or given) data."""
    seq_len = fitted_seq_len(model, seq_len)
    data = load_task_data(model, data, seq_len)
    x, _ = next(iter(data.eval_batches(1, batch_size, seq_len)))
    return x.to(model_device(model))


def _hf_attention(model: nn.Module, x: torch.Tensor) -> dict:
    """A Hugging Face model's attention weights via output_attentions=True. Fused kernels (sdpa, flash)
    return none, so the probe switches to eager attention for this one forward and switches back."""
    impl = model.config._attn_implementation
    was_training = model.training
    model.eval()
    try:
        if impl != "eager":
            model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(x, output_attentions=True)
    finally:
        if impl != "eager":
            model.set_attn_implementation(impl)
        model.train(was_training)
    return {f"layer {i}": a.detach().float() for i, a in enumerate(out.attentions or ())}


def capture_attention(model: nn.Module, x: torch.Tensor) -> dict:
    """Attention weights per layer, {module name: (batch, heads, query, key)}. A module with a `record_attention` flag
    (our SelfAttention, or a user's written the same way) stores them in `last_attention` on request;
    nn.MultiheadAttention is asked for per-head weights by a pre-hook. Grad stays on so that PyTorch's fused inference
    path, which skips the module call, is not taken."""
    weights, handles = {}, []
    ours = [(n, m) for n, m in model.named_modules() if hasattr(m, "record_attention")]
    for _, m in ours:
        m.record_attention = True
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            def pre(module, args, kwargs):
                return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

            def post(module, args, kwargs, output, name=name):
                if output[1] is not None:
                    weights[name] = output[1].detach()
            handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]
    was_training = model.training
    model.eval()
    try:
        forward(model, x)
        for name, m in ours:
            weights[name] = m.last_attention.float()
    finally:
        for _, m in ours:
            m.record_attention, m.last_attention = False, None
        for h in handles:
            h.remove()
        model.train(was_training)
    return weights


def analyze_attention(model: nn.Module, x: torch.Tensor, collapse_max_weight: float = 0.9) -> CheckResult:
    """Entropy and peak weight of every head. A head is collapsed when, on average, one key takes
    more than `collapse_max_weight` of its attention: it passes on a single token's value."""
    hf = hasattr(model, "set_attn_implementation")
    weights = _hf_attention(model, x) if hf else capture_attention(model, x)
    if not weights:
        verdict = Verdict("attention", "warn", "no attention weights found: the model has no nn.MultiheadAttention "
                          "and no module with a `record_attention` flag. To analyze a custom attention, give it "
                          "`record_attention = False` and, when the flag is set, store its softmax output as "
                          "`last_attention` (batch, heads, query, key).")
        return CheckResult(verdict, pd.DataFrame(columns=["layer", "head", "entropy", "normalized_entropy", "max_weight", "collapsed"]))
    broken = [layer for layer, w in weights.items() if not torch.isfinite(w).all()]
    if broken:
        return CheckResult(Verdict("attention", "fail", f"attention weights are NaN/Inf in {len(broken)} layer(s), first "
                                   f"{broken[0]}: the forward itself is non-finite (see Tier 1 numerics)."), pd.DataFrame())
    rows, maps = [], {}
    for layer, w in weights.items():  # (B, H, Tq, Tk)
        allowed = (w > 0).sum(-1).clamp(min=2).float()  # keys each query may see (causal rows see fewer)
        entropy = -(w * w.clamp(min=1e-12).log()).sum(-1)
        norm_entropy = (entropy / allowed.log()).mean(dim=(0, 2))
        max_weight = w.max(-1).values.mean(dim=(0, 2))
        maps[layer] = w.mean(0).cpu()
        for h in range(w.shape[1]):
            rows.append({"layer": layer, "head": h, "entropy": float(entropy[:, h].mean()),
                         "normalized_entropy": float(norm_entropy[h]), "max_weight": float(max_weight[h]),
                         "collapsed": bool(max_weight[h] > collapse_max_weight)})
    df = pd.DataFrame(rows)
    collapsed = df[df["collapsed"]]
    summary = f"{len(df)} heads in {len(weights)} layers; normalized entropy {df['normalized_entropy'].min():.2f}..{df['normalized_entropy'].max():.2f}"
    if hf and model.config._attn_implementation != "eager":
        summary += f" (read with eager attention for this probe; the model runs {model.config._attn_implementation})"
    if len(collapsed) > len(df) / 2:
        verdict = Verdict("attention", "warn", f"{len(collapsed)} of {len(df)} heads are collapsed (one key takes "
                          f">{collapse_max_weight:.0%} of the weight), e.g. {collapsed.iloc[0]['layer']} head "
                          f"{collapsed.iloc[0]['head']}; {summary}. Check attention logit scale (1/sqrt(d_head)) and learning rate.")
    else:
        verdict = Verdict("attention", "pass", f"{summary}; {len(collapsed)} collapsed.")
    return CheckResult(verdict, df, arrays={"maps": maps})


@torch.no_grad()
def analyze_robustness(model: nn.Module, x: torch.Tensor, strengths=(0.01, 0.05, 0.1, 0.2), seed: int = 0,
                       min_agreement: float = 0.9) -> CheckResult:
    """Predictions under embedding noise (Gaussian, std = strength x the embedding output's std) and token substitution
    (a `strength` fraction of tokens replaced at random), at each strength. Agreement is argmax equality with the clean
    prediction; flip rate is 1 - agreement; KL is KL(clean || perturbed) per prediction."""
    device, vocab = model_device(model), model_vocab_size(model) or 256
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    clean = forward(model, x).float()
    if not torch.isfinite(clean).all():
        model.train(was_training)
        return CheckResult(Verdict("robustness", "fail", "the clean outputs are already NaN/Inf, so agreement under "
                                   "perturbation means nothing: fix the forward first (see Tier 1 numerics)."), pd.DataFrame())
    clean_logp = clean.log_softmax(-1)
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    rows = []

    def compare(kind, strength, logits):
        logp = logits.float().log_softmax(-1)
        agreement = float((logp.argmax(-1) == clean_logp.argmax(-1)).float().mean())
        kl = float(F.kl_div(logp, clean_logp, log_target=True, reduction="none").sum(-1).mean())
        rows.append({"perturbation": kind, "strength": strength, "agreement": agreement, "flip_rate": 1 - agreement, "kl": kl})

    for strength in strengths:
        if embedding is not None:
            def add_noise(module, args, output, strength=strength):
                noise = torch.randn(output.shape, generator=g).to(output.device, output.dtype)
                return output + noise * strength * output.std()
            handle = embedding.register_forward_hook(add_noise)
            compare("embedding noise", strength, forward(model, x))
            handle.remove()
        swap = torch.rand(x.shape, generator=g).to(device) < strength
        substituted = torch.where(swap, torch.randint(vocab, x.shape, generator=g).to(device), x)
        compare("token substitution", strength, forward(model, substituted))
    model.train(was_training)
    df = pd.DataFrame(rows)
    weakest = df[df["strength"] == min(strengths)]
    fragile = weakest[weakest["agreement"] < min_agreement]
    note = "" if embedding is not None else " (no nn.Embedding found: embedding noise skipped)"
    if len(fragile):
        r = fragile.iloc[0]
        verdict = Verdict("robustness", "warn", f"fragile: {r['perturbation']} at strength {r['strength']:g} already flips "
                          f"{r['flip_rate']:.0%} of predictions (KL {r['kl']:.3g}).{note} Consider regularization "
                          "(dropout, label smoothing) or noise augmentation.")
    else:
        strongest = df[df["strength"] == max(strengths)]
        verdict = Verdict("robustness", "pass", "agreement at strength " + f"{min(strengths):g}: "
                          + ", ".join(f"{r.perturbation} {r.agreement:.0%}" for r in weakest.itertuples())
                          + f"; at {max(strengths):g}: " + ", ".join(f"{r.perturbation} {r.agreement:.0%}" for r in strongest.itertuples())
                          + "." + note)
    return CheckResult(verdict, df)


def analyze_amp_readiness(model: nn.Module, x: torch.Tensor, plan: PrecisionPlan, tolerance: float = 0.05) -> CheckResult:
    """Forward in fp32 and under autocast (each compared precision, and the plan's), layer by layer: relative error
    ||amp - fp32|| / ||fp32|| and the fp32 activation max. A layer drifts when its error passes `tolerance`; an activation
    beyond a precision's largest value (fp16: 65504) overflows it. The table holds the errors of `plan`'s precision;
    every precision compared decides the verdict on which is safe."""
    device = model_device(model)
    plans = [plan if p == plan.precision else resolve(p, device) for p in compared()]
    plans += [] if plan.precision in compared() else [plan]  # fp8: float8 Linear layers, on the copy it prepares
    ref, df = layer_comparison(model, x, plans)
    if not torch.isfinite(ref["<output>"]).all():
        return CheckResult(Verdict("amp_readiness", "fail", "the fp32 forward is already NaN/Inf: that is the model, not "
                                   "mixed precision (see Tier 1 numerics); AMP readiness cannot be judged."), pd.DataFrame())
    df["rel_error"] = df[f"rel_error_{plan.precision}"]
    df["drifts"] = df["rel_error"] > tolerance
    return _readiness_verdict(df, [p.precision for p in plans], plan, tolerance)


def _readiness_verdict(df: pd.DataFrame, precisions: list, plan: PrecisionPlan, tolerance: float) -> CheckResult:
    """Which precisions are safe (no overflow, output error within tolerance), the first layer to blame, the verdict."""
    def first(mask):
        hit = df[mask & (df["layer"] != "<output>")]
        return hit.iloc[0]["layer"] if len(hit) else None

    overflows = {p: df[f"nonfinite_{p}"] | df.get(beyond_range(p), False) for p in precisions}
    safe, why = {}, {}
    for p in precisions:
        out_err = float(df[df["layer"] == "<output>"][f"rel_error_{p}"].iloc[0])
        overflow, drift = first(overflows[p]), first(df[f"rel_error_{p}"] > tolerance)
        safe[p] = overflow is None and out_err <= tolerance
        why[p] = (f"overflows at {overflow}" if overflow else f"output error {out_err:.2%}" +
                  (f", first drifting layer {drift}" if drift else ""))
    both, ok = compared(), [p for p in compared() if safe[p]]
    names, findings = [short_label(p) for p in both], "; ".join(f"{short_label(p)}: {why[p]}" for p in why)
    extra = {"table_precision": plan.precision, "tolerance": tolerance, "first_drift_layer": first(df["drifts"]),
             **{f"first_{spec(p).short}_overflow_layer": first(overflows[p]) for p in both if spec(p).largest},
             **safe_fields(safe)}
    if not ok:
        verdict = Verdict("amp_readiness", "fail", f"neither {' nor '.join(names)} is safe (tolerance {tolerance:.0%}): "
                          f"{findings}. Keep the named layer in fp32 (autocast(enabled=False) around it) or rescale its "
                          "activations.")
    elif len(ok) < len(both):
        verdict = Verdict("amp_readiness", "warn", f"only {', '.join(map(short_label, ok))} is safe (tolerance "
                          f"{tolerance:.0%}): {findings}. Use {ok[0]}.")
    else:
        limits = ", ".join(f"{spec(p).short} limit {spec(p).largest:g}" for p in both if spec(p).largest)
        verdict = Verdict("amp_readiness", "pass", f"{' and '.join(names)} both safe (tolerance {tolerance:.0%}): "
                          f"{findings}; max activation {df['fp32_max_abs'].max():.3g} ({limits}).")
    if not safe[plan.precision] and verdict.status == "pass":  # the precision asked for is the one that drifts
        out = "out of float8 (module_filter_fn)" if plan.fp8 else "in fp32 (fp32_modules)"
        verdict = Verdict("amp_readiness", "warn", f"{' and '.join(names)} are safe but {short_label(plan.precision)} is "
                          f"not (tolerance {tolerance:.0%}): {findings}. Keep the named layer {out} or use {short_label(ok[-1])}.")
    return CheckResult(verdict, df, extra)


def run_tier2(run: Prepared) -> TierResult:
    """All Tier 2 analyses on a prepared run (utils.prepare), on real inputs."""
    p, model = run.params, run.model
    x = sample_batch(model, run.data, p["batch_size"], run.seq_len, p["seed"])
    checks = {"attention": lambda: analyze_attention(model, x),
              "robustness": lambda: analyze_robustness(model, x, p["strengths"], p["seed"]),
              "amp_readiness": lambda: analyze_amp_readiness(model, x, run.plan, p["amp_tolerance"])}
    checks = {name: run_check(name, check) for name, check in checks.items()}
    return TierResult(2, checks, p, run.record, {"parameters": count_parameters(model)})
