"""Calibration sets: read into arrays keyed by model input name, ready for quantization.

Three formats (see ``calibration_data/README.md``):

- ``.npz`` with one array per input name (samples stacked on the first, batch, axis) and an
  optional labels array, already preprocessed;
- ``.npy`` with the one array of a single-input model, already preprocessed;
- a folder of PNG/JPEG images, turned into model input with the spec's ``Preprocessing``
  (color, resize, scale, mean/std, layout). With ``calibration.labels`` set, each image's
  class is the name of the subfolder it sits in;
- any of these packed in a ``.tar``, ``.tar.gz``/``.tgz`` or ``.zip`` archive.

Archives are untrusted: they are unpacked into a temporary folder that is removed afterwards,
and refused before anything is written when a member's path is absolute or climbs out with
``..``, when a member is a symbolic link, a hard link to anything but an earlier file of the
archive, a device or a FIFO, or when the archive holds more members, more bytes or a higher
unpacked-to-packed ratio than the spec's ``max_archive_*`` caps (zip bombs). Tar members go
through tarfile's ``data`` filter as well. An ``.npz`` is a zip archive too: ``trtforge.safeio``
reads it (and an ``.npy``), holding its declared sizes to the same caps before numpy allocates
anything; a bad array file is a ``DataFileError``.

Arrays are returned as stored: checking them against the spec is the job of
``trtforge.stages.validate_calibration``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from trtforge.errors import CalibrationError, DataFileError
from trtforge.safeio import ArchiveLimits, load_array, load_arrays
from trtforge.spec import CalibrationSpec, InputSpec, ModelSpec, Preprocessing

STAGE = "calibration"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ARRAY_SUFFIXES = frozenset({".npz", ".npy"})
NUMERIC_KINDS = frozenset("biuf")
TAR_SUFFIXES = {".tar": "r:", ".tar.gz": "r:gz", ".tgz": "r:gz"}
ZIP_SUFFIX = ".zip"
# Folders that archivers add beside the content (macOS resource forks).
ARCHIVER_LITTER = frozenset({"__MACOSX"})
COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration set in memory.

    ``arrays`` hold one array per input name, samples on axis 0; ``sample_names`` name those
    samples (the index as text for arrays, the path relative to the folder for images).
    ``unreadable`` maps image files that could not be decoded to the reason; it is only ever
    non-empty when the set was loaded with ``skip_unreadable=True``. ``from_images`` tells
    whether the samples were decoded from image files (a folder, or an archive of images).
    ``image_ids`` name each sample's image in COCO or YOLO ``calibration.annotations``: the
    ``calibration.sample_ids`` array of an .npz, an image file's name without its suffix.
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    sample_names: list[str]
    sha256: str
    source: Path
    unreadable: dict[str, str] = field(default_factory=dict)
    from_images: bool = False
    image_ids: np.ndarray | None = None

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
                "(.npz, .npy, an image folder or a .tar/.tar.gz/.zip of them), or pass the data path explicitly (--data)",
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
    if path.is_file() and _archive_suffix(path) is not None:
        return _load_archive(path, spec, cal, skip_unreadable)
    return _load_unpacked(path, spec, cal, skip_unreadable)


def _load_unpacked(path: Path, spec: ModelSpec, cal: CalibrationSpec, skip_unreadable: bool) -> CalibrationSet:
    if path.is_dir():
        loaded = _read_image_folder(path, spec, cal)
        if loaded.unreadable and not skip_unreadable:
            raise CalibrationError(STAGE, _unreadable_message(path, loaded.unreadable))
        return loaded
    suffix = path.suffix.lower()
    image_ids = None
    if suffix == ".npz":
        arrays, labels, image_ids = _read_npz(path, spec, cal)
    elif suffix == ".npy":
        arrays, labels = _read_npy(path, spec, cal)
    else:
        raise CalibrationError(
            STAGE,
            f"calibration data {path} has an unsupported type {path.suffix!r}: "
            "use an .npz keyed by input name, an .npy for a single-input model, a folder of PNG/JPEG images, "
            "or a .tar, .tar.gz or .zip archive of one of these",
        )
    count = len(next(iter(arrays.values())))
    return CalibrationSet(
        arrays=arrays,
        labels=labels,
        sample_names=[str(i) for i in range(count)],
        sha256=content_sha256(arrays, labels),
        source=path,
        image_ids=image_ids,
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


def _read_npz(path: Path, spec: ModelSpec, cal: CalibrationSpec) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    stored = load_arrays(path, what="calibration data", limits=archive_limits(cal))
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
    image_ids = stored.get(cal.sample_ids) if cal.annotation_format in ("coco", "yolo") else None
    count = len(next(iter(arrays.values())))
    if image_ids is not None and image_ids.shape != (count,):
        raise CalibrationError(
            STAGE,
            f"array {cal.sample_ids!r} in {path} has shape {list(image_ids.shape)}: it names each of the {count} samples' image "
            "in calibration.annotations, one id per sample (calibration.sample_ids names the array)",
        )
    return arrays, labels, image_ids


def _read_npy(path: Path, spec: ModelSpec, cal: CalibrationSpec) -> tuple[dict[str, np.ndarray], None]:
    only = _single_input(spec, path, "an .npy")
    if cal.labels is not None:
        raise CalibrationError(
            STAGE,
            f"calibration data {path} is an .npy, which holds no labels: save the set as an .npz with "
            f"arrays {only.name!r} and {cal.labels!r}, or remove calibration.labels from the spec",
        )
    arrays = {only.name: load_array(path, what="calibration data", limits=archive_limits(cal))}
    _check_arrays(path, arrays, None)
    return arrays, None


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
    for name, array in arrays.items():
        if array.dtype.kind not in NUMERIC_KINDS:
            raise CalibrationError(STAGE, f"array {name!r} in {path} has dtype {array.dtype}: calibration arrays must be numeric")
        if array.ndim == 0 or len(array) == 0:
            raise CalibrationError(STAGE, f"array {name!r} in {path} holds no samples (shape {array.shape}): stack samples on axis 0")
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
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise CalibrationError(STAGE, f"calibration folder {folder} holds no .png, .jpg or .jpeg files: put the calibration images there")
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
                pixels = preprocess_image(image, preprocessing)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            read.unreadable[name] = f"{type(err).__name__}: {err}"
            continue
        read.pixels.append(pixels)
        read.names.append(name)
        read.classes.append(path.relative_to(folder).parts[0])
    if not read.pixels:
        raise CalibrationError(STAGE, _unreadable_message(folder, read.unreadable))
    _check_same_size(folder, read, only, preprocessing)
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
        from_images=True,
        image_ids=np.asarray([PurePosixPath(name).with_suffix("").as_posix() for name in read.names]),
    )


def preprocess_image(image, preprocessing: Preprocessing) -> np.ndarray:
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


def _check_same_size(folder: Path, read: _ImageRead, only: InputSpec, preprocessing: Preprocessing) -> None:
    shapes = Counter(p.shape for p in read.pixels)
    if len(shapes) == 1:
        return
    common, count = shapes.most_common(1)[0]
    odd = [name for name, pixels in zip(read.names, read.pixels) if pixels.shape != common]
    shape = only.shape_at("opt")
    if len(shape) == 4:
        height, width = shape[1:3] if preprocessing.layout == "NHWC" else shape[2:4]
        fix = f"set calibration.preprocessing.resize to [{height}, {width}], the (height, width) of input {only.name!r}"
    else:
        fix = "set calibration.preprocessing.resize to the model's (height, width)"
    raise CalibrationError(
        STAGE,
        f"images in {folder} have different sizes: {count} give shape {common}, but {', '.join(odd[:10])}"
        f"{' and more' if len(odd) > 10 else ''} differ: {fix}",
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
    return f"{len(unreadable)} image file(s) in {folder} cannot be read: {listed}{more}. Replace or delete them, then run again"


# --------------------------------------------------------------------------- archives


def archive_limits(cal: CalibrationSpec) -> ArchiveLimits:
    """The spec's ``calibration.max_archive_*`` caps, for calibration archives and array files alike."""
    return ArchiveLimits(cal.max_archive_members, cal.max_archive_bytes, cal.max_archive_ratio, setting="calibration.max_archive")


