"""The one user-facing error family.

Every failure a user can fix (bad spec, bad file, failed gate, registry conflict)
is a ``TrtforgeError``; the CLI prints its message without a traceback and exits 1.
Anything else escaping the library is a bug in trtforge.
"""

from __future__ import annotations


class TrtforgeError(Exception):
    """A problem the user can act on; ``str(err)`` says what and how to fix it."""

    # The pipeline stage it was raised in, where known (set by trtforge.stages.runner.run_stage).
    stage: str | None = None
    # The summary of the run it ended, where it ended one (the CLI still prints it, and --json).
    summary: object | None = None


class SpecError(TrtforgeError):
    """The model spec is missing, unreadable or invalid."""


class CheckpointError(TrtforgeError):
    """The checkpoint cannot be produced, read or matched to the model."""


class DataFileError(TrtforgeError):
    """An array file (.npz/.npy: calibration set, eval set, reference outputs) is unreadable, malformed or over its size caps."""


class StageError(TrtforgeError):
    """A pipeline stage failed on its input; the message names the stage."""

    def __init__(self, stage: str, message: str | None = None):
        # One-argument form: a message already prefixed with its stage (as when Prefect
        # re-creates a stored exception from its text).
        if message is None:
            stage, _, message = stage.partition(": ")
        self.stage = stage
        super().__init__(f"{stage}: {message}")


class CompatibilityError(StageError):
    """The model has operators the target's TensorRT cannot run."""


class CalibrationError(StageError):
    """The calibration set failed validation or cannot be read."""


class GateError(TrtforgeError):
    """A required target failed its gate."""


class RegistryError(TrtforgeError):
    """The registry cannot be reached, or refused an operation."""


class NotFoundError(RegistryError):
    """A model, version, alias or target is not in the registry."""


class IntegrityError(RegistryError):
    """A file in the registry does not match its manifest (size or sha256)."""


class RunFailed(TrtforgeError):
    """The run finished but a required target did not pass; nothing was published.

    Carries the run summary so the CLI can still show the per-target table.
    """

    def __init__(self, message: str, summary: object | None = None):
        super().__init__(message)
        self.summary = summary
