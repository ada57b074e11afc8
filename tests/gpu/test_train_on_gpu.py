"""`prmtool train` on a GPU: bf16 autocast, packed rows, the saved folder scored; and the same
on two GPUs under torchrun. Skipped without CUDA; on the GPU machine:

    python -m pytest -v -m gpu tests/gpu/test_train_on_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SAMPLES

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LABELED = SAMPLES / "labeled"


def prmtool(*args, launcher=(sys.executable,)):
    """The command in its own process (a CUDA context per run; torchrun starts several)."""
    command = [*launcher, *(["prmtool"] if "--module" in launcher else ["-m", "prmtool"]), *map(str, args)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)


def test_train_on_cuda_in_bf16_and_score_the_folder(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "prm"
    result = prmtool("train", LABELED, "-o", model_dir, "--base", tiny_model_dir, "--max-steps", "6",
                     "--learning-rate", "1e-3", "--batch-tokens", "1024", "--max-length", "512")  # fmt: skip
    assert result.returncode == 0, result.stderr
    training = json.loads((model_dir / "_SUCCESS").read_text())["training"]
    assert training["last_loss"] < training["first_loss"]
    scored = prmtool("score", LABELED, "-o", tmp_path / "s", "--scorer", "token-classification", "--prm", model_dir)
    assert scored.returncode == 0, scored.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_train_under_torchrun_on_two_gpus(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "prm"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--module")
    result = prmtool("train", LABELED, "-o", model_dir, "--base", tiny_model_dir, "--max-steps", "4",
                     "--batch-tokens", "1024", "--max-length", "512", launcher=launcher)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((model_dir / "_SUCCESS").read_text())["training"]["steps"] == 4
