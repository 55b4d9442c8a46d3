"""When AMP is not safe for a model: why, and which remedy works.

The probes run on a re-run of the failing AMP parity run (same weights, data, seed and schedule, so the same steps), never
in the speed trials. Forward hooks find the first layer and step whose output leaves the precision's range (a 16-bit output
past its largest value, fp16's 65504, is inf); gradient hooks, the first parameters whose gradients are non-finite before
unscaling; the loss-scale history, when the scale collapsed. With neither, the layers whose outputs drift most from fp32 on
one batch are to blame. Then remedies, in order within a budget of runs, each a parity run judged by the tier's rule: the
blamed layers in fp32, bf16 instead of fp16, a gentler GradScaler. The first that passes is the answer; none is one too.
"""

import math
from dataclasses import replace

import torch
import torch.nn as nn

from utils.measure import first_floating, layer_comparison
from utils.precision import PrecisionPlan, label

GENTLE_SCALER = {"init_scale": 2.0 ** 8, "growth_interval": 500}  # a scale that starts low and grows rarely
DRIFT_LAYERS = 3  # layers reported when outputs drift without overflowing


class _Seen(Exception):
    """The probe saw the failing step: the rest of the re-run would add nothing."""


class Probe:
    """Hooks on every module's output and every parameter's gradient per training step, for a diagnostic re-run (a host
    read per module: too slow for the speed trials, fine here). on_step_end is the loop's callback."""

    def __init__(self, model: nn.Module, until: int):
        self.step, self.until = 0, until
        self.activation = self.gradients = None
        self.handles = [model.register_forward_pre_hook(self._count)]
        self.handles += [m.register_forward_hook(self._watch(name)) for name, m in model.named_modules() if name]
        self.handles += [p.register_hook(self._grad(name)) for name, p in model.named_parameters() if p.requires_grad]

    def _count(self, module, args):
        if torch.is_grad_enabled() and module.training:  # a training forward: evaluation runs under no_grad
            self.step += 1

    def _watch(self, name: str):
        def hook(module, args, output):
            t = first_floating(output)
            if self.activation is not None or t is None or not t.numel() or not torch.is_grad_enabled():
                return
            peak = float(t.detach().abs().max())
            if not math.isfinite(peak):  # out of range: a 16-bit output past its largest value is already inf
                self.activation = {"layer": name, "max_abs": peak, "step": self.step}  # the innermost: it finishes first
        return hook

    def _grad(self, name: str):
        """The first step with a non-finite gradient, and the parameters of the latest such step, in the order
        backward made them: early steps overflow while the GradScaler calibrates; the latest name the culprit."""
        def hook(grad):
            if torch.isfinite(grad).all():
                return
            if self.gradients is None or self.gradients["step"] != self.step:
                first = self.gradients["first_step"] if self.gradients else self.step
                self.gradients = {"first_step": first, "step": self.step, "parameters": []}
            if name not in self.gradients["parameters"]:
                self.gradients["parameters"].append(name)
        return hook

    def on_step_end(self, record: dict):
        if record["step"] >= self.until or self.activation:
            raise _Seen

    def remove(self):
        for h in self.handles:
            h.remove()


def probe_rerun(model: nn.Module, plan: PrecisionPlan, until: int, train) -> tuple:
    """The (activation, gradients) findings of a Probe on a re-run of the failing run, up to its first finding or step
    `until`. train(plan, model, callbacks) runs the parity run's loop (and raises the caller's stop if interrupted)."""
    model = plan.prepare(model)
    probe = Probe(model, until)
    try:
        train(plan, model, [probe])
    except _Seen:
        pass
    finally:
        probe.remove()
    return probe.activation, probe.gradients


def drifting_layers(model: nn.Module, x: torch.Tensor, plan: PrecisionPlan) -> list:
    """The layers whose outputs differ most from fp32 under `plan` on batch x: [{layer, rel_error}], worst first."""
    column = f"rel_error_{plan.precision}"
    df = layer_comparison(model, x, [plan])[1]
    df = df[df["layer"] != "<output>"].nlargest(DRIFT_LAYERS, column)
    return [{"layer": layer, "rel_error": float(err)} for layer, err in zip(df["layer"], df[column])]


