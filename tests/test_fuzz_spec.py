"""Property tests: whatever a spec file holds, the parser answers with a spec or a SpecError.

A spec is user input. Random data, random mutations of the digits spec and random text or
bytes must never surface another exception type (a traceback in the CLI), however odd.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import DIGITS_SPEC
from trtforge.errors import SpecError
from trtforge.spec import ModelSpec, load_spec, parse_spec

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIGITS = yaml.safe_load(DIGITS_SPEC.read_text())
YAML_SYNTAX = "abc019.-_ :,[]{}&*!|>'\"#%@`?\n\t"

# Every kind of value yaml.safe_load can produce.
yaml_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.binary(max_size=8) | st.dates() | st.datetimes()
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), children, max_size=4)
        | st.frozensets(st.text(max_size=4), max_size=3).map(set)
    ),
    max_leaves=16,
)


def parse_or_refuse(data, source: str = "<spec>") -> ModelSpec | None:
    """parse_spec's answer: a spec, or None for a SpecError that says which spec is invalid."""
    try:
        spec = parse_spec(data, source=source)
    except SpecError as err:
        assert str(err).startswith(f"invalid spec {source}"), str(err)
        return None
    assert len(spec.sha256()) == 64
    return spec


def load_or_refuse(path: Path) -> ModelSpec | None:
    try:
        spec = load_spec(path)
    except SpecError as err:
        assert str(path) in str(err), str(err)
        return None
    assert spec.source == path.parent.resolve()
    return spec


def paths_in(tree, prefix=()):
    """Every (container, key) place in a spec tree, for mutations to pick from."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        yield prefix, key
        if isinstance(value, (dict, list)):
            yield from paths_in(value, (*prefix, key))


def container_at(tree, prefix):
    for key in prefix:
        tree = tree[key]
    return tree


@st.composite
def mutated_digits_spec(draw):
    spec = copy.deepcopy(DIGITS)
    for _ in range(draw(st.integers(1, 3))):
        prefix, key = draw(st.sampled_from(list(paths_in(spec))))
        container = container_at(spec, prefix)
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            container[key] = draw(yaml_values)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.text(max_size=8))] = draw(yaml_values)
        else:
            container.append(draw(yaml_values))
    return spec


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "spec.yaml"


def test_the_unmutated_digits_spec_parses():
    assert parse_or_refuse(copy.deepcopy(DIGITS)).name == "digits-cnn"


@BOUNDED
@given(yaml_values)
def test_random_data_is_a_spec_or_a_spec_error(data):
    parse_or_refuse(data)


@BOUNDED
@given(mutated_digits_spec())
@example({**DIGITS, "model_kwargs": {"weights": b"\x80\x81"}})
@example({**DIGITS, "model_kwargs": {"when": datetime.datetime(2026, 1, 1), "tags": {"a", "b"}}})
@example({**DIGITS, "inputs": [{"name": "input", "shape": [True, 1]}]})
@example({**DIGITS, "checkpoint": "weights\0.pt"})
def test_mutations_of_a_valid_spec_are_a_spec_or_a_spec_error(data):
    parse_or_refuse(data)


def test_self_referencing_data_is_a_spec_error():
    loop: dict = {}
    loop["self"] = loop
    assert parse_or_refuse({**DIGITS, "model_kwargs": loop}) is None


@BOUNDED
@given(st.text(alphabet=YAML_SYNTAX, max_size=300))
@example("model_kwargs: &a {k: *a}")
@example("[" * 5000 + "]" * 5000)
@example("a: !!python/object:os.system {}")
@example("a: !!binary gAAA")
def test_random_yaml_text_is_a_spec_or_a_spec_error(spec_file, text):
    spec_file.write_text(text)
    load_or_refuse(spec_file)


@BOUNDED
@given(st.binary(max_size=300))
@example(b"\xff\xfe\x00n\x00a")
@example(b"name: \x00")
def test_random_bytes_are_a_spec_or_a_spec_error(spec_file, data):
    spec_file.write_bytes(data)
    load_or_refuse(spec_file)


@BOUNDED
@given(mutated_digits_spec())
def test_mutated_specs_written_as_yaml_are_a_spec_or_a_spec_error(spec_file, data):
    spec_file.write_text(yaml.safe_dump(data, allow_unicode=True))
    load_or_refuse(spec_file)


def billion_laughs(levels: int) -> str:
    lines = ["model_kwargs:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_in_a_spec_is_refused_quickly(spec_file):
    spec_file.write_text(DIGITS_SPEC.read_text() + billion_laughs(9))
    with pytest.raises(SpecError, match=rf"invalid spec {spec_file}: .*more than .* values"):
        load_spec(spec_file)


def test_deeply_nested_yaml_is_refused(spec_file):
    spec_file.write_text(DIGITS_SPEC.read_text() + "model_kwargs: {k: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(SpecError, match=rf"spec file {spec_file} .*nested"):
        load_spec(spec_file)
