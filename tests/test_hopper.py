"""The fused Hopper kernels (prmtool/engines/hf/hopper.py): which models they apply to (CPU), and
that they compute what the unfused path computes (on an H100/H200 only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prmtool.engines.base import ScoringRequest
from prmtool.engines.hf import HFEngine, has_final_logit_transforms, hopper
from tests.engine_fixtures import build_tiny_model

on_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or not hopper.available(torch.device("cuda")), reason="needs an H100/H200 and Triton"
)


def test_swiglu_fusion_applies_to_bias_free_silu_mlps_in_half_precision():
    model = build_tiny_model(vocab_size=400, eos_token_id=2)
    mlp = model.model.layers[0].mlp
    assert not hopper.swiglu_fusable(mlp)  # float32 weights: the plain path
    model.to(torch.bfloat16)
    assert hopper.swiglu_fusable(mlp)
    mlp.act_fn = torch.nn.GELU()
    assert not hopper.swiglu_fusable(mlp)


def test_head_fusion_needs_a_bias_free_half_precision_head_and_no_logit_transforms():
    model = build_tiny_model(vocab_size=400, eos_token_id=2)
    assert not hopper.head_fusable(model.lm_head)
    model.to(torch.bfloat16)
    assert hopper.head_fusable(model.lm_head)
    assert not has_final_logit_transforms(model.config)
    assert has_final_logit_transforms(SimpleNamespace(final_logit_softcapping=30.0))  # Gemma 2


def test_kernels_are_off_on_cpu():
    assert not hopper.available(torch.device("cpu"))


@on_hopper
def test_swiglu_equals_silu_gate_times_up():
    torch.manual_seed(0)
    x = torch.randn(300, 1536, device="cuda", dtype=torch.bfloat16)  # rows not a multiple of the tile
    gate = torch.randn(896, 1536, device="cuda", dtype=torch.bfloat16) / 40
    up = torch.randn(896, 1536, device="cuda", dtype=torch.bfloat16) / 40
    expected = torch.nn.functional.silu(x.float() @ gate.float().T) * (x.float() @ up.float().T)
    got = hopper.swiglu(x, gate, up).float()
    assert (got - expected).norm() / expected.norm() < 1e-2


@on_hopper
def test_head_log_probs_equal_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(5003, 256, device="cuda", dtype=torch.bfloat16) / 4  # vocabulary not a multiple of the tile
    targets = torch.randint(0, 5003, (700,), device="cuda")
    targets[:3] = torch.tensor([0, 5002, 4999])  # first and last columns
    expected = (hidden.double() @ weight.double().T).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    got = hopper.head_target_log_probs(hidden, weight, targets)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-3)


@on_hopper
def test_engine_scores_with_fused_kernels_as_without(tiny_engine):
    model = build_tiny_model(vocab_size=len(tiny_engine.tokenizer), eos_token_id=2).to("cuda", torch.bfloat16)
    fused = HFEngine(model, tiny_engine.tokenizer, compile=True)
    plain = HFEngine(model, tiny_engine.tokenizer, compile=False)
    plain._fused_head = False
    assert fused._fused_head
    prompt = fused.chat_prompt_ids("What is 2 + 3?")
    requests = [
        ScoringRequest(prompt, fused.tokenizer.encode("Step 1: 5. " * repeats, add_special_tokens=False))
        for repeats in (1, 4, 9)
    ]
    for got, expected in zip(fused.score(requests), plain.score(requests)):
        assert got == pytest.approx(expected, abs=0.05)  # bf16 arithmetic in another order
    assert fused._compiled_layers.fused_mlps
    assert all("forward" not in vars(layer.mlp) for layer in model.model.layers)  # swapped out after scoring


def test_without_the_copy_engine_the_kernels_compute_the_same_in_torch():
    # On CPU (or for a misaligned CUDA tensor) both functions fall back to plain torch.
    torch.manual_seed(0)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    gate, up = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    expected = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    assert torch.equal(hopper.swiglu(x, gate, up), expected)
    weight = torch.randn(50, 32, dtype=torch.bfloat16)
    targets = torch.tensor([0, 49, 7, 7, 21])
    expected = (x.double() @ weight.double().T).log_softmax(-1)[torch.arange(5), targets]
    assert torch.allclose(hopper.head_target_log_probs(x, weight, targets).double(), expected, atol=1e-5)