def _archive_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in (*TAR_SUFFIXES, ZIP_SUFFIX) if name.endswith(suffix)), None)


def extract_archive(archive: Path, destination: Path, limits: ArchiveLimits) -> list[str]:
    """Unpack a .tar, .tar.gz/.tgz or .zip ``archive`` into the folder ``destination``; return the member names.

    Every member is checked before anything is written (see the module docstring); bytes are
    counted again while writing. Nothing is ever written outside ``destination``.
    """
    suffix = _archive_suffix(archive)
    if suffix is None:
        raise CalibrationError(
            STAGE, f"calibration archive {archive} is not a .tar, .tar.gz, .tgz or .zip file: pack the set as one of these"
        )
    if suffix == ZIP_SUFFIX:
        return _extract_zip(archive, destination, limits)
    return _extract_tar(archive, destination, TAR_SUFFIXES[suffix], limits)


def _refuse(archive: Path, member: str, reason: str) -> CalibrationError:
    return CalibrationError(
        STAGE,
        f"calibration archive {archive} was refused: member {member!r} {reason}. Pack only plain files and "
        "folders, from inside the calibration folder (e.g. tar -czf calib.tar.gz -C DIR .)",
    )


def _over_limits(archive: Path, limits: ArchiveLimits, unpacked: int) -> CalibrationError:
    return CalibrationError(STAGE, limits.too_large("calibration archive", archive, unpacked))


