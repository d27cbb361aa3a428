"""The PyTorch FP32 reference outputs on the eval set: computed once per checkpoint, eval inputs, model code and the spec fields it reads.

Saved as an .npz: one array per output name, or for detection ``<image>/<output>`` per image
(``trtforge.outputs``), so padded and ragged NMS outputs are never concatenated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel

from trtforge.evalset import eval_batch_size, load_eval_set
from trtforge.hashing import sha256_file
from trtforge.lineage import data_sha256, stage_cache_key, stage_spec_sha256
from trtforge.localcache import mark_used
from trtforge.modelload import load_model
from trtforge.outputs import Outputs, collect_outputs, outputs_from_arrays, save_outputs
from trtforge.safeio import atomic_writer, load_arrays
from trtforge.spec import ModelSpec
from trtforge.stages.runner import Stage

STAGE = "reference"


class ReferenceResult(BaseModel):
    path: Path
    key: str
    cached: bool


def reference_outputs(spec: ModelSpec, checkpoint: Path, cache_dir: Path) -> ReferenceResult:
    """Run the PyTorch model in FP32 over the eval set and save its outputs."""
    import torch

    key = stage_cache_key(Stage.REFERENCE, stage_spec_sha256(spec, Stage.REFERENCE), sha256_file(checkpoint), data_sha256(spec.eval.data))
    path = cache_dir / f"reference-{key[:24]}.npz"
    if path.is_file():
        mark_used(path)
        return ReferenceResult(path=path, key=key, cached=True)
    evalset = load_eval_set(spec)
    model = load_model(spec, checkpoint)

    def call(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = model(*(torch.from_numpy(batch[i.name]) for i in spec.inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {spec_out.name: _as_numpy(value) for spec_out, value in zip(spec.outputs, outs)}

    with torch.no_grad():
        outputs = collect_outputs(spec, evalset.batches(eval_batch_size(spec)), call, STAGE)
    with atomic_writer(path) as handle:
        save_outputs(outputs, handle)
    return ReferenceResult(path=path, key=key, cached=False)


def _as_numpy(value) -> np.ndarray:
    """Floating outputs in FP32 (what the reference is); integer ones (class indices, counts) as they are."""
    return (value.float() if value.is_floating_point() else value).numpy()


def load_reference(result: ReferenceResult) -> Outputs:
    return outputs_from_arrays(load_arrays(result.path, what="reference outputs"))
