"""What a zoo spec's run needs, written when it is missing: the ``train`` entry point of every spec here.

Each entry point (``resnet50``, ``vit_b16``, ``swin_t``, ``yolov8n``) reads its own spec, so the
model, the input size, the preprocessing and the paths are said once, in the YAML, and writes:

- a calibration image folder: ``calibration.min_samples`` PNG scenes from the shapes examples'
  generator (``examples/shapes-detector/shapes_scenes.py``, imported from there), drawn at its
  64x64 and brought to the model's resolution by ``calibration.preprocessing.resize``;
- the eval set ``eval.data``: other scenes, through the same preprocessing
  (``trtforge.calibration.preprocess_image``, the function the calibration folder is read with);
  for the detector also its COCO ground truth ``eval.annotations`` (the shapes detector's
  ``coco_annotations``), with the boxes scaled to the model's input;
- last, the checkpoint: the spec's model with seeded random weights, as safetensors. Nothing is
  downloaded. A run finds the checkpoint only once everything before it is written.

``python zoo_prepare.py resnet50.yaml`` does the same outside a run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from trtforge.calibration import preprocess_image
from trtforge.modelload import build_model
from trtforge.safeio import atomic_output
from trtforge.spec import ModelSpec, load_spec

HERE = Path(__file__).resolve().parent
# The scene generator and its COCO writer live with the shapes detector; imported from its folder, not copied.
sys.path.insert(0, str(HERE.parent / "shapes-detector"))
from detector_data import coco_annotations  # noqa: E402
from shapes_scenes import SIZE, make_scenes  # noqa: E402

EVAL_IMAGES = 64
# Disjoint seed ranges: no scene is both calibrated on and evaluated.
EVAL_FIRST_SEED = 5_000_000
CALIBRATION_FIRST_SEED = 6_000_000
WEIGHTS_SEED = 0


def _write_atomically(path: Path, write: Callable) -> None:
    """The file whole or absent: a run that stops half-way leaves nothing a later run takes for finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, durable=False) as partial, partial.open("wb") as handle:
        write(handle)


def _png(scene_image: np.ndarray):
    """A scene as the 8-bit RGB image a PNG holds."""
    from PIL import Image

    pixels = np.round(scene_image.transpose(1, 2, 0) * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _write_calibration(spec: ModelSpec) -> None:
    folder = spec.calibration.data
    scenes = make_scenes(CALIBRATION_FIRST_SEED, spec.calibration.min_samples)
    for index, scene in enumerate(scenes):
        path = folder / f"scene_{index:04d}.png"
        if not path.is_file():
            _write_atomically(path, lambda f, image=_png(scene.image): image.save(f, format="PNG"))


def _eval_inputs(spec: ModelSpec, scenes) -> np.ndarray:
    preprocessing = spec.calibration.preprocessing
    return np.stack([preprocess_image(_png(scene.image), preprocessing) for scene in scenes]).astype(np.float32)


def _write_checkpoint(spec: ModelSpec, checkpoint: Path) -> None:
    import torch
    from safetensors.torch import save

    torch.manual_seed(WEIGHTS_SEED)
    model = build_model(spec)
    # torchvision starts ViT's classifier at zero (for fine-tuning): every logit would be 0, and the
    # gate's cosine with the reference 0. A weight matrix left at zero is drawn like a linear layer's.
    for parameter in model.parameters():
        if parameter.dim() == 2 and not parameter.any():
            torch.nn.init.trunc_normal_(parameter.data, std=0.02)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    _write_atomically(checkpoint, lambda f: f.write(save(state)))


def prepare_classifier(spec_file: str, checkpoint: Path) -> dict[str, float]:
    spec = load_spec(HERE / spec_file)
    _write_calibration(spec)
    if not spec.eval.data.is_file():
        scenes = make_scenes(EVAL_FIRST_SEED, EVAL_IMAGES)
        name = spec.inputs[0].name
        _write_atomically(spec.eval.data, lambda f: np.savez(f, **{name: _eval_inputs(spec, scenes)}))
    _write_checkpoint(spec, Path(checkpoint))
    return {}


def prepare_detector(spec_file: str, checkpoint: Path) -> dict[str, float]:
    spec = load_spec(HERE / spec_file)
    _write_calibration(spec)
    if not spec.eval.annotations.is_file():
        height, width = spec.calibration.preprocessing.resize
        scenes = make_scenes(EVAL_FIRST_SEED, EVAL_IMAGES)
        # PIL's resize maps pixel edges onto pixel edges: a box scales with the image.
        scale = np.array([width, height, width, height], dtype=np.float64) / SIZE
        truth = coco_annotations([replace(scene, boxes=scene.boxes * scale) for scene in scenes])
        for image in truth["images"]:
            image.update(width=width, height=height)
        name = spec.inputs[0].name
        ids = np.array([image["id"] for image in truth["images"]])
        _write_atomically(spec.eval.data, lambda f: np.savez(f, **{name: _eval_inputs(spec, scenes), spec.eval.sample_ids: ids}))
        _write_atomically(spec.eval.annotations, lambda f: f.write(json.dumps(truth).encode()))
    _write_checkpoint(spec, Path(checkpoint))
    return {}


def resnet50(checkpoint: Path) -> dict[str, float]:
    return prepare_classifier("resnet50.yaml", checkpoint)


def vit_b16(checkpoint: Path) -> dict[str, float]:
    return prepare_classifier("vit_b16.yaml", checkpoint)


def swin_t(checkpoint: Path) -> dict[str, float]:
    return prepare_classifier("swin_t.yaml", checkpoint)


def yolov8n(checkpoint: Path) -> dict[str, float]:
    return prepare_detector("yolov8n.yaml", checkpoint)


def build_yolov8n(num_classes: int = 80):
    """Ultralytics' YOLOv8n (``yolov8n.yaml``, random weights) returning its raw ``[B, 4 + classes, anchors]`` head.

    Ultralytics (AGPL-3.0) is not a trtforge dependency: ``pip install ultralytics`` to use this.
    The state dict keys are Ultralytics' own (``model.0.conv.weight`` ...), so the weights of a
    trained ``best.pt`` (``torch.load(...)["model"].float().state_dict()``) saved as safetensors load.
    """
    import ultralytics
    from ultralytics.nn.tasks import DetectionModel

    # Ultralytics reads a config named 'yolov8n.yaml' from the working directory first, which in this
    # folder is the spec: name its own by path (it keeps one yolov8.yaml and takes the scale from the name).
    config = Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8n.yaml"
    model = DetectionModel(str(config), nc=num_classes, verbose=False).eval()
    head = model.model[-1]
    # Only the decoded head, not (head, feature maps): the tensor the yolo decoder reads.
    head.export = True
    # The anchor grid is made in every call, as Ultralytics' own dynamic export does: the cached grid
    # is reused only for the same input shape, and that comparison would fix the batch at export.
    head.dynamic = True
    return model


if __name__ == "__main__":
    entry = {"resnet50.yaml": resnet50, "vit_b16.yaml": vit_b16, "swin_t.yaml": swin_t, "yolov8n.yaml": yolov8n}
    if len(sys.argv) != 2 or sys.argv[1] not in entry:
        sys.exit(f"usage: python zoo_prepare.py {{{','.join(entry)}}}")
    written = load_spec(HERE / sys.argv[1]).checkpoint
    entry[sys.argv[1]](written)
    print(f"wrote {written} and its data")
