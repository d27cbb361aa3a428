"""What the registry stores about a version and an alias, and how it reads them back.

A manifest is untrusted input when read: whatever the bytes are, reading one either gives
a valid ``Manifest`` for the model and version it was found under, or raises
``IntegrityError``. Tags and file names inside it are checked like any other name, so a
hostile manifest cannot steer a pull outside its destination folder.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trtforge.errors import IntegrityError, RegistryError
from trtforge.registry.names import check_alias, check_file_name, check_model, check_tag
from trtforge.serving import ServingInfo

MANIFEST_FORMAT = 1
ALIAS_HISTORY_LIMIT = 50

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _valid_name(check, value: str) -> str:
    try:
        return check(value)
    except RegistryError as err:
        raise ValueError(str(err)) from None


class FileEntry(_Frozen):
    sha256: Sha256
    size: Annotated[int, Field(ge=0)]


class TargetEntry(_Frozen):
    """One published target: its build record (free-form JSON from the backend and gate) and its files."""

    tag: str
    record: dict[str, Any]
    files: dict[str, FileEntry] = Field(min_length=1)

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        return _valid_name(check_tag, value)

    @field_validator("files")
    @classmethod
    def _file_names(cls, value: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in value:
            _valid_name(check_file_name, name)
        return value

    @property
    def primary_file(self) -> str:
        """The engine itself: the file named ``engine`` where there is one, else the largest."""
        if "engine" in self.files:
            return "engine"
        return max(self.files, key=lambda name: (self.files[name].size, name))


class Lineage(BaseModel):
    """Where a version came from: the named hashes are for audits; ``inputs_sha256`` is what ``find_by_lineage`` matches."""

    model_config = ConfigDict(frozen=True, extra="allow")

    checkpoint_sha256: str | None = None
    onnx_sha256: str | None = None
    spec_sha256: str | None = None
    calibration_sha256: str | None = None
    code_version: str | None = None
    # The digest of every input that decides the engines (trtforge.lineage.RunInputs), and those inputs.
    inputs_sha256: str | None = None
    inputs: dict[str, Any] | None = None


class FastestOnPlace(_Frozen):
    """The passing targets the gates measured fastest on one place (a GPU architecture, or the CPU), by tag."""

    latency: str = Field(description="the target with the lowest median latency at the opt shape")
    latency_ms: Annotated[float, Field(gt=0)]
    throughput: str | None = Field(default=None, description="the target with the most samples/s at its opt or max batch")
    throughput_per_s: Annotated[float, Field(gt=0)] | None = None
    throughput_batch: Annotated[int, Field(ge=1)] | None = None

    @field_validator("latency", "throughput")
    @classmethod
    def _tags(cls, value: str | None) -> str | None:
        return None if value is None else _valid_name(check_tag, value)


# A place is 'cpu' or a GPU architecture as pulls name it (sm_90).
_PLACE = re.compile(r"^(cpu|sm_\d{2,3})$")


class Manifest(_Frozen):
    format: Literal[1] = MANIFEST_FORMAT
    model: str
    version: Annotated[int, Field(ge=1)]
    created_at: datetime
    lineage: Lineage
    environment: dict[str, Any]
    extra: dict[str, Any] = Field(default_factory=dict)
    targets: dict[str, TargetEntry] = Field(min_length=1)
    # Written at publish from the gates' metrics; absent from manifests published before it existed.
    fastest: dict[str, FastestOnPlace] = Field(default_factory=dict)
    # What a server must know to feed the engines and read their outputs; absent from older manifests.
    serving: ServingInfo | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return _valid_name(check_model, value)

    @model_validator(mode="after")
    def _tags_match_keys(self) -> Manifest:
        wrong = [key for key, entry in self.targets.items() if entry.tag != key]
        if wrong:
            raise ValueError(f"targets {wrong} are listed under a key other than their tag")
        return self

    @model_validator(mode="after")
    def _fastest_names_targets(self) -> Manifest:
        check_fastest(self.fastest, set(self.targets))
        return self


def check_fastest(fastest: dict[str, FastestOnPlace], tags: set[str]) -> None:
    """ValueError unless every place is 'cpu' or a GPU architecture and every tag named is one of ``tags``."""
    for place, choice in fastest.items():
        if not _PLACE.match(place):
            raise ValueError(f"fastest: {place!r} is not a place ('cpu' or a GPU architecture like sm_90)")
        unknown = [tag for tag in (choice.latency, choice.throughput) if tag is not None and tag not in tags]
        if unknown:
            raise ValueError(f"fastest.{place} names {unknown}, which are not targets of this version")


class AliasMove(_Frozen):
    version: Annotated[int, Field(ge=1)]
    until: datetime


class AliasRecord(_Frozen):
    """An alias object: the version it points at now, and where it pointed before (newest first)."""

    alias: str
    version: Annotated[int, Field(ge=1)]
    updated_at: datetime
    history: list[AliasMove] = Field(default_factory=list)

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        return _valid_name(check_alias, value)

    def moved_to(self, version: int, now: datetime) -> AliasRecord:
        history = [AliasMove(version=self.version, until=now), *self.history][:ALIAS_HISTORY_LIMIT]
        return AliasRecord(alias=self.alias, version=version, updated_at=now, history=history)


Stored = TypeVar("Stored", Manifest, AliasRecord)
_KIND_NAMES = {Manifest: "manifest", AliasRecord: "alias object"}


def _problems(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg'].removeprefix('Value error, ')}"
        for problem in err.errors()[:3]
    )


def read_stored(kind: type[Stored], data: bytes, where: str) -> Stored:
    """Parse a manifest or alias object; anything but a valid one is an IntegrityError naming ``where``."""
    try:
        return kind.model_validate_json(data)
    except ValidationError as err:
        raise IntegrityError(f"{where} is not a valid {_KIND_NAMES[kind]}: {_problems(err)}") from None
    except (ValueError, RecursionError) as err:
        raise IntegrityError(f"{where} is not a valid {_KIND_NAMES[kind]}: {type(err).__name__}") from None


def read_manifest(data: bytes, where: str, model: str, version: int) -> Manifest:
    manifest = read_stored(Manifest, data, where)
    if manifest.model != model or manifest.version != version:
        raise IntegrityError(
            f"{where} describes {manifest.model} version {manifest.version}, not {model} version {version}: "
            "it was copied or moved by hand; restore the original"
        )
    return manifest
