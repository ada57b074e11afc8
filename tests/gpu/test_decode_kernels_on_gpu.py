"""The hf engine's paged decode kernels (Triton) against the reference attention over gathered
blocks, the engine's samples with and without shared-prefix (cascade) attention, and the
sampling kernel against torch's inverse CDF. Skipped
without CUDA; on the GPU machine:

    python -m pytest -v -m gpu tests/gpu/test_decode_kernels_on_gpu.py

The float32 tests also run on a CPU under Triton's interpreter (pip install triton):

    TRITON_INTERPRET=1 PRMTOOL_KERNEL_TEST_DEVICE=cpu \
        python -m pytest -v -m gpu tests/gpu/test_decode_kernels_on_gpu.py
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

DEVICE = os.environ.get("PRMTOOL_KERNEL_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def random_cache(kv_heads, head_dim, blocks=48, dtype=torch.float32):
    from prmtool.engines.hf.kv_cache import BLOCK_SIZE

    shape = (blocks, BLOCK_SIZE, kv_heads, head_dim)
    return torch.randn(shape, device=DEVICE, dtype=dtype), torch.randn(shape, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("heads, kv_heads", [(28, 4), (4, 4), (12, 2)])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_with_shared_prefixes_matches_attention_over_each_row_alone(heads, kv_heads, splits):
    """Rows 0, 2, 3 share three blocks and rows 4, 5 one (the samples of two prompts); rows 1 and
    6 share nothing. Reading the shared blocks once per group changes no output, also after
    members leave their group."""
    from prmtool.engines.hf.kernels import paged_decode
    from prmtool.engines.hf.kv_cache import PrefixGroups, gathered_attention

    torch.manual_seed(0)
    head_dim, width = 64, 6
    key_blocks, value_blocks = random_cache(kv_heads, head_dim)
    tables = [[1, 2, 3, 11, 12, 19], [20, 21], [1, 2, 3, 13], [1, 2, 3, 14, 15], [10, 16], [10, 17, 18], [30, 31, 32]]
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([90, 20, 60, 80, 30, 40, 45], device=DEVICE)
    query = torch.randn(len(tables), heads, head_dim, device=DEVICE)
    groups = PrefixGroups(len(tables), width, PrefixGroups.members_for(heads // kv_heads), torch.device(DEVICE))
    groups.add([0, 2, 3], [1, 2, 3])
    groups.add([4, 5], [10])
    groups.flush()
    assert groups.row_starts.tolist() == [48, 0, 48, 48, 16, 16, 0]
    scale = head_dim**-0.5
    positions = (seq_lens - 1).view(-1, 1)
    expected = gathered_attention(query.unsqueeze(2), key_blocks, value_blocks, block_tables, positions, scale)
    expected = expected.reshape(query.shape)
    grouped = paged_decode(query, key_blocks, value_blocks, block_tables, seq_lens, scale, splits=splits, shared=groups)
    torch.testing.assert_close(grouped, expected, atol=2e-5, rtol=2e-5)

    groups.remove(2)
    groups.remove(4)  # group (4, 5) keeps 5 alone; row 4 reads everything itself again
    groups.flush()
    assert groups.row_starts.tolist() == [48, 0, 0, 48, 0, 16, 0]
    after = paged_decode(query, key_blocks, value_blocks, block_tables, seq_lens, scale, splits=splits, shared=groups)
    torch.testing.assert_close(after, expected, atol=2e-5, rtol=2e-5)
    groups.remove(5)
    groups.flush()
    assert groups.lengths.tolist()[:2] == [48, 0] and len(groups.free_groups) == groups.lengths.numel() - 1
    groups.clear()  # what a new sampling call starts with
    assert groups.row_starts.tolist() == [0] * 7 and groups.lengths.tolist() == [0] * groups.lengths.numel()
    alone = paged_decode(query, key_blocks, value_blocks, block_tables, seq_lens, scale, splits=splits, shared=groups)
    torch.testing.assert_close(alone, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton's interpreter reads bfloat16 wrong")
def test_kernel_in_bfloat16_stays_within_rounding_of_the_reference():
    from prmtool.engines.hf.kernels import paged_decode
    from prmtool.engines.hf.kv_cache import PrefixGroups, gathered_attention

    torch.manual_seed(1)
    heads, kv_heads, head_dim = 28, 4, 128
    key_blocks, value_blocks = random_cache(kv_heads, head_dim, blocks=64, dtype=torch.bfloat16)
    rows = 8  # the 8 samples of one 40-block prompt, each with two blocks of its own
    tables = [list(range(1, 41)) + [41 + 2 * row, 42 + 2 * row] for row in range(rows)]
    block_tables = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.full((rows,), 40 * 16 + 20, device=DEVICE)
    query = torch.randn(rows, heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    groups = PrefixGroups(rows, 42, PrefixGroups.members_for(heads // kv_heads), torch.device(DEVICE))
    groups.add(list(range(rows)), list(range(1, 41)))
    groups.flush()
    scale = head_dim**-0.5
    positions = (seq_lens - 1).view(-1, 1)
    expected = gathered_attention(query.float().unsqueeze(2), key_blocks.float(), value_blocks.float(), block_tables,
                                  positions, scale).reshape(query.shape)  # fmt: skip
    grouped = paged_decode(query, key_blocks, value_blocks, block_tables, seq_lens, scale, shared=groups)
    torch.testing.assert_close(grouped.float(), expected, atol=2e-2, rtol=2e-2)


def test_hf_engine_draws_the_same_samples_with_and_without_cascade_attention_and_moving_rows(tmp_path, monkeypatch):
    """n samples of one long prompt read its blocks once per step (cascade), and a draining
    batch's last rows move down with their prefix group; float32 decoding gives the same tokens
    as each sample reading its blocks itself and as rows left in place. (Under Triton's
    interpreter on CPU the engine is told the kernel runs there.)"""
    import prmtool as api
    import prmtool.engines.hf.generate as generate
    from prmtool.engines import SamplingRequest
    from tests.gpu.test_engines_on_gpu import save_model

    if DEVICE == "cpu":
        monkeypatch.setattr(generate, "decode_kernel_available", lambda device, head_dim: True)
    folder = save_model(tmp_path / "policy", seed=0)
    samples = {}
    for shared, compact in ((True, True), (False, True), (True, False)):
        with api.load_engine("hf", str(folder), device=DEVICE, dtype="float32", prefix_cache=False,
                             shared_prefix_attention=shared, compact_rows=compact) as engine:  # fmt: skip
            prompt = engine.chat_prompt_ids("Add: " + " + ".join(map(str, range(120))))
            # The third request, longest in all, takes rows 0-7 and ends first: the second's
            # group then moves from rows 16-18 down into them (a draining batch compacts).
            requests = [SamplingRequest(prompt, n=8, max_tokens=24, temperature=0.0, seed=0),
                        SamplingRequest(prompt[:70], n=3, max_tokens=24, temperature=1.0, seed=1),
                        SamplingRequest(prompt + prompt[-40:], n=8, max_tokens=4, temperature=1.0, seed=2)]  # fmt: skip
            results = engine.sample(requests)
            assert engine.decoder.use_kernel and (engine.decoder.prefix_groups is not None) == shared
            assert (engine.last_stats.compactions >= 1) == compact
            samples[shared, compact] = [[c.token_ids for c in completions] for completions in results]
    assert samples[True, True] == samples[False, True] == samples[True, False]


def test_single_rollout_requests_of_one_prompt_share_a_cascade_group_and_draw_what_one_request_would(
    tmp_path, monkeypatch
):
    """label sends a probe's k rollouts as k requests of one sample each (continuous rounds, so
    the first right one can stop the rest): admitted together they read the prompt's blocks as
    one group, and draw the tokens the request of n = k draws."""
    import prmtool as api
    import prmtool.engines.hf.generate as generate
    from prmtool.engines import SamplingRequest
    from prmtool.engines.hf.kv_cache import PrefixGroups
    from tests.gpu.test_engines_on_gpu import save_model

    if DEVICE == "cpu":
        monkeypatch.setattr(generate, "decode_kernel_available", lambda device, head_dim: True)
    groups_added = []
    original_add = PrefixGroups.add

    def add(self, rows, blocks):
        groups_added.append((list(rows), len(blocks)))
        original_add(self, rows, blocks)

    monkeypatch.setattr(PrefixGroups, "add", add)
    folder = save_model(tmp_path / "policy", seed=0)
    with api.load_engine("hf", str(folder), device=DEVICE, dtype="float32") as engine:
        prompt = engine.chat_prompt_ids("Add: " + " + ".join(map(str, range(120))))
        whole = engine.sample([SamplingRequest(prompt, n=4, max_tokens=16, temperature=1.0, seed=3)])[0]
        engine.reset_prefix_cache()
        groups_added.clear()
        singles = engine.sample(
            [SamplingRequest(prompt, n=1, max_tokens=16, temperature=1.0, seed=3, first_sample=i) for i in range(4)]
        )
    assert [c.token_ids for c in whole] == [samples[0].token_ids for samples in singles]
    assert [len(rows) for rows, blocks in groups_added if blocks] == [4]  # one group of the four rows


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile inside CUDA-graph capture: a GPU only")
def test_compiled_decode_layers_draw_the_samples_eager_layers_do_under_cuda_graphs(tmp_path):
    """compile_decode: the decoder layers torch.compile'd (attention eager, through the kernel,
    with cascade groups) inside the captured decode graphs; float32: the same tokens."""
    import prmtool as api
    from prmtool.engines import SamplingRequest
    from tests.gpu.test_engines_on_gpu import save_model

    folder = save_model(tmp_path / "policy", seed=0)
    samples = {}
    for compiled in (False, True):
        with api.load_engine("hf", str(folder), device=DEVICE, dtype="float32", prefix_cache=False,
                             compile_decode=compiled) as engine:  # fmt: skip
            prompt = engine.chat_prompt_ids("Add: " + " + ".join(map(str, range(120))))
            requests = [SamplingRequest(prompt, n=8, max_tokens=24, temperature=0.0, seed=0),
                        SamplingRequest(prompt[:70], n=3, max_tokens=40, temperature=1.0, seed=1)]  # fmt: skip
            results = engine.sample(requests)
            assert engine.last_stats.cuda_graph and (engine.decoder.compiled_layers is not None) == compiled
            samples[compiled] = [[c.token_ids for c in completions] for completions in results]
    assert samples[True] == samples[False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_kernel_draws_the_tokens_torch_draws(dtype):
    """The decode sampler's kernel (sampling.inverse_cdf_tokens) against the inverse CDF in
    float64 and torch's float32 one, on rows over two blocks with banned (-inf) tokens, three
    temperatures and u up to 1. The kernel sums a row in another order than torch's cumsum, so
    the two may differ where u lands within float32 rounding of a boundary between tokens (u = 1
    among them: the tail's tiny weights no longer move a float32 sum), never onto a banned token."""
    from prmtool.engines.hf.sampling import inverse_cdf_tokens, sample_from_logits

    if dtype == torch.bfloat16 and DEVICE != "cuda":
        pytest.skip("Triton's interpreter reads bfloat16 wrong")
    torch.manual_seed(2)
    rows, vocab = 96, 5000  # 5,000 columns: a full block of 4,096 and a ragged one
    logits = (torch.randn(rows, vocab, device=DEVICE) * 3).to(dtype)
    logits[:, 7] = float("-inf")
    logits[3, :4500] = float("-inf")  # all of row 3's mass in the second block
    temperature = torch.tensor([0.5, 1.0, 1.3], device=DEVICE).repeat(rows // 3)
    uniform = 1.0 - torch.rand(rows, device=DEVICE)
    uniform[0], uniform[1] = 1.0, 1e-7
    got = inverse_cdf_tokens(logits, temperature, uniform)
    expected = sample_from_logits(logits, temperature, torch.ones_like(uniform), uniform, False, False, kernel=False)
    assert bool((logits.float().gather(1, got.view(-1, 1)) > float("-inf")).all())
    assert int(got[3]) >= 4500
    cdf = torch.softmax(logits.double() / temperature.double().unsqueeze(1), dim=-1).cumsum(dim=-1)
    target = uniform.double().unsqueeze(1) * cdf[:, -1:]
    rounding = 1e-4 * cdf[:, -1:]
    below = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=1)  # the CDF before each token
    reaches = cdf.gather(1, got.view(-1, 1)) >= target - rounding
    not_before = below.gather(1, got.view(-1, 1)) <= target + rounding
    assert bool((reaches & not_before).all())  # got is the inverse CDF at u, up to rounding
    assert int((got == expected).sum()) >= rows - 4


def test_sampling_kernel_draws_tokens_in_proportion_to_their_probability():
    from prmtool.engines.hf.sampling import sample_from_logits

    probabilities = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05], device=DEVICE)
    draws = 20000
    logits = probabilities.log().expand(draws, -1).contiguous()
    uniforms = 1.0 - torch.rand(draws, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ones = torch.ones(draws, device=DEVICE)
    tokens = sample_from_logits(logits, ones, ones, uniforms, any_top_p=False, any_greedy=False, kernel=True)
    frequencies = torch.bincount(tokens, minlength=5).float() / draws
    assert torch.allclose(frequencies, probabilities, atol=0.015)
    # With rows at top_p < 1 and temperature 0 in the batch, those rows go through torch.
    top_p = torch.where(torch.arange(draws, device=DEVICE) % 2 == 0, 0.7, 1.0)
    temperature = torch.where(torch.arange(draws, device=DEVICE) % 3 == 0, 0.0, 1.0)
    mixed = sample_from_logits(logits, temperature, top_p, uniforms, any_top_p=True, any_greedy=True, kernel=True)
    assert bool((mixed[temperature == 0] == 0).all())  # the argmax
    nucleus = mixed[(top_p < 1) & (temperature > 0)]
    assert set(nucleus.tolist()) <= {0, 2}


@pytest.mark.skipif(DEVICE != "cuda", reason="the engine takes the sampling kernel on CUDA only")
def test_hf_engine_with_the_sampling_kernel_repeats_its_samples_and_mostly_matches_torchs(tmp_path):
    """sampling_kernel=True: the engine's samples come from the kernel; a repeated call gives
    the same tokens, and most samples equal the torch sampler's (a rounding tie changes one)."""
    import prmtool as api
    from prmtool.engines import SamplingRequest
    from tests.gpu.test_engines_on_gpu import save_model

    folder = save_model(tmp_path / "policy", seed=0)
    samples = {}
    for kernel in (False, True, True):
        with api.load_engine("hf", str(folder), device=DEVICE, dtype="float32", sampling_kernel=kernel) as engine:
            assert engine.sampling_kernel == kernel
            prompt = engine.chat_prompt_ids("Add: " + " + ".join(map(str, range(40))))
            requests = [SamplingRequest(prompt, n=16, max_tokens=24, temperature=1.0, seed=3),
                        SamplingRequest(prompt[:30], n=8, max_tokens=24, temperature=0.7, seed=4)]  # fmt: skip
            results = engine.sample(requests)
            tokens = [c.token_ids for completions in results for c in completions]
            assert samples.setdefault(kernel, tokens) == tokens
    same = sum(a == b for a, b in zip(samples[True], samples[False]))
    assert same >= 0.75 * len(samples[True])