def _too_many_members(archive: Path, limits: ArchiveLimits) -> CalibrationError:
    return CalibrationError(STAGE, limits.too_many_members("calibration archive", archive))


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The member's path inside the archive, refused when it is absolute or climbs out with '..'."""
    if "\0" in name:
        raise _refuse(archive, name, "has a NUL character in its name")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise _refuse(archive, name, "has an absolute path")
    # Backslashes separate folders on Windows only: '..' is refused in either reading.
    if ".." in PurePosixPath(name).parts or ".." in PureWindowsPath(name).parts:
        raise _refuse(archive, name, "climbs out of the archive's folder with '..'")
    return PurePosixPath(name).parts


def _extract_tar(archive: Path, destination: Path, mode: str, limits: ArchiveLimits) -> list[str]:
    try:
        with tarfile.open(archive, mode) as tar:
            members = _scan_tar(archive, tar, limits)
            budget = limits.byte_budget(archive)
            written = 0
            for member in members:
                try:
                    # set_attrs=False: modes from the archive could make a folder unwritable mid-extraction.
                    tar.extract(member, destination, set_attrs=False, filter="data")
                except tarfile.FilterError as err:
                    raise _refuse(archive, member.name, f"was refused by tarfile's data filter ({err})") from None
                if member.isreg():
                    written += os.lstat(destination.joinpath(*PurePosixPath(member.name).parts)).st_size
                    if written > budget:
                        raise _over_limits(archive, limits, written)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise CalibrationError(
            STAGE, f"calibration archive {archive} is not a readable tar archive ({type(err).__name__}: {err}): pack it again"
        ) from None
    return [member.name for member in members]


def _scan_tar(archive: Path, tar: tarfile.TarFile, limits: ArchiveLimits) -> list[tarfile.TarInfo]:
    """Every member's header, checked; stops at the first one over a cap, so a bomb is never inflated in full."""
    members: list[tarfile.TarInfo] = []
    files: set[PurePosixPath] = set()
    budget = limits.byte_budget(archive)
    declared = 0
    while (member := tar.next()) is not None:
        if len(members) == limits.max_members:
            raise _too_many_members(archive, limits)
        parts = _member_parts(archive, member.name)
        if member.issym():
            # Python's data filter has been bypassed by chains of symbolic links (CVE-2025-4517),
            # and a calibration set has no use for them: refused outright.
            raise _refuse(archive, member.name, f"is a symbolic link (to {member.linkname!r})")
        if member.islnk():
            if PurePosixPath(member.linkname) not in files:
                raise _refuse(archive, member.name, f"is a hard link to {member.linkname!r}, which is not an earlier file of the archive")
        elif member.isreg():
            declared += member.size
            if declared > budget:
                raise _over_limits(archive, limits, declared)
            files.add(PurePosixPath(*parts))
        elif not member.isdir():
            kind = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}
            raise _refuse(archive, member.name, f"is {kind.get(member.type, 'a special file')}")
        members.append(member)
    return members


