"""How many of a run's conversions and builds run at once: TRTFORGE_PARALLEL, the spec's ``parallel``, the worker's cores.

The bound is checked on the task runs a real flow run leaves in Prefect (their start and end
times), never on how long anything took: that the bound speeds a run up is for
benchmarks/parallel_targets.py to show.
"""

from __future__ import annotations

import pytest

from tests.flow_harness import run_flow, write_spec
from trtforge.environment import worker_cores
from trtforge.errors import TrtforgeError
from trtforge.parallelism import PARALLEL_ENVIRONMENT, parallel_jobs
from trtforge.spec import load_spec

THREE_CPU_TARGETS = [{"backend": "onnxruntime", "device": "cpu", "precision": p} for p in ("fp32", "fp16", "int8")]


@pytest.fixture()
def spec_with(tmp_path, digits_checkpoint):
    def make(**changes):
        return write_spec(tmp_path / "spec", digits_checkpoint, targets=THREE_CPU_TARGETS, **changes)

    return make


def test_the_environment_overrides_the_spec_which_overrides_the_cores(spec_with, monkeypatch):
    monkeypatch.delenv(PARALLEL_ENVIRONMENT, raising=False)
    assert parallel_jobs(load_spec(spec_with())) == worker_cores()
    assert parallel_jobs(load_spec(spec_with(parallel=3))) == 3
    monkeypatch.setenv(PARALLEL_ENVIRONMENT, "1")
    assert parallel_jobs(load_spec(spec_with(parallel=3))) == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_a_bad_environment_value_is_named_with_the_fix(spec_with, monkeypatch, value):
    monkeypatch.setenv(PARALLEL_ENVIRONMENT, value)
    with pytest.raises(TrtforgeError) as caught:
        parallel_jobs(load_spec(spec_with()))
    assert str(caught.value).startswith(f"{PARALLEL_ENVIRONMENT}={value!r} is not a whole number of at least 1: set it to")


def test_parallel_is_no_input_of_the_engines(spec_with):
    assert load_spec(spec_with(parallel=4)).sha256() == load_spec(spec_with()).sha256()


def _most_at_once(runs) -> int:
    """The most of ``runs`` running at one instant, from their recorded start and end times."""
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs], key=lambda edge: (edge[0], edge[1]))
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


@pytest.mark.usefixtures("prefect_api")
def test_one_job_at_a_time_runs_conversions_and_builds_one_after_another(tmp_path, spec_with, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    monkeypatch.setenv(PARALLEL_ENVIRONMENT, "1")
    state = run_flow(spec_with(parallel=3), tmp_path, return_state=True)
    summary = state.result()
    assert summary.published
    assert {t.precision: t.status.value for t in summary.targets} == {"fp32": "passed", "fp16": "passed", "int8": "passed"}
    build = next(s for s in summary.stages if s.stage.value == "build")
    assert build.detail.endswith("1 at a time")
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    conversions = [r for r in runs if r.name.startswith("convert-precision-")]
    builds = [r for r in runs if r.name.startswith("build-and-gate-target-")]
    assert len(conversions) == 3 and len(builds) == 3
    assert all(r.start_time and r.end_time for r in conversions + builds)
    assert _most_at_once(conversions + builds) == 1
    # A converted target's build goes before the conversions still waiting: it never waits for other targets' graphs.
    in_order = [r.name.split("-target-")[0].split("-precision-")[0] for r in sorted(conversions + builds, key=lambda r: r.start_time)]
    assert in_order == ["convert", "build-and-gate"] * 3
