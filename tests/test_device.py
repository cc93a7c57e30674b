"""The client says which device it trains on, and why not CUDA when it falls back to the CPU."""

import logging
import warnings

import pytest
import torch

from fedmud.training import describe_device, pick_device

# torch 2.x's warning when the driver is older than the CUDA it was built for (c10/cuda/CUDAFunctions.cpp)
DRIVER_TOO_OLD = (
    "CUDA initialization: The NVIDIA driver on your system is too old (found version 12020). Please update "
    "your GPU driver by downloading and installing a new version from the URL: "
    "http://www.nvidia.com/Download/index.aspx Alternatively, go to: https://pytorch.org to install a PyTorch "
    "version that has been compiled with your version of the CUDA driver. (Triggered internally at "
    "/pytorch/c10/cuda/CUDAFunctions.cpp:119.)"
)


def _unavailable_with(message: str | None):
    def is_available() -> bool:
        if message is not None:
            warnings.warn(message, UserWarning)
        return False

    return is_available


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cpu_machine_says_cpu_and_why():
    device, line = describe_device()
    assert device.type == "cpu" and pick_device() == device
    assert line.startswith("CPU: ")
    assert "no CUDA device visible" in line or "built without CUDA" in line or "CUDA did not start" in line, line
    assert torch.__version__ in line


def test_a_driver_too_old_is_named_with_what_torch_needs(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", _unavailable_with(DRIVER_TOO_OLD))
    device, line = describe_device()
    assert device.type == "cpu"
    assert "driver is too old" in line and "found version 12020" in line
    assert "CUDA 13.0 needs NVIDIA driver >= 580" in line
    assert "Triggered internally" not in line and "Please update" not in line  # one line, not torch's advice


def test_another_cuda_failure_is_passed_on(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", _unavailable_with("CUDA initialization: CUDA driver initialization failed, you might not have a CUDA gpu. (Triggered internally at x.cpp:1.)"))
    _, line = describe_device()
    assert line.startswith("CPU: CUDA did not start: CUDA driver initialization failed")


def test_no_device_visible_names_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", _unavailable_with(None))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _, line = describe_device()
    assert "no CUDA device visible" in line and "CUDA_VISIBLE_DEVICES=''" in line


def test_a_torch_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", _unavailable_with(None))
    device, line = describe_device()
    assert device.type == "cpu" and "is built without CUDA" in line


def test_a_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    device, line = describe_device()
    assert device.type == "cuda"
    assert line.startswith("CUDA device 0: NVIDIA H100 80GB HBM3 (torch ")


def test_the_client_logs_its_device_once_per_process(monkeypatch):
    from client import app

    lines = []
    monkeypatch.setattr(app, "log", lambda level, fmt, *args: lines.append((level, fmt % args)))
    app._training_device.cache_clear()
    try:
        first, second = app._training_device(), app._training_device()
    finally:
        app._training_device.cache_clear()
    assert first == second
    assert len(lines) == 1 and lines[0][0] == logging.INFO and lines[0][1].startswith("training device: ")
