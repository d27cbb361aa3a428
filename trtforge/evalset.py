"""The eval set: arrays keyed by input name (first axis = samples) plus optional labels, checked against the spec.

The file is read by ``trtforge.safeio.load_arrays``, under the same size caps as a calibration set
(the spec's ``calibration.max_archive_*`` where it has a calibration section, else the defaults);
a file that cannot be read is a ``DataFileError``, one that does not fit the spec a ``SpecError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtforge.calibration import archive_limits
from trtforge.errors import SpecError
from trtforge.groundtruth import Truth, load_truth
from trtforge.numeric import NUMPY_DTYPES
from trtforge.safeio import DEFAULT_LIMITS, ArchiveLimits, load_arrays
from trtforge.spec import ModelSpec


@dataclass(frozen=True)
class EvalSet:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    path: Path
    truth: Truth | None = None

    @property
    def size(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int):
        for start in range(0, self.size, batch_size):
            yield {name: array[start : start + batch_size] for name, array in self.inputs.items()}


def eval_limits(spec: ModelSpec) -> ArchiveLimits:
    """Size caps for reading the eval set."""
    # The spec has no caps of its own for the eval set: one that raised its calibration caps for big sets gets them here too.
    return archive_limits(spec.calibration) if spec.calibration is not None else DEFAULT_LIMITS


def load_eval_set(spec: ModelSpec) -> EvalSet:
    path = spec.eval.data
    if not path.is_file():
        raise SpecError(f"eval.data: {path} does not exist")
    arrays = load_arrays(path, what="eval data", limits=eval_limits(spec))
    inputs = {}
    for inp in spec.inputs:
        if inp.name not in arrays:
            raise SpecError(f"eval.data: {path} has no array {inp.name!r} for input {inp.name!r}; it has {sorted(arrays)}")
        array = arrays[inp.name]
        expected = inp.shape_at("opt")
        if array.ndim != len(expected) or tuple(array.shape[1:]) != tuple(expected[1:]):
            wanted = ["N", *inp.shape[1:]]
            raise SpecError(f"eval.data: array {inp.name!r} in {path} has shape {list(array.shape)}, expected {wanted} (samples first)")
        inputs[inp.name] = array.astype(NUMPY_DTYPES[inp.dtype], copy=False)
    sizes = {name: len(a) for name, a in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise SpecError(f"eval.data: arrays in {path} have different sample counts {sizes}")
    labels = None
    if spec.eval.labels is not None and spec.eval.labels in arrays:
        labels = arrays[spec.eval.labels]
        if len(labels) != next(iter(sizes.values())):
            raise SpecError(
                f"eval.data: labels {spec.eval.labels!r} in {path} has {len(labels)} entries for {next(iter(sizes.values()))} samples"
            )
    samples = next(iter(sizes.values()))
    sample_ids = arrays.get(spec.eval.sample_ids)
    if sample_ids is not None and sample_ids.shape != (samples,):
        raise SpecError(
            f"eval.data: array {spec.eval.sample_ids!r} in {path} has shape {list(sample_ids.shape)}; it names each of the {samples} samples' image"
        )
    truth = load_truth(spec, sample_ids, samples, eval_limits(spec))
    return EvalSet(inputs=inputs, labels=labels, path=path, truth=truth)


def eval_batch_size(spec: ModelSpec) -> int:
    """The spec's eval batch size, clipped to the smallest max of the inputs' first (batch) dims."""
    limit = spec.eval.batch_size
    for inp in spec.inputs:
        first = inp.shape[0]
        limit = min(limit, first if isinstance(first, int) else inp.dynamic[first].max)
    return limit
