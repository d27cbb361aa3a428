"""Hand-off of a run's intermediate files between the main flow and build workers, through the registry.

A build worker on another machine shares nothing with the main flow but the registry, so the
converted ONNX and the reference outputs go up to ``<model>/staging/<run>/`` and the built
engine's files come back the same way. Staging is not part of any version: readers never see
it, and ``trtforge gc`` removes what a crashed run left.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from trtforge.errors import RegistryError
from trtforge.hashing import sha256_file
from trtforge.registry.common import staging_prefix
from trtforge.registry.storage import PreconditionFailed
from trtforge.safeio import location_problem
from trtforge.summary import TargetOutcome

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def target_slot(target_index: int) -> str:
    return f"target-{target_index}"


def input_name(stem: str, sha256: str, suffix: str) -> str:
    """The staged name of one of the main flow's inputs: its content decides it, so staging it again is harmless."""
    return f"{stem}-{sha256[:16]}{suffix}"


def external_data_name(onnx_name: str, location: str, sha256: str) -> str:
    """Where an external data file of the staged ONNX ``onnx_name`` is staged."""
    return f"{onnx_name}.data/{sha256[:16]}/{location}"


class Staging:
    def __init__(self, registry, model: str, run_id: str):
        if not RUN_ID.match(run_id):
            raise RegistryError(f"invalid staging run id {run_id!r}")
        self.registry = registry
        self.prefix = staging_prefix(model, run_id)

    def put(self, name: str, path: Path) -> str:
        """Upload ``path`` as ``name``; returns the SHA-256 of the bytes stored, hashed as they were sent."""
        return self.registry.store.upload_file(f"{self.prefix}/{name}", path).sha256

    def put_input(self, name: str, path: Path) -> None:
        """Stage an input named by its content (``input_name``): a ladder rung or a second remote target
        of the same run stages the same reference outputs again, and finds them there already."""
        try:
            self.put(name, path)
        except PreconditionFailed:
            pass

    def get_external_data(self, onnx_name: str, external: dict[str, str], model_dir: Path) -> None:
        """Fetch the staged ONNX's external data files into ``model_dir``, each checked to stay inside it and against its sha256."""
        for location, sha256 in external.items():
            problem = location_problem(location)
            if problem is not None:
                raise RegistryError(f"refused: the staged external data location {location!r} of {onnx_name} {problem}")
            self.get(external_data_name(onnx_name, location, sha256), model_dir / location, sha256)

    def get(self, name: str, dest: Path, sha256: str | None = None) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.registry.store.download_file(f"{self.prefix}/{name}", dest)
        if sha256 is not None and sha256_file(dest) != sha256:
            dest.unlink(missing_ok=True)
            raise RegistryError(f"staged file {self.prefix}/{name} does not match its sha256")
        return dest

    def put_outcome(self, slot: str, outcome: TargetOutcome) -> None:
        """Upload a built target's files, then its outcome: the outcome's presence means the files are complete.

        Each attempt's files go to a folder of their own, and the outcome (written last, replacing any
        before it) names them: an orchestrator delivers a flow run at least once, and a second execution
        of the same build must neither collide with the first nor pair its outcome with the other's files."""
        attempt = f"{slot}/attempt-{uuid.uuid4().hex[:12]}"
        staged = {}
        for name, path in outcome.files.items():
            staged_as = f"{attempt}/{name}"
            staged[name] = {"sha256": self.put(staged_as, path), "staged_as": staged_as}
        payload = outcome.model_dump(mode="json")
        payload["files"] = staged
        self.registry.store.put(f"{self.prefix}/{slot}/outcome.json", json.dumps(payload).encode())

    def get_outcome(self, slot: str, dest_dir: Path) -> TargetOutcome:
        stored = self.registry.store.get(f"{self.prefix}/{slot}/outcome.json")
        if stored is None:
            raise RegistryError(f"the build worker left no result at {self.prefix}/{slot}/outcome.json")
        payload = json.loads(stored.data)
        files = {name: self.get(meta["staged_as"], dest_dir / name, meta["sha256"]) for name, meta in payload["files"].items()}
        payload["files"] = {name: str(path) for name, path in files.items()}
        return TargetOutcome.model_validate(payload)

    def clear(self) -> None:
        for info in self.registry.store.list(self.prefix + "/"):
            self.registry.store.delete(info.key)