def cause(plan: PrecisionPlan, activation, gradients, collapse, drift) -> dict:
    """What failed, why, and the modules a remedy keeps in fp32: from the first finding that explains it."""
    precision = label(plan.precision)
    if activation:
        value = "Inf/NaN" if not math.isfinite(activation["max_abs"]) else f"{activation['max_abs']:.3g}"
        text = f"{activation['layer']!r} output {value} at step {activation['step']} under {precision}{plan.out_of_range()}"
        return {"kind": "activation", "text": text, "layers": [activation["layer"]], **activation}
    if gradients:
        first = gradients["parameters"][0]
        text = (f"the gradients of {', '.join(map(repr, gradients['parameters'][:3]))} were non-finite before unscaling "
                f"(from step {gradients['first_step']} to step {gradients['step']})")
        if collapse:
            text += (f"; the loss scale collapsed {collapse['from']:g} -> {collapse['to']:g}, below 1 at step "
                     f"{collapse['step']}: {first!r} overflows even unscaled")
        return {"kind": "gradient", "text": text, "layers": [first.rpartition(".")[0]] if "." in first else [],
                "first_step": gradients["first_step"], "step": gradients["step"], "parameters": gradients["parameters"],
                "collapse": collapse}
    if drift:
        text = "no overflow; the outputs that drift most from fp32 are " + ", ".join(
            f"{d['layer']!r} ({d['rel_error']:.1%})" for d in drift)
        return {"kind": "drift", "text": text, "layers": [drift[0]["layer"]], "drift": drift}
    return {"kind": "unknown", "text": "no layer overflowed or drifted on the probed steps", "layers": []}


def candidates(found: dict, plan: PrecisionPlan, device: torch.device) -> list:
    """The remedies worth a run for this cause, most specific first: [(what, plan)]."""
    out, kept = [], plan.fp32_modules  # what the user already keeps in fp32 stays so in every remedy
    if found["layers"]:
        out.append((f"{', '.join(found['layers'])} in fp32",
                    replace(plan, fp32_modules=tuple(dict.fromkeys((*kept, *found["layers"]))))))
    if alternative := plan.alternative(device):
        out.append(alternative)
    if plan.use_scaler:
        out.append((f"a gentler loss scale (initial {GENTLE_SCALER['init_scale']:g}, doubling after "
                    f"{GENTLE_SCALER['growth_interval']} clean steps)", replace(plan, **GENTLE_SCALER)))
    return out


def try_remedies(options: list, budget: int, train, judge, fp32_step_s: float) -> tuple:
    """The rows of each remedy's parity run, in order, until one passes or `budget` runs are spent. judge(result): the
    parity figures and their problems (none: it passes); train raises the caller's stop if a run is interrupted."""
    rows = []
    for what, plan in options[:budget]:
        result = train(plan, None, ())
        rows.append(remedy_row(what, result, *judge(result), fp32_step_s))
        if rows[-1]["passed"]:
            break
    return rows


def remedy_row(what: str, result, parity: dict, problems: list, fp32_step_s: float) -> dict:
    """One line of the remedy table: its parity figures, and the median step time of its parity run with its speedup
    over the fp32 parity run's (single runs, not interleaved trials: a hint of what the remedy costs, not a verdict)."""
    step_s = float(result.history["step_time_s"].median())
    return {"remedy": what, "precision": result.plan.precision, "fp32_modules": ", ".join(result.plan.fp32_modules),
            "max_relative_gap": parity["max_relative_gap"], "final_eval_relative_gap": parity["final_eval_relative_gap"],
            "skipped_steps": parity["skipped_steps"], "median_step_time_s": step_s,
            "speedup_vs_fp32_parity_run": fp32_step_s / step_s, "passed": not problems, "problems": "; ".join(problems)}
