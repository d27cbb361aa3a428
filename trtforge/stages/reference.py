"""The PyTorch FP32 reference outputs on the eval set: computed once per (checkpoint, eval set, spec model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel

from trtforge.evalset import eval_batch_size, load_eval_set
from trtforge.hashing import sha256_file, sha256_text
from trtforge.modelload import load_model
from trtforge.safeio import atomic_writer, load_arrays
from trtforge.spec import ModelSpec


class ReferenceResult(BaseModel):
    path: Path
    key: str
    cached: bool


def reference_outputs(spec: ModelSpec, checkpoint: Path, cache_dir: Path) -> ReferenceResult:
    """Run the PyTorch model in FP32 over the eval set; outputs saved as .npz keyed by output name."""
    import torch

    key = sha256_text(sha256_file(checkpoint), sha256_file(spec.eval.data), spec.model, repr(sorted(spec.model_kwargs.items())))
    path = cache_dir / f"reference-{key[:24]}.npz"
    if path.is_file():
        return ReferenceResult(path=path, key=key, cached=True)
    evalset = load_eval_set(spec)
    model = load_model(spec, checkpoint)
    collected: dict[str, list[np.ndarray]] = {o.name: [] for o in spec.outputs}
    with torch.no_grad():
        for batch in evalset.batches(eval_batch_size(spec)):
            out = model(*(torch.from_numpy(batch[i.name]) for i in spec.inputs))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for spec_out, value in zip(spec.outputs, outs):
                collected[spec_out.name].append(value.float().numpy())
    with atomic_writer(path) as handle:
        np.savez(handle, **{name: np.concatenate(parts) for name, parts in collected.items()})
    return ReferenceResult(path=path, key=key, cached=False)


def load_reference(result: ReferenceResult) -> dict[str, np.ndarray]:
    return load_arrays(result.path, what="reference outputs")
