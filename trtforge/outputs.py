"""A model's outputs over the eval set, the same way for the PyTorch reference and for every engine.

Most tasks keep each output as one array, samples first. Detection keeps one record per image
(output name -> array, shaped as a one-image call returns it), never one concatenated array:
padded NMS outputs carry a per-image count, and ragged ones (as many rows as detections) have
no sample axis at all, so concatenating would mix images or fail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import IO

import numpy as np

from trtforge.errors import StageError
from trtforge.spec import BoxesScoresClasses, ModelSpec, Task

Batch = dict[str, np.ndarray]
PerImage = list[dict[str, np.ndarray]]
Outputs = dict[str, np.ndarray] | PerImage
PER_IMAGE_KEY = re.compile(r"^(\d+)/(.+)$")


def per_image(spec: ModelSpec) -> bool:
    return spec.eval.task is Task.DETECTION


def one_image_per_call(spec: ModelSpec) -> bool:
    """Ragged outputs and user decoders see one image per call: only then is every row known to be that image's."""
    decoder = spec.eval.postprocess
    if isinstance(decoder, str):
        return True
    return isinstance(decoder, BoxesScoresClasses) and decoder.num_dets is None


def collect_outputs(spec: ModelSpec, batches: Iterator[Batch], call: Callable[[Batch], dict[str, np.ndarray]], stage: str) -> Outputs:
    """Run ``call`` on every batch; outputs as float32 arrays (or per-image records for detection)."""
    names = [o.name for o in spec.outputs]
    if not per_image(spec):
        collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for batch in batches:
            outputs = call(batch)
            for name in names:
                collected[name].append(np.asarray(outputs[name], dtype=np.float32))
        return {name: np.concatenate(parts) for name, parts in collected.items()}
    records: PerImage = []
    for batch in batches:
        size = len(next(iter(batch.values())))
        if one_image_per_call(spec) and size > 1:
            for index in range(size):
                records += _split(call({k: v[index : index + 1] for k, v in batch.items()}), names, 1, stage)
        else:
            records += _split(call(batch), names, size, stage)
    return records


def _split(outputs: dict[str, np.ndarray], names: list[str], size: int, stage: str) -> PerImage:
    arrays = {name: np.asarray(outputs[name]) for name in names}
    if size == 1:
        return [arrays]
    for name, array in arrays.items():
        if array.ndim == 0 or array.shape[0] != size:
            raise StageError(
                stage,
                f"output {name!r} has shape {list(array.shape)} for a batch of {size} images, so its rows cannot be told apart "
                "per image: for NMS outputs with one row per detection use postprocess {kind: boxes_scores_classes} without "
                "num_dets (the model then runs one image at a time)",
            )
    return [{name: array[i : i + 1] for name, array in arrays.items()} for i in range(size)]


def save_outputs(outputs: Outputs, file: IO[bytes]) -> None:
    """An .npz: one array per output name, or ``<image>/<output>`` per image."""
    if isinstance(outputs, dict):
        np.savez(file, **outputs)
    else:
        np.savez(file, **{f"{index}/{name}": array for index, record in enumerate(outputs) for name, array in record.items()})


def outputs_from_arrays(arrays: dict[str, np.ndarray]) -> Outputs:
    """The inverse of ``save_outputs``, from the arrays of its file."""
    matches = [PER_IMAGE_KEY.match(key) for key in arrays]
    if not arrays or not all(matches):
        return arrays
    count = 1 + max(int(m.group(1)) for m in matches)
    records: PerImage = [{} for _ in range(count)]
    for key, match in zip(arrays, matches):
        records[int(match.group(1))][match.group(2)] = arrays[key]
    return records


def count_nonfinite(outputs: Outputs) -> int:
    records = [outputs] if isinstance(outputs, dict) else outputs
    total = 0
    for record in records:
        for array in record.values():
            if np.issubdtype(array.dtype, np.floating):
                total += int(array.size - np.count_nonzero(np.isfinite(array)))
    return total
