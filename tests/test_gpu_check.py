"""scripts/gpu-check.sh: without a GPU it says SKIP and exits 0; its parts run where no GPU is (--force-cpu).

The CUDA path itself runs only on a GPU machine (docs/performance.md, "GPU")."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from .conftest import ROOT, load_script

SCRIPT = ROOT / "scripts" / "gpu-check.sh"
no_gpu_here = pytest.mark.skipif(
    torch.cuda.is_available() or shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA GPU"
)


@pytest.fixture
def gpu_check(monkeypatch):
    """scripts/gpu_check.py as a module (it imports scripts/step_time.py from its own directory)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return load_script("scripts/gpu_check.py")


@no_gpu_here
def test_without_a_gpu_the_script_says_skip_and_exits_0(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("GPU_CHECK_FORCE_CPU", None)
    result = subprocess.run([str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("SKIP: no NVIDIA GPU on this machine"), result.stdout
    assert (tmp_path / "gpu-check.log").read_text() == result.stdout  # the device runner collects $OUT


@no_gpu_here
def test_where_torch_sees_no_cuda_the_check_skips_with_torchs_reason(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("SKIP: no CUDA here: CPU: no CUDA device visible")


@no_gpu_here
def test_a_gpu_that_torch_cannot_use_is_a_fail(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_hardware", lambda: "/usr/bin/nvidia-smi")
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL device: an NVIDIA GPU is present (/usr/bin/nvidia-smi) but torch trains on the CPU: " in out
    assert out.splitlines()[-1].startswith("SUMMARY: FAIL (1 of 1: device)")
    assert json.loads((tmp_path / "gpu-check.json").read_text())["checks"][0]["ok"] is False


def test_the_step_part_times_every_model_and_checks_the_factors_on_the_cpu(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "steps", "--force-cpu"]) == 0
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [c["model"] for c in result["steps"]] == ["cnn", "resnet18", "vit", "text-transformer"]
    assert all(c["finite"] and c["ratio"] > 0 for c in result["steps"])
    out = capsys.readouterr().out
    assert out.count("PASS factors ") == 4 and "equal the CPU's bitwise" in out
    assert out.splitlines()[-1].startswith("SUMMARY: PASS; 9 checks")


@pytest.mark.integration
def test_the_two_node_deployment_reaches_the_digest_every_round_on_the_cpu(tmp_path):
    """The deployment part's plumbing: a SuperLink and two SuperNodes, 3 rounds (both nodes on the
    CPU here; on a GPU machine node 0 trains on CUDA)."""
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_FORCE_CPU": "1", "GPU_CHECK_PARTS": "deployment"}
    result = subprocess.run([str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert "PASS deployment digest: 3 of 3 rounds" in out
    assert "PASS deployment node 0: trained on CPU" in out and "PASS deployment node 1: trained on CPU" in out
    assert "SUMMARY: PASS; 4 checks" in out
    rows = json.loads((tmp_path / "gpu-check.json").read_text())["deployment_rows"]
    assert [(r["round"], r["accepted"], r["resync"]) for r in rows[1:]] == [(1, 2, 0), (2, 2, 0), (3, 2, 0)]
    assert (tmp_path / "gpu-check-logs.tar.gz").stat().st_size > 0
