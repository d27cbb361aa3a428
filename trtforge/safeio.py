"""Reading files that nobody vouches for, and writing files so that no reader sees half of one.

Reading. An ONNX model is not just numbers: an initializer can name an "external data" file anywhere
on disk, a node can name an operator from a custom domain that only a native plugin library
implements, and a truncated or hand-edited file can declare tensors whose bytes do not match
their shape. ``load_onnx_safely`` checks all of that before onnx reads a single byte of
external data, for every ONNX the pipeline loads, its own export included:

- every external-data ``location`` is a relative path that stays inside the model's folder
  (no ``..``, no absolute path, no symbolic link anywhere on the way, no file with more than
  one hard link, because a hard link may share its content with a file outside), and names
  an existing regular file large enough for the declared offset and length;
- every tensor's byte length (inline ``raw_data``, typed data fields, or external length)
  matches its declared shape and element type;
- every node is in a standard ONNX domain (``""``, ``ai.onnx``, ``ai.onnx.ml``), calls a
  function defined in the model itself, or is declared in ``plugins`` (by domain or op type).
  ``ai.onnx.ml`` is standard: it is specified by ONNX and executed by onnxruntime's own
  kernels, so it needs no outside code; whether TensorRT can run it is for the check-ops
  stage to say;
- the model passes ``onnx.checker``.

Any failure is an ``OnnxModelError`` naming the file, the tensor or node, and the fix.

Arrays (``load_arrays`` for an .npz, ``load_array`` for an .npy) are read without pickle, and
only after their declared sizes passed ``ArchiveLimits``: an .npz is a zip archive, so its
member count, total unpacked size and unpacked-to-packed ratio are capped (zip bombs), and
every array's header must not declare more bytes than the file holds, since numpy allocates
the declared size before reading. Any failure is a ``DataFileError`` naming the file, the array
and the fix.

Writing. ``atomic_write_bytes``, ``atomic_write_text``, ``atomic_write_json``, ``atomic_copy``,
``atomic_writer`` and ``atomic_output`` (for tools that write a file by name) write to a hidden
temporary file with a name unique to the call, in the destination's own folder (a rename is
atomic only within one filesystem), fsync it, rename it over the destination and fsync the
folder, so that after a crash the destination holds either its old content or the new, and
concurrent writers of one path never collide. A failure removes the temporary file and leaves
the destination as it was. ``atomic_directory`` does the same for a whole folder. Temporary names are ``.NAME.tmp-RANDOM``: ``is_temporary`` recognises
them, so a cleaner can tell a crashed write's leftovers from real files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import uuid
import zipfile
import zlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, BinaryIO

from trtforge.errors import DataFileError, TrtforgeError
from trtforge.onnxfacts import STANDARD_DOMAINS, all_nodes

if TYPE_CHECKING:
    import numpy as np

# Element types narrower than a byte are stored packed; the others use their numpy item size.
_PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}
# In the typed (non-raw) fields, 4- and 2-bit values are packed a byte per entry, 6-bit values
# take an entry each, and complex values take two entries (real, imaginary).
_TYPED_ENTRIES_PER_ELEMENT = {"COMPLEX64": 2, "COMPLEX128": 2}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


class OnnxModelError(TrtforgeError):
    """An ONNX file is unreadable or malformed, or refers to data or operators it may not use."""


def load_onnx_safely(path: Path, *, plugins: Sequence[str] = (), load_external_data: bool = True):
    """Parse ``path``, check it as described in the module docstring, then read its external data.

    ``plugins`` lists op domains or op types that the deployment serves with plugins (the spec's
    ``plugins``). With ``load_external_data=False`` the external data is checked but not read:
    the returned model still refers to it.
    """
    import onnx

    path = Path(path)
    model = _parse(path)
    folder = path.parent.resolve()
    for tensor, where in _tensors(model):
        _check_tensor(path, folder, tensor, where)
    _check_domains(path, model, frozenset(plugins))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OnnxModelError(f"ONNX model {path} is not a valid ONNX model: {first_line}; export it again") from None
    if load_external_data:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(folder))
        except (OSError, ValueError, onnx.checker.ValidationError) as err:
            # Only a file changed between the checks above and this read gets here.
            raise OnnxModelError(f"ONNX model {path}: reading its external data failed: {err}") from None
    return model


def _parse(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    try:
        info = path.stat()
    except FileNotFoundError:
        raise OnnxModelError(f"ONNX model {path} does not exist: check the path") from None
    except OSError as err:
        raise OnnxModelError(f"ONNX model {path} cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise OnnxModelError(f"ONNX model {path} is not a regular file: pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise OnnxModelError(
            f"ONNX model {path} cannot be parsed ({type(err).__name__}: {err}): the file is truncated or not an .onnx file; export it again"
        ) from None
    except OSError as err:
        raise OnnxModelError(f"ONNX model {path} cannot be read: {err}") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise OnnxModelError(
            f"ONNX model {path} holds no model (no graph or no IR version): the file is truncated, empty or not "
            "an .onnx file; export it again"
        )
    return model


# --------------------------------------------------------------------------- tensors


def _tensors(model) -> Iterator[tuple[object, str]]:
    """Every TensorProto in the model, with a description of where it sits."""
    yield from _graph_tensors(model.graph, "graph")
    for function in model.functions:
        yield from _node_tensors(function.node, f"function {function.domain}::{function.name}")
    for index, training in enumerate(model.training_info):
        yield from _graph_tensors(training.initialization, f"training_info[{index}].initialization")
        yield from _graph_tensors(training.algorithm, f"training_info[{index}].algorithm")


def _graph_tensors(graph, where: str) -> Iterator[tuple[object, str]]:
    for tensor in graph.initializer:
        yield tensor, f"initializer {tensor.name!r}"
    for sparse in graph.sparse_initializer:
        yield sparse.values, f"sparse initializer {sparse.values.name!r} (values)"
        yield sparse.indices, f"sparse initializer {sparse.values.name!r} (indices)"
    yield from _node_tensors(graph.node, where)


def _node_tensors(nodes, where: str) -> Iterator[tuple[object, str]]:
    for node in nodes:
        label = f"attribute of node {node.name or node.op_type!r} in {where}"
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t, f"{attribute.name} {label}"
            for tensor in attribute.tensors:
                yield tensor, f"{attribute.name} {label}"
            sparse_tensors = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
            for sparse in [*sparse_tensors, *attribute.sparse_tensors]:
                yield sparse.values, f"{attribute.name} {label} (sparse values)"
                yield sparse.indices, f"{attribute.name} {label} (sparse indices)"
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g, f"subgraph {attribute.name!r} of node {node.name or node.op_type!r}")
            for graph in attribute.graphs:
                yield from _graph_tensors(graph, f"subgraph {attribute.name!r} of node {node.name or node.op_type!r}")


def _check_tensor(path: Path, folder: Path, tensor, where: str) -> None:
    import onnx

    type_name = _type_name(tensor.data_type)
    if type_name is None:
        raise OnnxModelError(f"ONNX model {path}: {where} has no valid element type ({tensor.data_type}); export it again")
    if any(d < 0 for d in tensor.dims):
        raise OnnxModelError(f"ONNX model {path}: {where} has negative dimensions {list(tensor.dims)}; export it again")
    elements = math.prod(tensor.dims)
    external = tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL
    if external:
        if type_name == "STRING":
            raise OnnxModelError(f"ONNX model {path}: {where} stores strings as external data, which ONNX does not allow")
        _check_external(path, folder, tensor, where, _byte_length(tensor.data_type, type_name, elements))
        return
    if tensor.HasField("raw_data"):
        if type_name == "STRING":
            raise OnnxModelError(f"ONNX model {path}: {where} stores strings in raw_data, which ONNX does not allow")
        expected = _byte_length(tensor.data_type, type_name, elements)
        if len(tensor.raw_data) != expected:
            raise OnnxModelError(
                f"ONNX model {path}: {where} holds {len(tensor.raw_data)} bytes, but its shape {list(tensor.dims)} "
                f"of {type_name} needs {expected}: the file is corrupt or was edited; export it again"
            )
        return
    filled = [(name, len(getattr(tensor, name))) for name in _TYPED_FIELDS if len(getattr(tensor, name))]
    if not filled:
        if elements:
            raise OnnxModelError(f"ONNX model {path}: {where} declares shape {list(tensor.dims)} but holds no data; export it again")
        return
    field, count = filled[0]
    expected = _typed_entries(type_name, elements)
    if len(filled) > 1 or count != expected:
        raise OnnxModelError(
            f"ONNX model {path}: {where} holds {count} values in {field}, but its shape {list(tensor.dims)} of "
            f"{type_name} needs {expected}: the file is corrupt or was edited; export it again"
        )


def _type_name(data_type: int) -> str | None:
    """The element type's name, or None for UNDEFINED and types this onnx cannot size."""
    import onnx

    if data_type not in onnx.TensorProto.DataType.values() or data_type == onnx.TensorProto.UNDEFINED:
        return None
    name = onnx.TensorProto.DataType.Name(data_type)
    if name not in _PACKED_BITS and name != "STRING":
        try:
            onnx.helper.tensor_dtype_to_np_dtype(data_type)
        except (KeyError, ValueError):
            return None
    return name


