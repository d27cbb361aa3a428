"""Hostile calibration archives: each attack in its own folder, refused before anything leaves it.

The archive sits in ``tmp_path/inside``; archives are unpacked under ``tmp_path/scratch`` (the
temporary folder is redirected there), so a member that escaped its extraction folder would
land under ``tmp_path``. ``tests.containment.Outside`` proves that no file under ``tmp_path``
was added or changed, that the secret in ``tmp_path/outside`` was not read, and so also that
the temporary extraction folder was removed.
"""

from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from tests.containment import Outside
from trtforge.calibration import extract_archive, load_calibration
from trtforge.errors import CalibrationError, DataFileError
from trtforge.safeio import DEFAULT_LIMITS
from trtforge.spec import ModelSpec, Preprocessing
from trtforge.stages.validate_calibration import validate_calibration

SHIPPED_SET = REPO / "calibration_data" / "digits" / "calibration.npz"


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def inside(tmp_path) -> Path:
    folder = tmp_path / "inside"
    folder.mkdir()
    return folder


def with_calibration(spec: ModelSpec, **changes) -> ModelSpec:
    return spec.model_copy(update={"calibration": spec.calibration.model_copy(update=changes)})


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def write_tar(path: Path, members, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def write_zip(path: Path, members, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as bundle:
        for name_or_info, data in members:
            bundle.writestr(name_or_info, data)
    return path


def refused(spec: ModelSpec, archive: Path, reason: str) -> None:
    with pytest.raises(CalibrationError) as raised:
        load_calibration(spec, archive)
    message = str(raised.value)
    assert message.startswith(f"calibration: calibration archive {archive}"), message
    assert reason in message, message


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---------------------------------------------------------------- tar


def test_tar_member_climbing_out_with_dotdot_is_refused(digits_spec, tmp_path, scratch, inside):
    archive = write_tar(inside / "calib.tar", [regular("../../outside/pwned.txt", b"pwned")])
    outside = Outside(tmp_path)
    refused(digits_spec, archive, "member '../../outside/pwned.txt' climbs out of the archive's folder with '..'")
    outside.assert_untouched()


def test_tar_member_with_an_absolute_path_is_refused(digits_spec, tmp_path, scratch, inside):
    target = tmp_path / "outside" / "pwned.txt"
    archive = write_tar(inside / "calib.tar", [regular(str(target), b"pwned")])
    outside = Outside(tmp_path)
    refused(digits_spec, archive, f"member '{target}' has an absolute path")
    outside.assert_untouched()


def test_tar_symlink_out_and_a_file_written_through_it_are_refused(digits_spec, tmp_path, scratch, inside):
    outside_folder = tmp_path / "outside"
    archive = write_tar(
        inside / "calib.tar",
        [special("escape", tarfile.SYMTYPE, str(outside_folder)), regular("escape/secret.bin", b"overwritten")],
    )
    outside = Outside(tmp_path)
    refused(digits_spec, archive, f"member 'escape' is a symbolic link (to '{outside_folder}')")
    outside.assert_untouched()


def test_tar_symlink_chain_that_looks_inside_is_refused(digits_spec, tmp_path, scratch, inside):
    # 'a/b' -> '..' stays inside, 'c' -> 'a/b/..' looks inside when read as text but is the
    # parent of the extraction folder once 'a/b' is followed: the shape of CVE-2025-4517.
    archive = write_tar(
        inside / "calib.tar",
        [
            special("a", tarfile.DIRTYPE),
            special("a/b", tarfile.SYMTYPE, ".."),
            special("c", tarfile.SYMTYPE, "a/b/.."),
            regular("c/outside/pwned.txt", b"pwned"),
        ],
    )
    outside = Outside(tmp_path)
    refused(digits_spec, archive, "member 'a/b' is a symbolic link (to '..')")
    outside.assert_untouched()


@pytest.mark.parametrize("target", ["absolute", "../../outside/secret.bin"])
def test_tar_hard_link_to_a_file_outside_is_refused(digits_spec, tmp_path, scratch, inside, target):
    linkname = str(tmp_path / "outside" / "secret.bin") if target == "absolute" else target
    archive = write_tar(inside / "calib.tar", [special("calib.npy", tarfile.LNKTYPE, linkname)])
    outside = Outside(tmp_path)
    refused(digits_spec, archive, f"member 'calib.npy' is a hard link to '{linkname}', which is not an earlier file")
    outside.assert_untouched()


@pytest.mark.parametrize(("kind", "described"), [(tarfile.CHRTYPE, "a character device"), (tarfile.FIFOTYPE, "a FIFO")])
def test_tar_device_files_and_fifos_are_refused(digits_spec, tmp_path, scratch, inside, kind, described):
    info, _ = special("calib.npy", kind)
    info.devmajor, info.devminor = 1, 3
    archive = write_tar(inside / "calib.tar", [(info, None)])
    outside = Outside(tmp_path)
    refused(digits_spec, archive, f"member 'calib.npy' is {described}")
    outside.assert_untouched()


def test_tar_with_more_members_than_the_cap_is_refused(digits_spec, tmp_path, scratch, inside):
    archive = write_tar(inside / "calib.tar", [regular(f"img{i}.png", b"x") for i in range(12)])
    outside = Outside(tmp_path)
    refused(with_calibration(digits_spec, max_archive_members=10), archive, "holds more than 10 members (calibration.max_archive_members)")
    outside.assert_untouched()


def test_tar_unpacking_to_more_bytes_than_the_cap_is_refused(digits_spec, tmp_path, scratch, inside):
    noise = np.random.default_rng(0).bytes(6000)
    archive = write_tar(inside / "calib.tar", [regular("calib.npy", noise)])
    outside = Outside(tmp_path)
    refused(
        with_calibration(digits_spec, max_archive_bytes=4096), archive, "unpacks to more than 4096 bytes (calibration.max_archive_bytes)"
    )
    outside.assert_untouched()


def test_gzip_bomb_is_refused_from_its_headers_before_anything_is_written(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    with gzip.open(archive, "wb", compresslevel=9) as packed, tarfile.open(fileobj=packed, mode="w") as tar:
        info = tarfile.TarInfo("calib.npy")
        info.size = 256 * 1024**2
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    destination = tmp_path / "unpacked"
    destination.mkdir()
    with pytest.raises(CalibrationError, match=r"bomb.tar.gz was refused: it unpacks to more than 200 times its packed size"):
        extract_archive(archive, destination, DEFAULT_LIMITS)
    assert list(destination.iterdir()) == []


# ---------------------------------------------------------------- zip


@pytest.mark.parametrize("name", ["../../outside/pwned.txt", "..\\..\\outside\\pwned.txt"])
def test_zip_member_climbing_out_is_refused(digits_spec, tmp_path, scratch, inside, name):
    archive = write_zip(inside / "calib.zip", [(name, b"pwned")])
    outside = Outside(tmp_path)
    refused(digits_spec, archive, "climbs out of the archive's folder with '..'")
    outside.assert_untouched()


def test_zip_member_with_an_absolute_path_is_refused(digits_spec, tmp_path, scratch, inside):
    target = str(tmp_path / "outside" / "pwned.txt")
    archive = write_zip(inside / "calib.zip", [(zipfile.ZipInfo(target), b"pwned")])
    outside = Outside(tmp_path)
    refused(digits_spec, archive, f"member '{target}' has an absolute path")
    outside.assert_untouched()


def test_zip_symlink_entry_is_refused(digits_spec, tmp_path, scratch, inside):
    link = zipfile.ZipInfo("escape")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = write_zip(inside / "calib.zip", [(link, str(tmp_path / "outside")), ("escape/secret.bin", b"overwritten")])
    outside = Outside(tmp_path)
    refused(digits_spec, archive, "member 'escape' is a symbolic link")
    outside.assert_untouched()


def test_zip_device_entry_is_refused(digits_spec, tmp_path, scratch, inside):
    device = zipfile.ZipInfo("calib.npy")
    device.external_attr = (stat.S_IFCHR | 0o666) << 16
    archive = write_zip(inside / "calib.zip", [(device, b"")])
    outside = Outside(tmp_path)
    refused(digits_spec, archive, "member 'calib.npy' is a device file or FIFO")
    outside.assert_untouched()


def test_zip_bomb_is_refused_from_its_declared_sizes_before_anything_is_written(tmp_path):
    archive = write_zip(tmp_path / "bomb.zip", [("calib.npy", bytes(64 * 1024**2))])
    destination = tmp_path / "unpacked"
    destination.mkdir()
    with pytest.raises(CalibrationError, match=r"bomb.zip was refused: it unpacks to more than 200 times its packed size"):
        extract_archive(archive, destination, DEFAULT_LIMITS)
    assert list(destination.iterdir()) == []


def test_zip_of_many_entries_over_the_cap_is_refused(digits_spec, tmp_path, scratch, inside):
    archive = write_zip(inside / "calib.zip", [(f"{i}.png", b"x") for i in range(50)])
    outside = Outside(tmp_path)
    refused(with_calibration(digits_spec, max_archive_members=49), archive, "holds more than 49 members")
    outside.assert_untouched()


def test_zip_member_that_unpacks_to_more_than_it_declares_is_refused(digits_spec, tmp_path, scratch, inside):
    payload = b"A" * 100_000
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("calib.npy", payload)
    # Declare 10 bytes where 100,000 are packed, in the local header and the central directory:
    # every size check on the headers passes; only counting while unpacking can tell.
    forged = packed.getvalue().replace(struct.pack("<I", len(payload)), struct.pack("<I", 10))
    archive = inside / "calib.zip"
    archive.write_bytes(forged)
    with zipfile.ZipFile(archive) as bundle:
        assert bundle.getinfo("calib.npy").file_size == 10
    outside = Outside(tmp_path)
    with pytest.raises(CalibrationError, match=rf"calibration archive {archive} is not a readable zip archive \(BadZipFile: Bad CRC-32"):
        load_calibration(digits_spec, archive)
    outside.assert_untouched()


# ---------------------------------------------------------------- .npz, a zip itself


def test_compressed_npz_bomb_is_refused_before_numpy_inflates_it(digits_spec, tmp_path, inside):
    bomb = inside / "calib.npz"
    np.savez_compressed(bomb, input=np.zeros((16 * 1024**2,), np.float32))
    outside = Outside(tmp_path)
    with pytest.raises(DataFileError, match=rf"calibration data {bomb} was refused: it unpacks to more than 200 times"):
        load_calibration(digits_spec, bomb)
    outside.assert_untouched()


def test_npz_whose_header_claims_more_than_it_holds_is_refused(digits_spec, tmp_path, inside):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**11,)})
    forged = inside / "calib.npz"
    write_zip(forged, [("input.npy", header.getvalue() + bytes(64))], compression=zipfile.ZIP_STORED)
    with pytest.raises(
        DataFileError,
        match=r"array 'input.npy' in calibration data .* declares shape \(100000000000,\) of float32 \(400000000000 bytes\) but holds only",
    ):
        load_calibration(digits_spec, forged)


