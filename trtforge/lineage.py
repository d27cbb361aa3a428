"""What a version is built from, hashed: the one recipe behind "up to date" and the lineage in the manifest.

A published version is up to date when every input that makes its engines is unchanged: the
checkpoint, the spec, the model factory's source (a ``file.py:function`` and the modules it
imports from the spec's folder; the installed version of a ``package.module:function``), the
calibration set's and the eval set's content, trtforge's own code (library, tasks and flows),
and the versions of the tools that export, convert, build and run the engines. The check needs
no Prefect and no torch import, so ``trtforge run`` answers it before any server starts.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from trtforge.hashing import sha256_file
from trtforge.serving import serving_info
from trtforge.spec import ModelSpec
from trtforge.stages.runner import SPEC_FIELDS_READ, Stage

# The tools whose version changes what an engine is; absent ones are recorded as absent.
TOOL_DISTRIBUTIONS = ("torch", "onnx", "onnxsim", "nvidia-modelopt", "onnxruntime", "tensorrt")


class RunInputs(BaseModel):
    """Everything that decides a version's engines, each hashed; ``digest`` is what the registry looks up."""

    checkpoint_sha256: str
    spec_sha256: str
    model_code_sha256: str
    calibration_data_sha256: str | None
    eval_data_sha256: str
    code_version: str
    tools: dict[str, str | None]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def run_inputs(spec: ModelSpec, checkpoint: Path, checkpoint_sha256: str | None = None) -> RunInputs:
    """Hash every input of a run of ``spec`` on ``checkpoint`` (whose sha256 may be known already)."""
    return RunInputs(
        checkpoint_sha256=checkpoint_sha256 or sha256_file(checkpoint),
        spec_sha256=spec.sha256(),
        model_code_sha256=model_code_sha256(spec),
        calibration_data_sha256=data_sha256(spec.calibration.data) if spec.calibration is not None else None,
        eval_data_sha256=eval_sha256(spec),
        code_version=full_code_version(),
        tools=tool_versions(),
    )


def stage_cache_key(stage: Stage, *digests: str) -> str:
    """The one cache-key recipe of every cached stage: the stage, trtforge's code (library, tasks and
    flows) and the digests of what the stage reads (its spec fields through ``stage_spec_sha256``, its files)."""
    return hashlib.sha256("\0".join([stage.value, full_code_version(), *digests]).encode()).hexdigest()


def stage_spec_sha256(spec: ModelSpec, stage: Stage) -> str:
    """What one cached stage reads of the spec: its fields as written, and the model's code where it builds the model."""
    fields = SPEC_FIELDS_READ.get(stage)
    if fields is None:
        return spec.sha256() + model_code_sha256(spec)
    digest = spec.sha256_of(fields) + (model_code_sha256(spec) if "model" in fields else "")
    if stage is Stage.EXPORT:
        # The exported ONNX carries the serving contract, built from fields (eval, calibration, serving)
        # and a COCO file's categories that the export does not otherwise read.
        digest += serving_info(spec).sha256()
    return digest


def export_work_dir(artifacts: Path, spec: ModelSpec, checkpoint_sha256: str) -> Path:
    """The folder a run's graphs and builds go in: keyed like the export stage, so a change that exports nothing new
    reuses it."""
    return artifacts / "work" / spec.name / f"{checkpoint_sha256[:16]}-{stage_spec_sha256(spec, Stage.EXPORT)[:16]}"


def model_code_sha256(spec: ModelSpec) -> str:
    """The model factory's source: its file and the spec-folder modules it imports, or its distribution's version."""
    module_ref = spec.model.partition(":")[0]
    base = (spec.source or Path.cwd()).resolve()
    if module_ref.endswith(".py"):
        entry = Path(module_ref) if Path(module_ref).is_absolute() else base / module_ref
    else:
        module = base.joinpath(*module_ref.split("."))
        entry = module.with_suffix(".py") if module.with_suffix(".py").is_file() else module / "__init__.py"
    if not entry.is_file():
        top = module_ref.split(".")[0]
        distributions = importlib.metadata.packages_distributions().get(top, [top])
        return hashlib.sha256(f"{top}: {[(d, _distribution_version(d)) for d in distributions]}".encode()).hexdigest()
    digest = hashlib.sha256()
    for source in sorted(_local_sources(entry.resolve(), base)):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def _local_sources(entry: Path, base: Path) -> set[Path]:
    """``entry`` and every module under ``base`` it imports, transitively."""
    seen: set[Path] = set()
    pending = [entry]
    while pending:
        path = pending.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                candidate = base.joinpath(*parts)
                pending += [candidate.with_suffix(".py"), candidate / "__init__.py"]
    return seen


def eval_sha256(spec: ModelSpec) -> str:
    """The eval set's arrays and, for detection and segmentation, its ground truth."""
    parts = [data_sha256(spec.eval.data)]
    annotations = getattr(spec.eval, "annotations", None)
    if annotations is not None:
        parts.append(data_sha256(annotations))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def data_sha256(path: Path) -> str:
    """A data file's sha256, or a folder's: every file's relative path and content, in order."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return "absent"
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(item.relative_to(path)).encode() + b"\0" + sha256_file(item).encode())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def full_code_version() -> str:
    """trtforge's version and a hash of its library (with its data files), task and flow sources: any change there rebuilds."""
    import trtforge

    digest = hashlib.sha256()
    for package in ("trtforge", "trtforge.tasks", "trtforge.flows"):
        spec = importlib.util.find_spec(package)
        for folder in spec.submodule_search_locations if spec and spec.submodule_search_locations else []:
            for path in sorted(Path(folder).rglob("*")):
                if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                    digest.update(f"{package}/{path.relative_to(folder)}".encode())
                    digest.update(path.read_bytes())
    return f"{trtforge.__version__}+{digest.hexdigest()[:12]}"


def tool_versions() -> dict[str, str | None]:
    return {name: _distribution_version(name) for name in TOOL_DISTRIBUTIONS}


def _distribution_version(name: str) -> str | None:
    candidates = [name]
    if name == "tensorrt":
        # NVIDIA ships the Python module under several distribution names.
        candidates += ["tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings"]
    for candidate in candidates:
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def published_version(registry, spec: ModelSpec, inputs: RunInputs) -> int | None:
    """The newest version of ``spec.name`` built from exactly these inputs, or None when there is none."""
    return registry.find_by_lineage(spec.name, inputs.digest)
