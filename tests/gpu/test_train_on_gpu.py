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
    # the caller's path kept after the checkout's (packages installed with pip --target, say)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
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


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_attention_on_cuda_matches_each_sequence_alone(kv_heads):
    """torch's variable-length flash kernel, as training calls it, gives each packed sequence
    what causal attention over that sequence alone gives, values and gradients."""
    from prmtool.engines.hf.varlen import _torch_varlen, varlen_attention

    assert _torch_varlen() is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    torch.manual_seed(0)
    bounds = [0, 37, 160, 161, 400]
    shape = (1, 8, bounds[-1], 64)
    query = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key, value = (
        torch.randn((1, kv_heads, bounds[-1], 64), device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
    out, _ = varlen_attention(None, query, key, value, None, scaling=64**-0.5, cu_seq_lens_q=cu, max_length_q=239)
    expected = []
    for start, end in zip(bounds, bounds[1:]):
        k, v = (t[:, :, start:end].repeat_interleave(8 // kv_heads, dim=1) for t in (key, value))
        part = torch.nn.functional.scaled_dot_product_attention(query[:, :, start:end], k, v, is_causal=True)
        expected.append(part.transpose(1, 2))
    expected = torch.cat(expected, dim=1)
    assert out.shape == expected.shape
    assert torch.allclose(out.float(), expected.float(), atol=2e-2)
    grads = torch.autograd.grad(out.float().sum(), (query, key, value))
    reference = torch.autograd.grad(expected.float().sum(), (query, key, value))
    for got, want in zip(grads, reference):
        assert torch.allclose(got.float(), want.float(), atol=5e-2, rtol=5e-2)
