"""Targets in parallel: one run of three CPU targets against three runs of one, and at one job against the worker's cores.

Through the real CLI (``trtforge run --json``, Prefect's ephemeral API, a directory registry),
on the bundled digits example with three onnxruntime CPU targets (fp32, fp16, int8), runs:

- the three targets in one run, one job at a time (``TRTFORGE_PARALLEL=1``);
- the three targets in one run, as many jobs as the worker has cores (the default);
- each target alone, in three runs: what a user pays without multi-target runs.

Every run is cold: its own registry and artifacts folder, so nothing is cached. The checkpoint
is trained once beforehand and copied into each, and one run before the timed ones sets up the
Prefect home, so no timed run pays for either. It prints each run's wall seconds and the build
stage's (conversions, builds, gates), and the ratios: the three-target run over the sum of the
three single runs (the goal: below 1), and the default over one job at a time.

    python benchmarks/parallel_targets.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from pipeline import Run, digits_spec, run_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trtforge.environment import worker_cores  # noqa: E402
from trtforge.parallelism import PARALLEL_ENVIRONMENT  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


def spec_for(folder: Path, checkpoint: Path, precisions: tuple[str, ...]) -> Path:
    spec = digits_spec(folder)
    data = yaml.safe_load(spec.read_text())
    (folder / "checkpoints").mkdir(exist_ok=True)
    shutil.copy(checkpoint, data["checkpoint"])
    data["targets"] = [{"backend": "onnxruntime", "device": "cpu", "precision": p, "required": True} for p in precisions]
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


def build_seconds(run: Run) -> float:
    return sum(s["seconds"] for s in run.stages if s["stage"] == "build")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trtforge-bench-parallel-") as scratch:
        root = Path(scratch)
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != PARALLEL_ENVIRONMENT}
        environment["PREFECT_HOME"] = str(root / "prefect-home")
        warm_up = root / "warm-up"
        warm_up.mkdir()
        # Trains the checkpoint the timed runs copy, and migrates the Prefect home's database.
        run_cli("digits", "warm-up", digits_spec(warm_up), warm_up, environment)
        checkpoint = next((warm_up / "checkpoints").glob("*.safetensors"))

        def cold(name: str, precisions: tuple[str, ...], jobs: int | None) -> Run:
            folder = root / name
            folder.mkdir()
            env = environment if jobs is None else {**environment, PARALLEL_ENVIRONMENT: str(jobs)}
            return run_cli("digits", name, spec_for(folder, checkpoint, precisions), folder, env)

        runs = {
            "three targets, 1 job": cold("three-1", PRECISIONS, 1),
            f"three targets, {worker_cores()} jobs (default)": cold("three-default", PRECISIONS, None),
            **{f"{p} alone": cold(f"alone-{p}", (p,), None) for p in PRECISIONS},
        }
    one_job, default, *alone = runs.values()
    found = {
        "three_targets_over_three_runs": default.wall_seconds / sum(r.wall_seconds for r in alone),
        "default_over_one_job": default.wall_seconds / one_job.wall_seconds,
        "default_over_one_job_build_stage": build_seconds(default) / build_seconds(one_job),
    }
    if args.json:
        print(
            json.dumps(
                {
                    "runs": {name: {"wall_seconds": r.wall_seconds, "build_seconds": build_seconds(r)} for name, r in runs.items()},
                    "ratios": found,
                    "goal_met": found["three_targets_over_three_runs"] < 1,
                    "worker_cores": worker_cores(),
                },
                indent=2,
            )
        )
        return
    print(f"digits, onnxruntime CPU targets {', '.join(PRECISIONS)}, {worker_cores()} cores, cold runs")
    for name, run in runs.items():
        print(f"  {name:32s} wall {run.wall_seconds:7.1f} s   build stage {build_seconds(run):6.1f} s")
    for name, value in found.items():
        print(f"  {name:36s} = {value:.2f}")


if __name__ == "__main__":
    main()