def _extract_zip(archive: Path, destination: Path, limits: ArchiveLimits) -> list[str]:
    try:
        with zipfile.ZipFile(archive) as bundle:
            infos = bundle.infolist()
            if len(infos) > limits.max_members:
                raise _too_many_members(archive, limits)
            budget = limits.byte_budget(archive)
            declared = 0
            for info in infos:
                _member_parts(archive, info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind == stat.S_IFLNK:
                    raise _refuse(archive, info.filename, "is a symbolic link")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise _refuse(archive, info.filename, "is a device file or FIFO")
                if info.flag_bits & 0x1:
                    raise _refuse(archive, info.filename, "is encrypted")
                declared += info.file_size
                if declared > budget:
                    raise _over_limits(archive, limits, declared)
            written = 0
            for info in infos:
                written = _write_zip_member(archive, bundle, info, destination, written, budget, limits)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError) as err:
        raise CalibrationError(
            STAGE, f"calibration archive {archive} is not a readable zip archive ({type(err).__name__}: {err}): pack it again"
        ) from None
    return [info.filename for info in infos]


def _write_zip_member(
    archive: Path,
    bundle: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    destination: Path,
    written: int,
    budget: int,
    limits: ArchiveLimits,
) -> int:
    """Write one member beside the ``written`` bytes of earlier ones; return the new total.

    Our own containment: no symbolic link is ever created, so none can be followed, and each
    file is created fresh (never opened through an existing path).
    """
    parts = PurePosixPath(info.filename).parts
    is_folder = info.is_dir() or stat.S_IFMT(info.external_attr >> 16) == stat.S_IFDIR
    folder = destination
    for part in parts if is_folder else parts[:-1]:
        folder = folder / part
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                raise _refuse(archive, info.filename, f"needs folder {part!r}, which the archive also holds as a file") from None
    if is_folder or not parts:
        return written
    try:
        handle = os.open(folder / parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise _refuse(archive, info.filename, "appears more than once") from None
    member_bytes = 0
    with bundle.open(info) as source, os.fdopen(handle, "wb") as target:
        while chunk := source.read(COPY_CHUNK):
            member_bytes += len(chunk)
            if member_bytes > info.file_size:
                raise _refuse(archive, info.filename, f"unpacks to more than the {info.file_size} bytes it declares")
            if written + member_bytes > budget:
                raise _over_limits(archive, limits, written + member_bytes)
            target.write(chunk)
    return written + member_bytes


def _archive_content(archive: Path, folder: Path) -> Path:
    """What the unpacked archive holds: its one .npz/.npy, else the folder of images."""
    arrays = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES)
    if len(arrays) > 1:
        names = ", ".join(p.relative_to(folder).as_posix() for p in arrays[:5])
        raise CalibrationError(
            STAGE,
            f"calibration archive {archive} holds several array files ({names}): pack exactly one .npz or .npy, or only images",
        )
    if arrays:
        return arrays[0]
    if not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*")):
        raise CalibrationError(
            STAGE, f"calibration archive {archive} holds no .npz, .npy, .png, .jpg or .jpeg file: pack the calibration set itself"
        )
    # A folder packed by name (calib/0/a.png) rather than from inside (0/a.png): its content is the set.
    entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in ARCHIVER_LITTER]
    if len(entries) == 1 and entries[0].is_dir():
        only = entries[0]
        if not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in only.iterdir()):
            return only
    return folder


def _load_archive(archive: Path, spec: ModelSpec, cal: CalibrationSpec, skip_unreadable: bool) -> CalibrationSet:
    with tempfile.TemporaryDirectory(prefix="trtforge-calibration-") as unpacked:
        folder = Path(unpacked)
        extract_archive(archive, folder, archive_limits(cal))
        content = _archive_content(archive, folder)
        try:
            loaded = _load_unpacked(content, spec, cal, skip_unreadable)
        except (CalibrationError, DataFileError) as err:
            # Name the file inside the archive, not the temporary folder that is about to vanish.
            raise type(err)(str(err).replace(f"{folder}/", f"{archive}:").replace(str(folder), str(archive))) from None
    return replace(loaded, source=archive)