# ---------------------------------------------------------------- what is accepted


def test_tar_gz_of_an_npz_loads_the_same_set_as_the_npz(digits_spec, tmp_path, scratch, inside):
    archive = inside / "calib.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(SHIPPED_SET, arcname="digits/calibration.npz")
    outside = Outside(tmp_path)
    loaded = load_calibration(digits_spec, archive)
    direct = load_calibration(digits_spec, SHIPPED_SET)
    assert loaded.sha256 == direct.sha256 and loaded.samples == 600
    assert loaded.source == archive and not loaded.from_images
    outside.assert_untouched()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shipped() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SHIPPED_SET) as archive:
        return archive["input"], archive["labels"]


def image_spec(spec: ModelSpec, archive: Path) -> ModelSpec:
    gray = Preprocessing(color="gray", scale=1 / 255, layout="NCHW")
    return with_calibration(spec, data=archive, labels="classes", preprocessing=gray, expected_range=None)


def test_zip_of_an_image_folder_packed_by_name_loads_with_class_labels(digits_spec, tmp_path, scratch, inside, shipped):
    images, labels = shipped
    archive = write_zip(
        inside / "calib.zip",
        [(f"calib/{label}/{index:04d}.png", png_bytes(image)) for index, (image, label) in enumerate(zip(images[:40], labels[:40]))],
    )
    outside = Outside(tmp_path)
    loaded = load_calibration(image_spec(digits_spec, archive), archive)
    assert loaded.from_images and loaded.source == archive
    np.testing.assert_array_equal(loaded.labels, np.sort(labels[:40], kind="stable"))
    assert loaded.sample_names[0].count("/") == 1 and not loaded.sample_names[0].startswith("calib/")
    outside.assert_untouched()


