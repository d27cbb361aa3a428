"""Stage 'simplify': onnxsim with dynamic dims kept dynamic, then the same numeric check as export.

onnxsim runs in a child process: it is native code that can crash on unusual graphs. A
failure fails the run with onnxsim's own message; there is no silent fallback to the
unsimplified model, because a user who asked for a simplified engine must know.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from trtforge.errors import StageError
from trtforge.hashing import sha256_file
from trtforge.isolation import run_isolated
from trtforge.numeric import max_abs_diff_by_level, onnx_runner
from trtforge.safeio import atomic_output, load_onnx_safely
from trtforge.spec import ModelSpec

STAGE = "simplify"


class SimplifyResult(BaseModel):
    onnx_path: Path
    sha256: str
    nodes_before: int
    nodes_after: int
    max_abs_diff: dict[str, float]
    seconds: float


def _simplify_file(source: str, destination: str, plugins: list[str]) -> tuple[int, int]:
    """Runs in the child: onnxsim on ``source``, written to ``destination``. Returns node counts.

    ``source`` is checked like any untrusted ONNX (external data, tensor sizes, operator
    domains) before onnxsim or onnxruntime reads it, also when export wrote it.
    """
    import onnx
    import onnxsim

    model = load_onnx_safely(Path(source), plugins=plugins)
    before = len(model.graph.node)
    # check_n=0: the parent compares outputs itself at the spec's min/opt/max shapes, which
    # onnxsim cannot know for dynamic inputs.
    simplified, _ = onnxsim.simplify(model, check_n=0)
    onnx.save(simplified, destination)
    return before, len(simplified.graph.node)


def simplify_onnx(spec: ModelSpec, onnx_path: Path, out_dir: Path) -> SimplifyResult:
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.sim.onnx"
    with atomic_output(target) as partial:
        before, after = run_isolated(
            STAGE,
            _simplify_file,
            str(onnx_path),
            str(partial),
            list(spec.plugins),
            timeout_s=spec.isolation.timeout_s,
            memory_mb=spec.isolation.memory_mb,
        )
        outputs = [o.name for o in spec.outputs]
        diffs = max_abs_diff_by_level(
            spec,
            onnx_runner(partial, outputs),
            onnx_runner(onnx_path, outputs, disable_optimizations=True),
        )
        worst = max(diffs.values())
        if worst > spec.export.tolerance:
            raise StageError(
                STAGE, f"simplified model differs from the exported one by {worst:.3g}, over export.tolerance {spec.export.tolerance:g}"
            )
    return SimplifyResult(
        onnx_path=target,
        sha256=sha256_file(target),
        nodes_before=before,
        nodes_after=after,
        max_abs_diff=diffs,
        seconds=time.perf_counter() - started,
    )
