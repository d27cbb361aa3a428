"""Where a run's time goes: the stages against the pipeline's own overhead, cold and unchanged.

In one process tree, through the real CLI (``trtforge run --json``, Prefect's ephemeral API,
a directory registry), runs:

- digits, cold: the bundled example into a fresh registry and a fresh artifacts folder, its
  checkpoint trained on the spot;
- digits, unchanged: the same command again, which must answer ``up to date``;
- ResNet-50, cold and unchanged: torchvision's architecture with random weights (seeded), an
  onnxruntime fp32 and int8 target, 32 eval images and 64 calibration images.

For each run it prints the wall time of the command, each stage's seconds (from the run's
``stages``), the orchestration seconds (wall minus the time some stage ran, the union of the
stages' intervals: process start, imports, Prefect's server, task bookkeeping, teardown) and
the ratios the pipeline promises: an unchanged re-run at most 5% of a cold one and under 2 s on digits; orchestration at most 10% of
a cold digits run and 3% of a cold ResNet-50 run.

With ``--server persistent`` the runs use a ``prefect server start`` launched (and waited for)
before the first run, as a team with a long-lived local server has; the default, ``temporary``,
is what ``trtforge run`` does without ``PREFECT_API_URL``: a temporary server per run.

    python benchmarks/pipeline.py [--models digits resnet50] [--server temporary|persistent] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trtforge.flows.temporary_api import api_healthy  # noqa: E402

DIGITS = REPO / "examples" / "digits"
RESNET_EVAL_IMAGES = 32
RESNET_CALIBRATION_IMAGES = 64
GOALS = {
    "unchanged_over_cold": 0.05,
    "digits_unchanged_seconds": 2.0,
    "digits_orchestration_share": 0.10,
    "resnet50_orchestration_share": 0.03,
}


@dataclass
class Run:
    model: str
    kind: str
    wall_seconds: float
    exit_code: int
    up_to_date: bool
    stages: list[dict] = field(default_factory=list)

    @property
    def stage_seconds(self) -> float:
        """The time some stage ran: the union of the stages' intervals, as stages overlap (the head start beside
        the flow's first tasks, targets built in parallel)."""
        intervals = sorted((s["started_at"], s["started_at"] + s["seconds"]) for s in self.stages)
        covered, reached = 0.0, float("-inf")
        for start, end in intervals:
            covered += max(0.0, end - max(start, reached))
            reached = max(reached, end)
        return covered

    @property
    def orchestration_seconds(self) -> float:
        return self.wall_seconds - self.stage_seconds


