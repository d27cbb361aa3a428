"""Atomic writes: readers never see half a file, concurrent writers never collide, failures leave nothing behind.

Untrusted arrays: every reader goes through one loader with size caps and one error class.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.forking import run_then_exit
from trtforge.errors import DataFileError
from trtforge.evalset import load_eval_set
from trtforge.safeio import (
    atomic_copy,
    atomic_directory,
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    is_temporary,
    load_array,
    load_arrays,
    temporary_target,
)
from trtforge.stages.validate_calibration import eval_references

PAYLOAD_BYTES = 2 * 1024 * 1024
WRITES_PER_WRITER = 12
WRITERS = 4


def _payload(writer: int, round_: int) -> bytes:
    # Uniform bytes, different per write: any mix of two writes, or a short read, is detectable.
    return bytes([(writer * WRITES_PER_WRITER + round_) % 251 + 1]) * PAYLOAD_BYTES


def _write_rounds(path: Path, writer: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    for round_ in range(WRITES_PER_WRITER):
        atomic_write_bytes(path, _payload(writer, round_))


def _leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if is_temporary(name))


def test_concurrent_writer_processes_never_show_a_reader_a_partial_file(tmp_path):
    path = tmp_path / "engine.plan"
    atomic_write_bytes(path, _payload(0, 0))
    context = multiprocessing.get_context("fork")
    start = context.Barrier(WRITERS + 1)
    writers = [context.Process(target=run_then_exit, args=(_write_rounds, path, i, start)) for i in range(WRITERS)]
    for process in writers:
        process.start()
    start.wait()
    reads = 0
    torn = []
    while any(process.is_alive() for process in writers) or reads == 0:
        data = path.read_bytes()
        reads += 1
        if len(data) != PAYLOAD_BYTES or data.count(data[:1]) != PAYLOAD_BYTES:
            torn.append((len(data), sorted(set(data))[:4]))
    for process in writers:
        process.join()
    assert [process.exitcode for process in writers] == [0] * WRITERS
    assert torn == []
    final = path.read_bytes()
    assert final in {_payload(i, WRITES_PER_WRITER - 1) for i in range(WRITERS)}
    assert _leftovers(tmp_path) == []


def test_concurrent_writer_threads_of_one_path_all_succeed_and_leave_no_temp_file(tmp_path):
    path = tmp_path / "record.json"
    start = threading.Barrier(8)
    failures = []

    def write(writer: int) -> None:
        start.wait()
        try:
            for round_ in range(20):
                atomic_write_json(path, {"writer": writer, "round": round_, "pad": "x" * 10_000})
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert json.loads(path.read_text())["round"] == 19
    assert os.listdir(tmp_path) == ["record.json"]


def test_each_open_write_of_one_path_gets_its_own_temp_file_in_the_destination_folder(tmp_path):
    path = tmp_path / "out" / "model.onnx"
    with atomic_writer(path) as first, atomic_writer(path) as second:
        first.write(b"first")
        second.write(b"second")
        temps = _leftovers(path.parent)
        assert len(temps) == 2
        assert [temporary_target(name) for name in temps] == ["model.onnx", "model.onnx"]
        assert not path.exists()
    # The block that closes last wins, as with any two renames.
    assert path.read_bytes() == b"first"
    assert os.listdir(path.parent) == ["model.onnx"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old report\n")
    with pytest.raises(RuntimeError), atomic_writer(path) as handle:
        handle.write(b"half of the new rep")
        raise RuntimeError("the renderer failed")
    assert path.read_text() == "old report\n"
    assert os.listdir(tmp_path) == ["report.md"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "result.json"
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.onnx", path)
    assert os.listdir(tmp_path) == []


def test_a_rename_that_fails_removes_the_temp_file(tmp_path):
    path = tmp_path / "engine.plan"
    path.mkdir()
    (path / "inside").write_text("kept")
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(path, b"engine")
    assert (path / "inside").read_text() == "kept"
    assert os.listdir(tmp_path) == ["engine.plan"]


def _write_half_then_wait(path: Path, ready, never) -> None:
    with atomic_writer(path) as handle:
        handle.write(b"new" * 100_000)
        handle.flush()
        ready.set()
        never.wait()


def test_a_writer_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_json(path, {"version": 1})
    context = multiprocessing.get_context("fork")
    ready, never = context.Event(), context.Event()
    child = context.Process(target=run_then_exit, args=(_write_half_then_wait, path, ready, never))
    child.start()
    assert ready.wait(timeout=60)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert json.loads(path.read_text()) == {"version": 1}
    # The killed write's temp file is recognisable as such, so a cleaner can remove it.
    assert [temporary_target(name) for name in _leftovers(tmp_path)] == ["manifest.json"]


def test_written_files_get_the_permissions_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "atomic", b"x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode


def test_atomic_copy_copies_the_content(tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(100_000))
    atomic_write_bytes(tmp_path / "copy", b"old")
    atomic_copy(source, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    assert _leftovers(tmp_path) == []


def test_exclusive_create_refuses_an_existing_file_and_leaves_it_whole(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_bytes(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_a_tool_writing_by_name_replaces_the_file_only_when_it_succeeds(tmp_path):
    path = tmp_path / "model.onnx"
    atomic_write_bytes(path, b"old model")
    with pytest.raises(RuntimeError), atomic_output(path) as partial:
        partial.write_bytes(b"half a mod")
        raise RuntimeError("the exporter crashed")
    assert path.read_bytes() == b"old model"
    with atomic_output(path) as partial:
        assert partial.parent == tmp_path and is_temporary(partial.name)
        partial.write_bytes(b"new model")
    assert path.read_bytes() == b"new model"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_atomic_directory_appears_only_when_its_block_succeeds(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError), atomic_directory(final) as folder:
        (folder / "model.onnx").write_bytes(b"half")
        assert folder.parent == tmp_path and is_temporary(folder.name)
        raise RuntimeError("conversion failed")
    assert os.listdir(tmp_path) == []
    with atomic_directory(final) as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "model.onnx").write_bytes(b"whole")
        assert not final.exists()
    assert (final / "sub" / "model.onnx").read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["entry"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert final.stat().st_mode == plain.stat().st_mode


def test_atomic_directory_keeps_an_existing_folder_unless_told_to_replace_it(tmp_path):
    final = tmp_path / "data_docs"
    final.mkdir()
    (final / "index.html").write_text("old")
    with pytest.raises(FileExistsError), atomic_directory(final) as folder:
        (folder / "index.html").write_text("new")
    assert (final / "index.html").read_text() == "old"
    with atomic_directory(final, replace=True) as folder:
        (folder / "index.html").write_text("new")
    assert (final / "index.html").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["data_docs"]


def _create_entry(final: Path, writer: int, start, outcomes) -> None:
    start.wait()
    try:
        with atomic_directory(final) as folder:
            for index in range(20):
                (folder / f"part-{index}").write_bytes(bytes([writer + 1]) * 10_000)
        outcomes.put((writer, "created"))
    except FileExistsError:
        outcomes.put((writer, "exists"))


def test_concurrent_creators_of_one_folder_produce_one_whole_folder(tmp_path):
    final = tmp_path / "cache" / "entry"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(WRITERS)
    outcomes = context.Queue()
    creators = [context.Process(target=run_then_exit, args=(_create_entry, final, i, start, outcomes)) for i in range(WRITERS)]
    for process in creators:
        process.start()
    results = dict(outcomes.get(timeout=60) for _ in creators)
    for process in creators:
        process.join()
    assert [process.exitcode for process in creators] == [0] * WRITERS
    winners = [writer for writer, outcome in results.items() if outcome == "created"]
    assert len(winners) == 1
    contents = {(final / f"part-{index}").read_bytes() for index in range(20)}
    assert contents == {bytes([winners[0] + 1]) * 10_000}
    assert os.listdir(final.parent) == ["entry"]


# ---------------------------------------------------------------- untrusted arrays


def _with_eval_data(spec, path: Path):
    return spec.model_copy(update={"eval": spec.eval.model_copy(update={"data": path})})


def test_eval_set_reader_refuses_a_compressed_npz_bomb_before_numpy_inflates_it(digits_spec, tmp_path):
    bomb = tmp_path / "eval.npz"
    # Zeros deflate about a thousandfold: far past the 200-times ratio cap.
    np.savez_compressed(bomb, input=np.zeros((4 * 1024**2,), np.float32), labels=np.zeros(4, np.int64))
    with pytest.raises(DataFileError, match=rf"eval data {bomb} was refused: it unpacks to more than 200 times its packed size"):
        load_eval_set(_with_eval_data(digits_spec, bomb))


def test_eval_set_reader_refuses_a_header_declaring_more_than_the_file_holds(digits_spec, tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 1, 8, 8)})
    forged = tmp_path / "eval.npz"
    with zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as bundle:
        bundle.writestr("input.npy", header.getvalue() + bytes(64))
    spec = _with_eval_data(digits_spec, forged)
    expected = rf"array 'input.npy' in eval data {forged} declares shape \(100000000000, 1, 8, 8\) of float32 .* but holds only"
    with pytest.raises(DataFileError, match=expected):
        load_eval_set(spec)
    # The calibration check reads the same file through the same loader, with the same refusal.
    with pytest.raises(DataFileError, match=expected):
        eval_references(spec, digits_spec.calibration)


def test_eval_set_reader_refuses_an_npz_over_the_spec_calibration_byte_cap(digits_spec, tmp_path):
    data = tmp_path / "eval.npz"
    np.savez(data, input=np.ones((64, 1, 8, 8), np.float32), labels=np.zeros(64, np.int64))
    calibration = digits_spec.calibration.model_copy(update={"max_archive_bytes": 4096})
    spec = _with_eval_data(digits_spec, data).model_copy(update={"calibration": calibration})
    with pytest.raises(DataFileError, match=r"unpacks to more than 4096 bytes \(calibration.max_archive_bytes\)"):
        load_eval_set(spec)


def test_array_files_with_pickled_objects_or_no_zip_are_refused(tmp_path):
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataFileError, match=rf"reference outputs {pickled} is not a readable \.npy .*numpy\.save"):
        load_array(pickled, what="reference outputs")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataFileError, match=rf"reference outputs {broken} is not a readable \.npz"):
        load_arrays(broken, what="reference outputs")
    with pytest.raises(DataFileError, match=rf"reference outputs {tmp_path} is not a regular file"):
        load_arrays(tmp_path, what="reference outputs")


def test_load_arrays_reads_only_the_names_asked_for(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, input=np.arange(6, dtype=np.float32), labels=np.arange(6))
    assert sorted(load_arrays(path, what="eval data")) == ["input", "labels"]
    assert list(load_arrays(path, what="eval data", names={"labels", "missing"})) == ["labels"]
