"""Calibration sets: read into arrays keyed by model input name, ready for quantization.

Three formats (see ``calibration_data/README.md``):

- ``.npz`` with one array per input name (samples stacked on the first, batch, axis) and an
  optional labels array, already preprocessed;
- ``.npy`` with the one array of a single-input model, already preprocessed;
- a folder of PNG/JPEG images, turned into model input with the spec's ``Preprocessing``
  (color, resize, scale, mean/std, layout). With ``calibration.labels`` set, each image's
  class is the name of the subfolder it sits in.

Arrays are returned as stored: checking them against the spec is the job of
``trtforge.stages.validate_calibration``.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtforge.errors import CalibrationError
from trtforge.spec import CalibrationSpec, InputSpec, ModelSpec, Preprocessing

STAGE = "calibration"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
NUMERIC_KINDS = frozenset("biuf")


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration set in memory.

    ``arrays`` hold one array per input name, samples on axis 0; ``sample_names`` name those
    samples (the index as text for arrays, the path relative to the folder for images).
    ``unreadable`` maps image files that could not be decoded to the reason; it is only ever
    non-empty when the set was loaded with ``skip_unreadable=True``.
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    sample_names: list[str]
    sha256: str
    source: Path
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return len(self.sample_names)


def calibration_spec(spec: ModelSpec, data: Path | None = None) -> CalibrationSpec:
    """The spec's calibration section, with ``data`` (when given) replacing its data path."""
    if spec.calibration is None:
        if data is None:
            raise CalibrationError(
                STAGE,
                f"spec {spec.name!r} has no 'calibration' section: add one with 'data: PATH' "
                "(.npz, .npy or an image folder), or pass the data path explicitly (--data)",
            )
        return CalibrationSpec(data=Path(data))
    if data is None:
        return spec.calibration
    return spec.calibration.model_copy(update={"data": Path(data)})


def load_calibration(spec: ModelSpec, data: Path | None = None, *, skip_unreadable: bool = False) -> CalibrationSet:
    """Read the calibration set named by the spec (or ``data``) into arrays keyed by input name.

    Image files that cannot be decoded raise a ``CalibrationError`` naming each of them, unless
    ``skip_unreadable`` is set: then they are left out and listed in ``CalibrationSet.unreadable``.
    """
    cal = calibration_spec(spec, data)
    path = cal.data
    if not path.exists():
        raise CalibrationError(
            STAGE,
            f"calibration data {path} does not exist: fix calibration.data in the spec or pass another path (--data)",
        )
    if path.is_dir():
        loaded = _read_image_folder(path, spec, cal)
        if loaded.unreadable and not skip_unreadable:
            raise CalibrationError(STAGE, _unreadable_message(path, loaded.unreadable))
        return loaded
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays, labels = _read_npz(path, spec, cal)
    elif suffix == ".npy":
        arrays, labels = _read_npy(path, spec, cal)
    else:
        raise CalibrationError(
            STAGE,
            f"calibration data {path} has an unsupported type {path.suffix!r}: "
            "use an .npz keyed by input name, an .npy for a single-input model, or a folder of PNG/JPEG images",
        )
    count = len(next(iter(arrays.values())))
    return CalibrationSet(
        arrays=arrays,
        labels=labels,
        sample_names=[str(i) for i in range(count)],
        sha256=content_sha256(arrays, labels),
        source=path,
    )