def _byte_length(data_type: int, type_name: str, elements: int) -> int:
    import onnx

    bits = _PACKED_BITS.get(type_name)
    if bits is not None:
        return math.ceil(elements * bits / 8)
    return elements * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _typed_entries(type_name: str, elements: int) -> int:
    bits = _PACKED_BITS.get(type_name)
    if bits is not None and bits < 6:
        return math.ceil(elements * bits / 8)
    return elements * _TYPED_ENTRIES_PER_ELEMENT.get(type_name, 1)


def _external_field(path: Path, where: str, entries: dict[str, str], key: str) -> int | None:
    if key not in entries:
        return None
    try:
        value = int(entries[key])
    except ValueError:
        value = -1
    if value < 0:
        raise OnnxModelError(f"ONNX model {path}: {where} has external data {key} {entries[key]!r}, which is not a non-negative integer")
    return value


def external_data_files(model) -> list[str]:
    """The external data locations of a model ``load_onnx_safely`` read (so each is known to stay inside its folder)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return sorted({ExternalDataInfo(t).location for t, _ in _tensors(model) if uses_external_data(t)})


def location_problem(location: str) -> str | None:
    """Why ``location`` cannot name a file inside a model's folder, as a verb phrase ("is an absolute path"), or None."""
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).anchor:
        return "is an absolute path"
    # Backslashes separate folders on Windows only: '..' is refused in either reading.
    if ".." in PurePosixPath(location).parts or ".." in PureWindowsPath(location).parts:
        return "leaves the model's folder through '..'"
    if not PurePosixPath(location).parts or "\0" in location:
        return "is not a file name"
    return None


