"""Report paths under many defects at once: each run ends in a pass or in a TrtforgeError, never a crash.

The calibration validator, the operator check and the gate each word their failures from what
they found; a wording bug shows only when there is a lot to word (hundreds of duplicates, dozens
of flagged nodes, outputs full of NaN). Hypothesis draws such inputs; the examples are few and
bounded so the file stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from tests.conftest import DIGITS_SPEC, REPO
from trtforge.errors import TrtforgeError
from trtforge.spec import Precision, Task, load_spec
from trtforge.stages.check_ops import check_ops
from trtforge.stages.gate import DEFAULT_THRESHOLDS, PreviousRelease, compute_metrics, evaluate_thresholds, task_metric_name
from trtforge.stages.validate_calibration import validate_calibration

SHIPPED_SET = REPO / "calibration_data" / "digits" / "calibration.npz"
QUICK = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def digits_spec():
    return load_spec(DIGITS_SPEC)


@pytest.fixture(scope="module")
def shipped():
    with np.load(SHIPPED_SET) as archive:
        return archive["input"], archive["labels"]


# ---------------------------------------------------------------- the calibration validator


def test_several_hundred_repeats_of_one_sample_are_reported_not_crashed_on(digits_spec, shipped, tmp_path):
    images, labels = shipped[0].copy(), shipped[1]
    images[1:401] = images[0]
    np.savez(tmp_path / "repeats.npz", input=images, labels=labels)

    report = validate_calibration(digits_spec, tmp_path / "repeats.npz")

    duplicates = [f for f in report.failed if f.column == "duplicate"]
    assert len(duplicates) == 1
    assert duplicates[0].details.startswith("400 samples repeat an earlier sample")
    assert "1 = 0, 2 = 0" in duplicates[0].details and "... 390 more" in duplicates[0].details
    assert len(duplicates[0].samples) == 400


defects = st.fixed_dictionaries(
    {
        "duplicates": st.integers(0, 450),
        "nan": st.integers(0, 300),
        "inf": st.integers(0, 300),
        "constant": st.integers(0, 300),
        "scale": st.sampled_from([1.0, 0.5, 255.0, -1.0]),
        "missing_classes": st.lists(st.integers(0, 9), max_size=9, unique=True),
        "seed": st.integers(0, 2**16),
    }
)


def _defective(images: np.ndarray, labels: np.ndarray, d: dict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(d["seed"])
    x = images.copy() * np.float32(d["scale"])
    keep = ~np.isin(labels, d["missing_classes"])
    x, y = x[keep], labels[keep]
    count = len(x)
    if count > 1 and d["duplicates"]:
        x[1 : 1 + d["duplicates"]] = x[0]
    for kind, value in (("nan", np.nan), ("inf", np.inf)):
        rows = rng.choice(count, size=min(d[kind], count), replace=False)
        x[rows, 0, rng.integers(0, 8), rng.integers(0, 8)] = value
    rows = rng.choice(count, size=min(d["constant"], count), replace=False)
    x[rows] = rng.random(len(rows), dtype=np.float32)[:, None, None, None]
    return x, y


@QUICK
@given(d=defects)
def test_calibration_validator_words_any_mix_of_defects(digits_spec, shipped, tmp_path, d):
    x, y = _defective(*shipped, d)
    path = tmp_path / "defective.npz"
    np.savez(path, input=x, labels=y)
    try:
        report = validate_calibration(digits_spec, path)
    except TrtforgeError as err:
        assert str(err)
        return
    json.dumps(report.model_dump(mode="json"))
    for failed in report.failed:
        assert failed.details
        assert "could not evaluate" not in failed.details, failed.details


# ---------------------------------------------------------------- the operator check

FLOAT = TensorProto.FLOAT

node_kinds = st.lists(st.sampled_from(["Relu", "Unique", "FancyNorm", "TopK", "Abs"]), min_size=1, max_size=60)
node_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40)


def _flagged_graph(path: Path, kinds: list[str], names: list[str]) -> Path:
    import onnx

    nodes, outputs = [], [helper.make_tensor_value_info("y", FLOAT, None)]
    current = "x"
    for i, kind in enumerate(kinds):
        name = names[i % len(names)] if names else ""
        out = f"t{i}"
        if kind == "TopK":
            # K from a graph input: TensorRT needs it constant, so the node is conditional.
            nodes.append(helper.make_node("TopK", [current, "k"], [f"v{i}", f"i{i}"], name=name))
            outputs += [
                helper.make_tensor_value_info(f"v{i}", FLOAT, None),
                helper.make_tensor_value_info(f"i{i}", TensorProto.INT64, None),
            ]
            continue
        domain = "com.example" if kind == "FancyNorm" else ""
        nodes.append(helper.make_node(kind, [current], [out], name=name, domain=domain))
        current = out
    nodes.append(helper.make_node("Identity", [current], ["y"], name="last"))
    graph = helper.make_graph(
        nodes,
        "flagged",
        [helper.make_tensor_value_info("x", FLOAT, [8]), helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    onnx.save(model, path)
    return path


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=node_kinds, names=st.lists(node_names, max_size=5))
def test_operator_check_reports_graphs_with_many_flagged_nodes(tmp_path, kinds, names):
    path = _flagged_graph(tmp_path / "flagged.onnx", kinds, names)
    try:
        report = check_ops(path, use_tensorrt=False)
    except TrtforgeError as err:
        assert str(err)
        return
    assert report.summary.nodes == len(kinds) + 1
    assert report.format_table()
    json.dumps(report.model_dump(mode="json"))
    report.summary_rows()
    if report.ok:
        return
    assert report.failure_message().count("\n") >= len(report.unsupported)
    with pytest.raises(TrtforgeError):
        report.raise_if_unsupported()


# ---------------------------------------------------------------- the gate


@QUICK
@given(
    task=st.sampled_from([Task.CLASSIFICATION, Task.RAW, Task.EMBEDDING]),
    precision=st.sampled_from(list(DEFAULT_THRESHOLDS)),
    samples=st.integers(2, 64),
    nonfinite=st.floats(0.0, 1.0),
    values=st.sampled_from([np.nan, np.inf, -np.inf]),
    previous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gate_words_outputs_with_many_non_finite_values(digits_spec, task, precision, samples, nonfinite, values, previous, seed):
    rng = np.random.default_rng(seed)
    spec = digits_spec.model_copy(update={"eval": digits_spec.eval.model_copy(update={"task": task})})
    name = spec.outputs[0].name
    reference = {name: rng.standard_normal((samples, 10)).astype(np.float32)}
    out = reference[name] + rng.normal(0, 1e-3, (samples, 10)).astype(np.float32)
    out[rng.random(out.shape) < nonfinite] = values
    labels = rng.integers(0, 10, samples) if task is Task.CLASSIFICATION else None
    known = {"accuracy": 0.9, "agreement": 0.99, "cosine_mean": 0.99, "recall_at_k": 0.95}
    release = PreviousRelease(version=1, metrics=known) if previous else None
    try:
        metrics = compute_metrics(spec, {name: out}, reference, labels)
        task_metric = task_metric_name(spec, metrics)
        failures, notes = evaluate_thresholds(metrics, DEFAULT_THRESHOLDS[Precision(precision)], task_metric, release)
    except TrtforgeError as err:
        assert str(err)
        return
    if not np.isfinite(out).all():
        assert failures and "non-finite" in failures[0]
    assert all(isinstance(line, str) and line for line in failures + notes)
