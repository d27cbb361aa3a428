"""How fast a gated engine is: the names of the speed figures the gate records, and which passing
engine is fastest per place (each GPU architecture, and the CPU).

The gate (``trtforge.stages.gate.measure_latency``) times every engine by its runner's own clock
and records flat floats in its metrics: latency at the opt shape, throughput at the opt batch and
at the profile's max batch, and beside each figure the number of timed runs, the warm-up calls
and the spread. The publisher writes the choice per place into the manifest (``fastest``); pulls
and the report read it back. This module needs nothing but the standard library, so the registry
(core install) and the pipeline share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

LATENCY = "latency_ms_median"
OPT_BATCH = "opt_batch"
THROUGHPUT_OPT = "throughput_opt_per_s"
MAX_BATCH = "max_batch"
THROUGHPUT_MAX = "throughput_max_per_s"
BEST_BY = ("latency", "throughput")


def _number(metrics: Mapping[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def latency_ms(metrics: Mapping[str, Any]) -> float | None:
    """The median latency at the opt shape, in ms, where the metrics have it."""
    return _number(metrics, LATENCY)


def best_throughput(metrics: Mapping[str, Any]) -> tuple[float, int] | None:
    """(samples/s, batch) at whichever of the opt and max batch the engine processed more samples per second."""
    measured = [
        (rate, int(batch))
        for rate_name, batch_name in ((THROUGHPUT_OPT, OPT_BATCH), (THROUGHPUT_MAX, MAX_BATCH))
        if (rate := _number(metrics, rate_name)) is not None and (batch := _number(metrics, batch_name)) is not None
    ]
    return max(measured, default=None)


def fastest_per_place(candidates: Iterable[tuple[str, str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per place, of the given (place, tag, gate metrics) of passing targets: the tag with the lowest latency at
    the opt shape and the tag with the highest throughput, with the figures; ties go to the first tag by name.
    A place where no target records a latency is left out; one without throughput figures (engines gated before
    they were recorded) names the latency's pick with its throughput unknown."""
    by_place: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for place, tag, metrics in candidates:
        by_place.setdefault(place, []).append((tag, metrics))
    chosen = {}
    for place, entries in sorted(by_place.items()):
        timed = sorted((latency, tag) for tag, metrics in entries if (latency := latency_ms(metrics)) is not None)
        if not timed:
            continue
        rates = sorted(
            ((-rate, tag, batch) for tag, metrics in entries if (found := best_throughput(metrics)) is not None for rate, batch in [found])
        )
        choice: dict[str, Any] = {"latency": timed[0][1], "latency_ms": timed[0][0]}
        if rates:
            choice.update(throughput=rates[0][1], throughput_per_s=-rates[0][0], throughput_batch=rates[0][2])
        chosen[place] = choice
    return chosen
