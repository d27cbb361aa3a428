"""Prefect flows: the DAG of trtforge's stages, built from the tasks in ``tasks/``."""

# The library modules the flows import, none of which imports Prefect: the CLI imports them while Prefect's
# temporary server decides whether it is needed (trtforge.flows.temporary_api), on a core that would wait.
LIBRARY_MODULES = (
    "trtforge.backends",
    "trtforge.calibration",
    "trtforge.ci",
    "trtforge.evalset",
    "trtforge.headstart",
    "trtforge.lineage",
    "trtforge.localcache",
    "trtforge.parallelism",
    "trtforge.registry",
    "trtforge.report",
    "trtforge.routing",
    "trtforge.stages.build",
    "trtforge.stages.check_ops",
    "trtforge.stages.checkpoint",
    "trtforge.stages.convert_precision",
    "trtforge.stages.export",
    "trtforge.stages.gate",
    "trtforge.stages.ladder",
    "trtforge.stages.latency_gate",
    "trtforge.stages.publish",
    "trtforge.stages.reference",
    "trtforge.stages.sensitivity",
    "trtforge.stages.simplify",
    "trtforge.stages.validate_calibration",
    "trtforge.staging",
    "trtforge.summary",
    "trtforge.watch",
)
