"""TensorRT optimization profiles derived from the spec.

A target either lists its own profiles (``targets[i].profiles``: per dynamic dim name, the
min/opt/max to use instead of the input's declared range) or gets one profile from the
inputs' ``dynamic`` ranges. Every profile gives min/opt/max shapes for every input, so every
dynamic dim of every input is covered. A dim name shared by several inputs means one size at
run time, so it must have one range. A profile may narrow a declared range but not leave it:
the exported model and the gate only vouch for shapes inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtforge.errors import SpecError
from trtforge.spec import DynamicDim, ModelSpec, ShapeLevel, Target


@dataclass(frozen=True)
class InputShapes:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class ShapeProfile:
    """Min/opt/max shapes for every input of the model: one TensorRT optimization profile."""

    inputs: tuple[InputShapes, ...]

    def shapes_at(self, level: ShapeLevel) -> dict[str, tuple[int, ...]]:
        return {shapes.name: getattr(shapes, level) for shapes in self.inputs}

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        return {shapes.name: {"min": list(shapes.min), "opt": list(shapes.opt), "max": list(shapes.max)} for shapes in self.inputs}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> ShapeProfile:
        return cls(
            tuple(InputShapes(name, tuple(levels["min"]), tuple(levels["opt"]), tuple(levels["max"])) for name, levels in data.items())
        )


def _describe(spec: ModelSpec) -> str:
    where = f" ({spec.source})" if spec.source else ""
    return f"spec {spec.name!r}{where}"


def _target_location(spec: ModelSpec, target: Target) -> str:
    return f"targets[{spec.targets.index(target)}]" if target in spec.targets else "target"


def _range_text(dim: DynamicDim) -> str:
    return f"min {dim.min} / opt {dim.opt} / max {dim.max}"


def declared_ranges(spec: ModelSpec) -> dict[str, DynamicDim]:
    """The one declared range of each dynamic dim name, checked to agree across inputs."""
    ranges: dict[str, DynamicDim] = {}
    first_input: dict[str, str] = {}
    for index, inp in enumerate(spec.inputs):
        for dim_name, dim in inp.dynamic.items():
            if dim_name not in ranges:
                ranges[dim_name] = dim
                first_input[dim_name] = f"inputs[{index}] ({inp.name!r})"
            elif ranges[dim_name] != dim:
                raise SpecError(
                    f"{_describe(spec)}: dynamic dim {dim_name!r} has {_range_text(ranges[dim_name])} in "
                    f"{first_input[dim_name]} but {_range_text(dim)} in inputs[{index}] ({inp.name!r}); "
                    f"a dim name shared by several inputs is one size at run time: give it the same range everywhere"
                )
    return ranges


def _check_override(spec: ModelSpec, where: str, dim_name: str, dim: DynamicDim, declared: DynamicDim) -> None:
    if dim.min < declared.min or dim.max > declared.max:
        raise SpecError(
            f"{_describe(spec)}: {where}.dims.{dim_name} ({dim.min}..{dim.max}) leaves the range the inputs "
            f"declare for {dim_name!r} ({declared.min}..{declared.max}): narrow the profile, or widen "
            f"'dynamic.{dim_name}' of the inputs and re-export"
        )


def derive_profiles(spec: ModelSpec, target: Target) -> list[ShapeProfile]:
    """One profile per ``target.profiles`` entry, or one from the inputs' dynamic ranges."""
    declared = declared_ranges(spec)
    location = _target_location(spec, target)
    if not target.profiles:
        overrides_per_profile: list[dict[str, DynamicDim]] = [{}]
    else:
        overrides_per_profile = []
        for index, profile in enumerate(target.profiles):
            where = f"{location}.profiles[{index}]"
            if not profile.dims:
                raise SpecError(
                    f"{_describe(spec)}: {where} sets no dims: give min/opt/max for at least one of "
                    f"{sorted(declared) or 'the dynamic dims (the model has none)'}, or remove the profile"
                )
            unknown = sorted(set(profile.dims) - set(declared))
            if unknown:
                known = ", ".join(sorted(declared)) if declared else "none: every input shape is static"
                raise SpecError(
                    f"{_describe(spec)}: {where}.dims names {unknown}, which no input declares as dynamic "
                    f"(dynamic dims: {known}); use a dim name from an input's 'shape'"
                )
            for dim_name, dim in profile.dims.items():
                _check_override(spec, where, dim_name, dim, declared[dim_name])
            overrides_per_profile.append(dict(profile.dims))

    profiles = []
    for overrides in overrides_per_profile:
        ranges = {**declared, **overrides}
        inputs = []
        for inp in spec.inputs:
            levels = {
                level: tuple(d if isinstance(d, int) else getattr(ranges[d], level) for d in inp.shape) for level in ("min", "opt", "max")
            }
            inputs.append(InputShapes(inp.name, levels["min"], levels["opt"], levels["max"]))
        profiles.append(ShapeProfile(tuple(inputs)))
    return profiles