def _check_external(path: Path, folder: Path, tensor, where: str, expected: int) -> None:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    refusal = f"ONNX model {path}: {where} has external data at {location!r}"
    fix = f"external data must be regular files inside {folder}, named by relative paths: save the model again with onnx.save"
    problem = location_problem(location)
    if problem is not None:
        raise OnnxModelError(f"{refusal}, which {problem}; {fix}")
    parts = PurePosixPath(location).parts
    current = folder
    for part in parts:
        current = current / part
        try:
            info = current.lstat()
        except FileNotFoundError:
            raise OnnxModelError(f"{refusal}, which does not exist ({current}); copy the data file next to the model") from None
        except OSError as err:
            raise OnnxModelError(f"{refusal}, which cannot be read ({err.strerror}); {fix}") from None
        if stat.S_ISLNK(info.st_mode):
            raise OnnxModelError(f"{refusal}: {current} is a symbolic link (to {os.readlink(current)!r}); {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise OnnxModelError(f"{refusal}, which is not a regular file; {fix}")
    if info.st_nlink > 1:
        raise OnnxModelError(
            f"{refusal}: {current} has {info.st_nlink} hard links, so it may share its content with a file outside "
            f"the model's folder; replace it with a copy (cp --no-preserve=links), or {fix}"
        )
    offset = _external_field(path, where, entries, "offset") or 0
    length = _external_field(path, where, entries, "length")
    if offset > info.st_size:
        raise OnnxModelError(f"{refusal} from offset {offset}, but the file has only {info.st_size} bytes; export it again")
    if length is None:
        length = info.st_size - offset
    elif offset + length > info.st_size:
        raise OnnxModelError(
            f"{refusal}: {length} bytes from offset {offset} run past the end of the {info.st_size}-byte file; "
            "the data file is truncated: export it again"
        )
    if length != expected:
        raise OnnxModelError(
            f"{refusal} of {length} bytes, but its shape {list(tensor.dims)} needs {expected}: the data file does "
            "not belong to this model or was edited; export it again"
        )


# --------------------------------------------------------------------------- operators


def _check_domains(path: Path, model, plugins: frozenset[str]) -> None:
    local_functions = {(function.domain, function.name) for function in model.functions}
    for node, where in all_nodes(model):
        domain = node.domain or ""
        if domain in STANDARD_DOMAINS or (domain, node.op_type) in local_functions:
            continue
        if domain in plugins or node.op_type in plugins:
            continue
        raise OnnxModelError(
            f"ONNX model {path}: node {node.name or '(unnamed)'!r} in {where} is {node.op_type} from domain "
            f"{domain!r}, which is not a standard ONNX domain and is not declared as a plugin; custom operators "
            f"need native plugin code: if your deployment provides it, add {domain!r} (or {node.op_type!r}) to "
            "the spec's 'plugins'"
        )


# --------------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what one archive (a .tar/.zip calibration set, or an .npz) may unpack to.

    ``setting`` is where the caps come from in the spec (``calibration.max_archive``), named in
    refusals so the user knows which value to raise; None for the built-in defaults.
    """

    max_members: int = 100_000
    max_bytes: int = 2 * 1024**3
    max_ratio: float = 200.0
    setting: str | None = None

    def byte_budget(self, archive: Path) -> int:
        """Most bytes ``archive`` may unpack to: the size cap, or the ratio cap times its packed size."""
        return min(self.max_bytes, int(self.max_ratio * max(archive.stat().st_size, 1)))

    def _named(self, cap: str) -> str:
        return f"{self.setting}_{cap}" if self.setting else f"trtforge's built-in {cap} cap"

    def _fix(self) -> str:
        if self.setting:
            return "raise the cap in the spec if the file is genuine"
        return "if the file is genuine, split it or use fewer samples"

    def too_large(self, what: str, archive: Path, unpacked: int) -> str:
        """The refusal of ``archive``, ``what`` it is, for unpacking to ``unpacked`` bytes."""
        packed = max(archive.stat().st_size, 1)
        if unpacked > self.max_bytes:
            reason = f"unpacks to more than {self.max_bytes} bytes ({self._named('bytes')})"
        else:
            reason = (
                f"unpacks to more than {self.max_ratio:g} times its packed size of {packed} bytes ({self._named('ratio')}), as zip bombs do"
            )
        return f"{what} {archive} was refused: it {reason}; {self._fix()}"

    def too_many_members(self, what: str, archive: Path) -> str:
        return (
            f"{what} {archive} was refused: it holds more than {self.max_members} members "
            f"({self._named('members')}); pack fewer files, or {self._fix()}"
        )


DEFAULT_LIMITS = ArchiveLimits()
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError)


def load_arrays(
    path: Path, *, what: str, limits: ArchiveLimits = DEFAULT_LIMITS, names: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """The arrays of the .npz ``path`` by name (only those in ``names`` when given), checked as the module says.

    ``what`` says what the file is (``"eval data"``), for messages. Arrays that ``names`` asks
    for but the file lacks are simply absent: what their absence means is the caller's to say.
    """
    import numpy as np

    path = Path(path)
    _check_regular(path, what, "an .npz")
    try:
        with zipfile.ZipFile(path) as bundle:
            infos = bundle.infolist()
            if len(infos) > limits.max_members:
                raise DataFileError(limits.too_many_members(what, path))
            declared = sum(info.file_size for info in infos)
            if declared > limits.byte_budget(path):
                raise DataFileError(limits.too_large(what, path, declared))
            for info in infos:
                with bundle.open(info) as member:
                    check_npy_header(member, info.file_size, f"array {info.filename!r} in {what} {path}")
        with np.load(path, allow_pickle=False) as archive:
            wanted = archive.files if names is None else [name for name in archive.files if name in names]
            return {name: archive[name] for name in wanted}
    except _ZIP_ERRORS as err:
        raise DataFileError(f"{what} {path} is not a readable .npz ({type(err).__name__}: {err}): write it with numpy.savez") from None


def load_array(path: Path, *, what: str, limits: ArchiveLimits = DEFAULT_LIMITS) -> np.ndarray:
    """The array of the .npy ``path``, checked as the module says (an .npy is not compressed: only the byte cap applies)."""
    import numpy as np

    path = Path(path)
    _check_regular(path, what, "an .npy")
    try:
        with open(path, "rb") as handle:
            declared = check_npy_header(handle, path.stat().st_size, f"{what} {path}")
            if declared > limits.max_bytes:
                raise DataFileError(limits.too_large(what, path, declared))
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataFileError(f"{what} {path} is not a readable .npy ({type(err).__name__}: {err}): write it with numpy.save") from None


def check_npy_header(stream, available: int, what: str) -> int:
    """The data size an .npy header in ``stream`` declares; refused if more than the ``available`` bytes.

    numpy allocates the declared size before it reads a byte, so a forged header is refused here.
    """
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is for structured arrays")
    except ValueError as err:
        raise DataFileError(f"{what} is not a plain numeric .npy array ({err}): write it with numpy.save or numpy.savez") from None
    needed = math.prod(shape) * dtype.itemsize
    if needed > available:
        raise DataFileError(
            f"{what} declares shape {tuple(shape)} of {dtype} ({needed} bytes) but holds only {available} bytes: "
            "the file is truncated or forged; write it again with numpy.save"
        )
    return needed


def _check_regular(path: Path, what: str, kind: str) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataFileError(f"{what} {path} does not exist: check the path in the spec") from None
    except OSError as err:
        raise DataFileError(f"{what} {path} cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataFileError(f"{what} {path} is not a regular file: pass the path of {kind} file")


# --------------------------------------------------------------------------- atomic writes

TEMP_MARK = ".tmp-"
_COPY_BLOCK = 8 * 1024 * 1024
_CREATE_ATTEMPTS = 5


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary name that the atomic writers below give their files and folders."""
    return name.startswith(".") and TEMP_MARK in name


def temporary_target(name: str) -> str:
    """The destination name a temporary name was made for (``.model.onnx.tmp-ab12`` -> ``model.onnx``)."""
    return name[1:].rpartition(TEMP_MARK)[0]


def fsync_directory(folder: Path) -> None:
    """Make a rename or creation inside ``folder`` durable: the folder's entry list is data too."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(final: Path) -> Path:
    return final.parent / f".{final.name}{TEMP_MARK}{uuid.uuid4().hex}"


def _create_temp_file(final: Path) -> tuple[Path, BinaryIO]:
    # O_EXCL with a random name rather than tempfile.mkstemp: mkstemp makes the file private
    # (0600), and the rename would then change who may read the destination; created here, the
    # file gets the same permissions (the umask's) that a plain open() would give it.
    pruned = 0
    while True:
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_path(final)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            return temp, os.fdopen(fd, "wb")
        except FileExistsError:
            continue
        except FileNotFoundError:
            # A cleaner (the registry's gc) removed the emptied folder between the mkdir and the open.
            pruned += 1
            if pruned == _CREATE_ATTEMPTS:
                raise


@contextlib.contextmanager
def atomic_writer(path: Path, *, exclusive: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` only if the block succeeds.

    ``exclusive=True`` creates ``path`` instead, with a hard link that fails with
    ``FileExistsError`` if the name exists (O_EXCL semantics for a whole, synced file).
    """
    path = Path(path)
    temp, handle = _create_temp_file(path)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temp, path)
        else:
            os.replace(temp, path)
    finally:
        # After a replace the name is gone already; after a link it is the second name of the new file.
        temp.unlink(missing_ok=True)
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_output(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """A fresh temporary path beside ``path``, for a tool that writes its output by name (onnx.save,
    torch.onnx.export); what the tool wrote replaces ``path`` only if the block succeeds.

    ``durable=False`` skips the fsyncs, for a cache whose every use checks the content anyway:
    the rename is still atomic, but a crash may lose what it renamed."""
    path = Path(path)
    temp, handle = _create_temp_file(path)
    # Created (empty) rather than only named, so that no other call can be handed the same name.
    handle.close()
    try:
        yield temp
        if durable:
            durable_replace(temp, path)
        else:
            os.replace(temp, path)
    finally:
        # rename() of a hard link onto another link of the same file leaves the source in place.
        temp.unlink(missing_ok=True)


def durable_replace(written: Path, path: Path) -> None:
    """Rename the finished file ``written`` over ``path`` (same folder), its data and the rename both on disk."""
    fd = os.open(written, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(written, path)
    fsync_directory(Path(path).parent)


def atomic_write_bytes(path: Path, data: bytes, *, exclusive: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (create it, with ``exclusive``); returns ``path``."""
    with atomic_writer(path, exclusive=exclusive) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2, default: Any = None) -> Path:
    """Replace ``path`` with ``obj`` as JSON atomically and durably; ``default`` is ``json.dumps``'s."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def atomic_copy(src: Path, dst: Path) -> Path:
    """Replace ``dst`` with a copy of ``src``'s content atomically and durably; returns ``dst``."""
    with open(src, "rb") as source, atomic_writer(dst) as handle:
        shutil.copyfileobj(source, handle, _COPY_BLOCK)
    return Path(dst)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_symlink() or not file.is_file():
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """A fresh empty folder next to ``final`` to fill; renamed to ``final`` only if the block succeeds.

    Everything in it is fsynced before the rename. If ``final`` exists by then, ``replace=True``
    swaps it out (readers see the old folder or the new one, or for an instant none) and
    ``replace=False`` raises ``FileExistsError``, keeping ``final``: the choice for a cache
    whose concurrent writers produce equivalent entries. Any failure removes the new folder.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temp = _temp_path(final)
        try:
            # Not tempfile.mkdtemp: its folder is private (0700); this one gets the umask's mode.
            temp.mkdir(0o777)
        except FileExistsError:
            continue
        break
    try:
        yield temp
        _fsync_tree(temp)
        if replace:
            _swap_directory(temp, final)
        else:
            _rename_directory(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    fsync_directory(final.parent)


def _rename_directory(temp: Path, final: Path) -> None:
    # rename(2) onto an existing folder succeeds only if that folder is empty, and onto a file fails.
    try:
        os.rename(temp, final)
    except OSError as err:
        if final.exists():
            raise FileExistsError(f"{final} already exists") from err
        raise


def _swap_directory(temp: Path, final: Path) -> None:
    old = _temp_path(final)
    try:
        os.rename(final, old)
    except FileNotFoundError:
        old = None
    try:
        os.rename(temp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