def digits_spec(folder: Path) -> Path:
    """The bundled example with its paths made absolute and its checkpoint in ``folder`` (so it trains)."""
    data = yaml.safe_load((DIGITS / "spec.yaml").read_text())
    data.update(
        model=f"{DIGITS / 'digits_model.py'}:build_model",
        train=f"{DIGITS / 'digits_train.py'}:train",
        checkpoint=str(folder / "checkpoints" / "digits-cnn.safetensors"),
    )
    data["eval"]["data"] = str(DIGITS / "eval.npz")
    data["calibration"]["data"] = str((DIGITS / data["calibration"]["data"]).resolve())
    data.pop("watch", None)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def resnet50_spec(folder: Path) -> Path:
    """ResNet-50 with seeded random weights: what the pipeline costs on a model of real size."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    checkpoint = folder / "resnet50.safetensors"
    save_file(torchvision.models.resnet50().state_dict(), str(checkpoint))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((RESNET_EVAL_IMAGES + RESNET_CALIBRATION_IMAGES, 3, 224, 224), dtype=np.float32)
    np.savez(folder / "eval.npz", input=images[:RESNET_EVAL_IMAGES])
    np.savez(folder / "calibration.npz", input=images[RESNET_EVAL_IMAGES:])
    spec = {
        "name": "resnet50-bench",
        "model": "torchvision.models:resnet50",
        "checkpoint": str(checkpoint),
        "inputs": [
            {"name": "input", "dtype": "float32", "shape": ["batch", 3, 224, 224], "dynamic": {"batch": {"min": 1, "opt": 8, "max": 32}}}
        ],
        "outputs": [{"name": "logits"}],
        "export": {"opset": 18, "tolerance": 1.0e-3},
        "eval": {"data": str(folder / "eval.npz"), "task": "raw", "labels": None, "batch_size": 8},
        "calibration": {"data": str(folder / "calibration.npz"), "min_samples": RESNET_CALIBRATION_IMAGES, "min_per_class": 0},
        "targets": [
            {"backend": "onnxruntime", "device": "cpu", "precision": "fp32", "required": True},
            {"backend": "onnxruntime", "device": "cpu", "precision": "int8", "required": True},
        ],
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(model: str, kind: str, spec: Path, folder: Path, environment: dict[str, str]) -> Run:
    command = [
        str(Path(sys.executable).with_name("trtforge")),
        "run",
        str(spec),
        "--registry",
        f"file://{folder / 'registry'}",
        "--artifacts",
        str(folder / "artifacts"),
        "--json",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    wall = time.perf_counter() - started
    start = done.stdout.find("\n{") + 1 if not done.stdout.startswith("{") else 0
    try:
        printed, _ = json.JSONDecoder().raw_decode(done.stdout, start)
    except json.JSONDecodeError:
        sys.exit(f"{model} {kind}: the run printed no JSON object (exit {done.returncode}):\n{done.stderr[-4000:]}")
    if done.returncode != 0:
        sys.exit(f"{model} {kind}: the run failed (exit {done.returncode}): {printed.get('message')}")
    return Run(model, kind, wall, done.returncode, bool(printed["up_to_date"]), printed.get("stages", []))


def ratios(runs: dict[tuple[str, str], Run]) -> dict[str, float]:
    found: dict[str, float] = {}
    for model in {m for m, _ in runs}:
        cold, unchanged = runs.get((model, "cold")), runs.get((model, "unchanged"))
        if cold is None:
            continue
        found[f"{model}_orchestration_share"] = cold.orchestration_seconds / cold.wall_seconds
        if unchanged is not None:
            found[f"{model}_unchanged_over_cold"] = unchanged.wall_seconds / cold.wall_seconds
            found[f"{model}_unchanged_seconds"] = unchanged.wall_seconds
    return found


def verdicts(found: dict[str, float]) -> dict[str, bool]:
    checks = {}
    for name, value in found.items():
        goal = GOALS.get(name) or (GOALS["unchanged_over_cold"] if name.endswith("_unchanged_over_cold") else None)
        if goal is not None:
            checks[name] = value <= goal
    return checks


def print_table(runs: dict[tuple[str, str], Run], found: dict[str, float], checks: dict[str, bool]) -> None:
    for run in runs.values():
        print(
            f"\n{run.model} {run.kind}: wall {run.wall_seconds:.2f} s, stages {run.stage_seconds:.2f} s, orchestration {run.orchestration_seconds:.2f} s"
        )
        for stage in run.stages:
            notes = ("  (cached)" if stage["cached"] else "") + ("  (head start)" if stage["head_start"] else "")
            print(f"  {stage['stage']:<22} {stage['seconds']:8.2f} s{notes}")
    print()
    for name, value in sorted(found.items()):
        goal = GOALS.get(name) or (GOALS["unchanged_over_cold"] if name.endswith("_unchanged_over_cold") else None)
        verdict = "" if name not in checks else f"  goal <= {goal:g}: {'met' if checks[name] else 'NOT met'}"
        print(f"{name:<34} {value:8.3f}{verdict}")


SERVER_START_TIMEOUT_S = 300


def prepare_prefect_home(environment: dict[str, str]) -> float:
    """The first use of a Prefect home (its database migrated, Prefect's block types registered): once per machine,
    so done here, timed apart from the runs, as every run but a machine's first finds it done."""
    first_use = "from trtforge.flows.temporary_api import TemporaryApi\napi = TemporaryApi.start()\napi.wait_ready()\napi.stop()"
    started = time.perf_counter()
    timeout = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(SERVER_START_TIMEOUT_S)}
    subprocess.run([sys.executable, "-c", first_use], env={**environment, **timeout}, check=True)
    return time.perf_counter() - started


@contextlib.contextmanager
def persistent_server(environment: dict[str, str], log: Path) -> Iterator[str]:
    """``prefect server start`` on a free loopback port, healthy before it is used; its API URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).with_name("prefect"))
    with open(log, "w") as output:
        server = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=environment, stdout=output, stderr=output
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not api_healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"prefect server did not become healthy (exit {server.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield api
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("digits", "resnet50"), default=["digits", "resnet50"])
    parser.add_argument(
        "--server", choices=("temporary", "persistent"), default="temporary", help="Prefect's API: per run (default) or one started first"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    runs: dict[tuple[str, str], Run] = {}
    with tempfile.TemporaryDirectory(prefix="trtforge-bench-pipeline-") as scratch, contextlib.ExitStack() as stack:
        root = Path(scratch)
        # A Prefect home of its own; PREFECT_API_URL unset: a temporary API server per run.
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        environment["PREFECT_HOME"] = str(root / "prefect-home")
        if args.server == "persistent":
            environment["PREFECT_API_URL"] = stack.enter_context(persistent_server(environment, root / "prefect-server.log"))
            home_setup = None
        else:
            home_setup = prepare_prefect_home(environment)
        makers = {"digits": digits_spec, "resnet50": resnet50_spec}
        for model in args.models:
            folder = root / model
            folder.mkdir()
            spec = makers[model](folder)
            for kind in ("cold", "unchanged"):
                runs[(model, kind)] = run_cli(model, kind, spec, folder, environment)
            if not runs[(model, "unchanged")].up_to_date:
                sys.exit(f"{model}: the unchanged re-run was not up to date")
    found = ratios(runs)
    checks = verdicts(found)
    if args.json:
        payload = {
            "runs": [
                asdict(r) | {"stage_seconds": r.stage_seconds, "orchestration_seconds": r.orchestration_seconds} for r in runs.values()
            ],
            "ratios": found,
            "goals_met": checks,
            "server": args.server,
            "prefect_home_setup_seconds": home_setup,
            "cpu_count": os.cpu_count(),
        }
        print(json.dumps(payload, indent=2))
    else:
        if home_setup is not None:
            print(f"first use of the Prefect home (once per machine, not in the runs): {home_setup:.2f} s")
        print_table(runs, found, checks)


if __name__ == "__main__":
    main()
