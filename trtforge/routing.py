"""Where a target gets built: here, on the build-target deployment of its work pool, or nowhere (and why)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from trtforge.backends.base import Availability
from trtforge.spec import Target

BUILD_TARGET_FLOW = "build-target"


class RouteKind(str, Enum):
    LOCAL = "local"
    DEPLOYMENT = "deployment"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    reason: str = ""
    deployment: str | None = None
    details: tuple[str, ...] = ()


def deployment_name(pool: str) -> str:
    """Build deployments are named after their pool: ``build-target/gpu-sm90``."""
    return f"{BUILD_TARGET_FLOW}/{pool}"


def route_target(target: Target, local: Availability, deployment_problem: Callable[[str], str | None]) -> Route:
    """Decide where ``target`` is built.

    ``local`` says whether this process can build it; ``deployment_problem(name)`` returns None
    when that deployment exists and something serves it, else what is missing. A target that
    names its own work pool goes there even when it could be built here: the user asked for it.
    """
    pool = target.pool
    if local.available and target.work_pool is None:
        return Route(RouteKind.LOCAL)
    if pool is None:
        return Route(RouteKind.UNAVAILABLE, local.reason)
    name = deployment_name(pool)
    problem = deployment_problem(name)
    if problem is None:
        return Route(RouteKind.DEPLOYMENT, deployment=name)
    if local.available:
        return Route(RouteKind.LOCAL)
    arch = getattr(target, "arch", None)
    what = f"no GPU worker for {arch}" if arch else f"no worker for pool {pool}"
    return Route(
        RouteKind.UNAVAILABLE,
        f"{what}: start a worker on pool {pool}, or remove the target",
        details=(f"deployment {name}: {problem}", f"not buildable here: {local.reason}"),
    )
