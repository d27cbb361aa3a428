"""The latency gate across targets: ``min_speedup_over``, once every target of the run is gated.

``gate: {min_speedup_over: fp16}`` on an int8 target asks that the int8 engine be faster at the opt
shape than the fp16 engine of the same backend on the same place (CPU, or one GPU architecture),
both measured in this run by the runner's own clock; ``{precision: fp16, factor: 1.5}`` asks for
more than 1.5x as fast. An int8 engine slower than fp16 is a known outcome on some GPUs
(NVIDIA/TensorRT#3197): quantize-dequantize pairs the builder cannot fuse cost more than int8
kernels save. Such a target becomes ``failed`` with the two latencies as its reason: left out of the
version when optional, stopping the publish when required.

The other target's measured latency counts whether or not it passed its own gate (a speed is a
speed). When it has none (unavailable, its build or conversion failed), the rule cannot be checked
and the target fails with that reason: a guarantee that could not be checked is not given. That the
other target exists at all is checked when the spec is loaded. ``max_latency_ms`` needs no other
target and is the gate's own (``trtforge.stages.gate.latency_failures``).
"""

from __future__ import annotations

from trtforge import speed
from trtforge.backends.base import get_backend, shape_profile_tag
from trtforge.spec import ModelSpec, Target
from trtforge.stages.gate import effective_thresholds
from trtforge.summary import TargetOutcome, TargetStatus


def target_of(spec: ModelSpec, outcome: TargetOutcome) -> Target | None:
    """The spec's target an outcome is of, by its tag: ``<prefix><runtime>-<place>-<precision>-<profile>``, whichever
    runtime version (here or on a GPU worker) built it."""
    profile = shape_profile_tag(spec)
    for target in spec.targets:
        if (
            target.backend == outcome.backend
            and outcome.tag.startswith(get_backend(target.backend).tag_prefix)
            and outcome.tag.endswith(f"-{target.place}-{target.precision.value}-{profile}")
        ):
            return target
    return None


def apply_speedup_gates(spec: ModelSpec, outcomes: list[TargetOutcome]) -> None:
    """Fail, in place, each measured target whose ``min_speedup_over`` rule is not met; a met rule becomes a note."""
    owned = [(outcome, target) for outcome in outcomes if (target := target_of(spec, outcome)) is not None]
    by_precision = {(t.backend, t.place, t.precision): o for o, t in owned}
    for outcome, target in owned:
        rule = effective_thresholds(spec, target).min_speedup_over
        latency = speed.latency_ms(outcome.metrics)
        # A target that never reached its gate has failed for its own reason already.
        if rule is None or rule.precision is target.precision or latency is None:
            continue
        mine, theirs = target.precision.value, rule.precision.value
        label = f"min_speedup_over: {theirs}" + (f", factor {rule.factor:g}" if rule.factor != 1 else "")
        other = by_precision.get((target.backend, target.place, rule.precision))
        other_latency = speed.latency_ms(other.metrics) if other else None
        if other is None or other_latency is None:
            why = f"{other.tag} {other.status.value}: {other.reason}" if other else "no such target in this run"
            _fail(
                outcome,
                f"{mine} latency {latency:.3g} ms could not be compared with {theirs} on {target.place} ({label}): the "
                f"{target.backend} {theirs} target has no measured latency ({why})",
            )
            continue
        ratio = other_latency / latency
        compared = f"{mine} latency {latency:.3g} ms is {ratio:.2f}x as fast as {theirs}'s {other_latency:.3g} ms on {target.place}"
        if ratio > rule.factor:
            outcome.notes.append(f"{compared} ({label})")
        elif rule.factor == 1:
            _fail(
                outcome, f"{mine} latency {latency:.3g} ms is not faster than {theirs}'s {other_latency:.3g} ms on {target.place} ({label})"
            )
        else:
            _fail(outcome, f"{compared}, not more than {rule.factor:g}x ({label})")


def _fail(outcome: TargetOutcome, failure: str) -> None:
    outcome.failures.append(failure)
    outcome.reason = "; ".join(part for part in (outcome.reason, failure) if part)
    outcome.status = TargetStatus.FAILED
