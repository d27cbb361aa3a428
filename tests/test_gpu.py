"""Local GPU detection through NVML: the no-GPU answers here, and the real GPUs where there are some."""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
import sys

import pynvml
import pytest

from trtforge.gpu import arch_from_capability, capability_from_arch, detect_gpus
from trtforge.spec import GPU_ARCHS


def _nvml_library_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_every_target_arch_maps_to_its_compute_capability_and_back():
    for arch in GPU_ARCHS:
        major, minor = capability_from_arch(arch)
        assert arch == f"sm_{major}{minor}"
        assert arch_from_capability(major, minor) == arch
    assert capability_from_arch("sm_100") == (10, 0)
    assert capability_from_arch("sm_121") == (12, 1)
    for bad in ("sm90", "sm_", "sm_9", "compute_90"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            capability_from_arch(bad)


@pytest.mark.skipif(_nvml_library_loads(), reason="this machine has the NVIDIA driver's NVML library")
def test_machine_without_nvidia_driver_reports_no_gpu_and_why():
    found = detect_gpus()
    assert not found.available
    assert found.gpus == ()
    assert found.reason.startswith("no NVIDIA GPU")
    assert "libnvidia-ml.so.1" in found.reason
    assert json.loads(json.dumps(found.to_dict()))["reason"] == found.reason


def test_driver_not_loaded_is_reported_as_such(monkeypatch):
    # A driver package without its kernel module cannot be arranged on a test machine; NVML's own error stands in.
    def init_without_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", init_without_driver)
    found = detect_gpus()
    assert not found.available
    assert "kernel driver is not loaded" in found.reason


def test_missing_nvidia_ml_py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    found = detect_gpus()
    assert not found.available
    assert "pip install nvidia-ml-py" in found.reason


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="nvidia-smi is not installed: no NVIDIA GPU here")
def test_detected_gpus_match_nvidia_smi():
    query = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,compute_cap,driver_version,pci.bus_id", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [[field.strip() for field in line.split(",")] for line in query.strip().splitlines()]
    header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=True).stdout
    cuda_version = re.search(r"CUDA Version:\s*([\d.]+)", header).group(1)

    found = detect_gpus()
    assert found.available, found.reason
    assert len(found.gpus) == len(rows)
    for gpu, (index, name, capability, driver, bus_id) in zip(found.gpus, rows, strict=True):
        assert gpu.index == int(index)
        assert gpu.name == name
        assert gpu.compute_capability == "sm_" + capability.replace(".", "")
        assert gpu.pci_bus_id.lower().endswith(bus_id.lower().split(":", 1)[1])
        assert gpu.memory_mb > 0
        assert found.driver_version == driver
    assert found.cuda_driver_version == cuda_version
    assert found.with_arch(found.gpus[0].compute_capability) == found.gpus[0]
    assert json.loads(json.dumps(found.to_dict()))["gpus"][0]["name"] == found.gpus[0].name