def content_sha256(arrays: dict[str, np.ndarray], labels: np.ndarray | None) -> str:
    """Hash of the set's content (names, dtypes, shapes, values), independent of the file format."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    if labels is not None:
        labels = np.ascontiguousarray(labels)
        digest.update(json.dumps(["<labels>", labels.dtype.str, list(labels.shape)]).encode())
        digest.update(labels.tobytes())
    return digest.hexdigest()


def _read_npz(path: Path, spec: ModelSpec, cal: CalibrationSpec) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CalibrationError(
            STAGE, f"calibration data {path} is not a readable .npz ({err}): write it with numpy.savez"
        ) from None
    names = [i.name for i in spec.inputs]
    missing = [n for n in names if n not in stored]
    if missing:
        raise CalibrationError(
            STAGE,
            f"calibration data {path} has no array for input(s) {missing} (it holds {sorted(stored)}): "
            "save one array per model input, keyed by the input name",
        )
    arrays = {n: stored[n] for n in names}
    labels = None
    if cal.labels is not None:
        if cal.labels not in stored:
            raise CalibrationError(
                STAGE,
                f"calibration data {path} has no labels array {cal.labels!r} (it holds {sorted(stored)}): "
                "add it, or fix or remove calibration.labels in the spec",
            )
        labels = stored[cal.labels]
    _check_arrays(path, arrays, labels)
    return arrays, labels


def _read_npy(path: Path, spec: ModelSpec, cal: CalibrationSpec) -> tuple[dict[str, np.ndarray], None]:
    only = _single_input(spec, path, "an .npy")
    if cal.labels is not None:
        raise CalibrationError(
            STAGE,
            f"calibration data {path} is an .npy, which holds no labels: save the set as an .npz with "
            f"arrays {only.name!r} and {cal.labels!r}, or remove calibration.labels from the spec",
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CalibrationError(
            STAGE, f"calibration data {path} is not a readable .npy ({err}): write it with numpy.save"
        ) from None
    arrays = {only.name: array}
    _check_arrays(path, arrays, None)
    return arrays, None


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
    for name, array in arrays.items():
        if array.dtype.kind not in NUMERIC_KINDS:
            raise CalibrationError(
                STAGE, f"array {name!r} in {path} has dtype {array.dtype}: calibration arrays must be numeric"
            )
        if array.ndim == 0 or len(array) == 0:
            raise CalibrationError(
                STAGE, f"array {name!r} in {path} holds no samples (shape {array.shape}): stack samples on axis 0"
            )
    counts = {name: len(array) for name, array in arrays.items()}
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise CalibrationError(
                STAGE,
                f"labels in {path} must be a 1-D integer array of class indices, got {labels.dtype} of shape {labels.shape}",
            )
        counts["<labels>"] = len(labels)
    if len(set(counts.values())) > 1:
        raise CalibrationError(
            STAGE, f"arrays in {path} hold different numbers of samples {counts}: every array needs one entry per sample"
        )


def _single_input(spec: ModelSpec, path: Path, what: str) -> InputSpec:
    if len(spec.inputs) != 1:
        raise CalibrationError(
            STAGE,
            f"calibration data {path} is {what}, which feeds a single-input model, but spec {spec.name!r} has "
            f"inputs {[i.name for i in spec.inputs]}: use an .npz with one array per input name",
        )
    return spec.inputs[0]


@dataclass
class _ImageRead:
    pixels: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)


def _read_image_folder(folder: Path, spec: ModelSpec, cal: CalibrationSpec) -> CalibrationSet:
    from PIL import Image

    only = _single_input(spec, folder, "an image folder")
    if only.dtype not in ("float32", "float16"):
        raise CalibrationError(
            STAGE,
            f"calibration data {folder} is an image folder, but input {only.name!r} takes {only.dtype}: "
            "images can only feed float32/float16 inputs; save the set as an .npz instead",
        )
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise CalibrationError(
            STAGE, f"calibration folder {folder} holds no .png, .jpg or .jpeg files: put the calibration images there"
        )
    with_labels = cal.labels is not None
    if with_labels:
        loose = [p.relative_to(folder).as_posix() for p in files if p.parent == folder]
        if loose:
            raise CalibrationError(
                STAGE,
                f"calibration folder {folder} has images outside class subfolders ({', '.join(loose[:5])}): with "
                "calibration.labels set, put each image in a subfolder named by its class (e.g. 3/img.png)",
            )
    preprocessing = cal.preprocessing or Preprocessing()
    read = _ImageRead()
    for path in files:
        name = path.relative_to(folder).as_posix()
        try:
            with Image.open(path) as image:
                pixels = _preprocess(image, preprocessing)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            read.unreadable[name] = f"{type(err).__name__}: {err}"
            continue
        read.pixels.append(pixels)
        read.names.append(name)
        read.classes.append(path.relative_to(folder).parts[0])
    if not read.pixels:
        raise CalibrationError(STAGE, _unreadable_message(folder, read.unreadable))
    _check_same_size(folder, read)
    array = np.stack(read.pixels).astype(only.dtype)
    arrays = {only.name: array}
    labels = _class_indices(read.classes) if with_labels else None
    return CalibrationSet(
        arrays=arrays,
        labels=labels,
        sample_names=read.names,
        sha256=content_sha256(arrays, labels),
        source=folder,
        unreadable=read.unreadable,
    )


def _preprocess(image, preprocessing: Preprocessing) -> np.ndarray:
    """One decoded image to one model-input sample (without the batch axis)."""
    from PIL import Image

    image = image.convert("L" if preprocessing.color == "gray" else "RGB")
    if preprocessing.resize is not None:
        height, width = preprocessing.resize
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(preprocessing.scale)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if preprocessing.mean is not None:
        pixels = (pixels - np.asarray(preprocessing.mean, np.float32)) / np.asarray(preprocessing.std, np.float32)
    return pixels.transpose(2, 0, 1) if preprocessing.layout == "NCHW" else pixels


def _check_same_size(folder: Path, read: _ImageRead) -> None:
    shapes = Counter(p.shape for p in read.pixels)
    if len(shapes) == 1:
        return
    common, count = shapes.most_common(1)[0]
    odd = [name for name, pixels in zip(read.names, read.pixels) if pixels.shape != common]
    raise CalibrationError(
        STAGE,
        f"images in {folder} have different sizes: {count} give shape {common}, but {', '.join(odd[:10])}"
        f"{' and more' if len(odd) > 10 else ''} differ: set calibration.preprocessing.resize to the model's (height, width)",
    )


def _class_indices(classes: list[str]) -> np.ndarray:
    """Class folder names to indices: the number itself for numeric names, else torchvision's sorted order."""
    names = sorted(set(classes))
    if all(n.isdigit() for n in names):
        return np.asarray([int(c) for c in classes], dtype=np.int64)
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[c] for c in classes], dtype=np.int64)


def _unreadable_message(folder: Path, unreadable: dict[str, str]) -> str:
    listed = "; ".join(f"{name} ({reason})" for name, reason in list(unreadable.items())[:10])
    more = f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
    return (
        f"{len(unreadable)} image file(s) in {folder} cannot be read: {listed}{more}. "
        "Replace or delete them, then run again"
    )