def test_tar_hard_link_to_an_earlier_member_is_allowed(digits_spec, tmp_path, scratch, inside, shipped):
    images, _ = shipped
    archive = write_tar(
        inside / "calib.tar",
        [regular("3/a.png", png_bytes(images[0])), special("3/b.png", tarfile.LNKTYPE, "3/a.png")],
    )
    outside = Outside(tmp_path)
    loaded = load_calibration(image_spec(digits_spec, archive), archive)
    assert loaded.sample_names == ["3/a.png", "3/b.png"]
    np.testing.assert_array_equal(loaded.arrays["input"][0], loaded.arrays["input"][1])
    outside.assert_untouched()


def test_unreadable_images_in_an_archive_are_reported_by_validation(digits_spec, tmp_path, scratch, inside, shipped):
    images, labels = shipped
    members = [(f"{label}/{index:04d}.png", png_bytes(image)) for index, (image, label) in enumerate(zip(images, labels))]
    broken = members[7][0]
    members[7] = (broken, b"not a png at all")
    archive = write_zip(inside / "calib.zip", members)

    report = validate_calibration(image_spec(digits_spec, archive))

    assert not report.passed and report.samples == 599
    corrupt = [f for f in report.failed if f.column == "readable"]
    assert len(corrupt) == 1 and corrupt[0].samples == [broken]
    assert list(scratch.iterdir()) == []


def test_archive_without_a_calibration_set_names_what_it_needs(digits_spec, tmp_path, scratch, inside):
    archive = write_zip(inside / "calib.zip", [("notes.txt", b"nothing here")])
    refused(digits_spec, archive, "holds no .npz, .npy, .png, .jpg or .jpeg file")
    assert list(scratch.iterdir()) == []


def test_error_inside_an_archive_names_the_file_in_the_archive_not_the_temporary_folder(digits_spec, tmp_path, scratch, inside):
    archive = write_zip(inside / "calib.zip", [("set/calib.npy", npy_bytes(np.array(["a", "b"])))])
    with pytest.raises(CalibrationError) as raised:
        load_calibration(digits_spec, archive)
    assert f"{archive}:set/calib.npy" in str(raised.value)
    assert str(scratch) not in str(raised.value)
