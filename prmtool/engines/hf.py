"""The `hf` engine: transformers + torch, batched sampling and scoring on CPU or CUDA."""

from __future__ import annotations

import contextlib
import copy
import io
import random

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from prmtool.engines.base import (
    Completion,
    Engine,
    EngineError,
    ProgressCallback,
    SamplingRequest,
    ScoringRequest,
    check_requests,
)
from prmtool.engines.hf_generate import (
    BatchSampler,
    GenerationStats,
    ModelParts,
    SlotDecoder,
    choose_num_slots,
    right_padded,
    round_up,
)
from prmtool.engines.model_files import locate_model

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}

# Slot lengths are rounded up to this, so calls of similar length reuse one decoder (and its CUDA graph).
CACHE_LENGTH_STEP = 128


class HFEngine(Engine):
    """Samples and scores with a transformers causal LM already in memory.

    Options:
      max_batch_size: most sequences decoded at once (default 1024 on CUDA, 64 on CPU).
      max_batch_tokens: most (padded) tokens per prefill or scoring forward pass
        (default 16384 on CUDA, 4096 on CPU).
      seed: seeds the draw of per-request seeds for requests whose seed is None.
      ignore_eos: never stop at EOS (benchmarks with random weights).
      eos_token_ids: token ids that end a sample (default: the generation config's EOS ids plus
        the tokenizer's EOS id).
      cuda_graph: capture the decode step as a CUDA graph on CUDA (default True).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        eos_token_ids: list[int] | None = None,
        cuda_graph: bool = True,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.max_batch_size = max_batch_size or (1024 if on_cuda else 64)
        self.max_batch_tokens = max_batch_tokens or (16384 if on_cuda else 4096)
        self.use_cuda_graph = cuda_graph
        self.seed_source = random.Random(seed)
        self.eos_token_ids = set() if ignore_eos else set(eos_token_ids or default_eos_token_ids(model, tokenizer))
        config = model.config.get_text_config()
        self.parts = ModelParts(
            backbone=model.base_model,
            logits_from_hidden=self._logits_from_hidden,
            config=config,
            device=self.device,
            dtype=next(model.parameters()).dtype,
        )
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        # Scoring computes vocab-sized float32 logits for this many positions at a time (~256 MiB).
        self.logits_chunk_rows = max(1, 2**26 // self.vocab_size)
        self.sliding_window = sliding_window_of(config)
        self.decoder: SlotDecoder | None = None  # kept between calls to reuse buffers and the graph
        self.decoder_shape: tuple[int, int, int] | None = None
        self.last_stats = GenerationStats()

    @classmethod
    def from_pretrained(
        cls,
        model: str | None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        **options,
    ) -> HFEngine:
        location = locate_model(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype in (None, "auto"):
            torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise EngineError(f"unknown dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
        # local_files_only: prmtool never reaches the model hub.
        load_kwargs = dict(gguf_file=location.gguf_file, trust_remote_code=trust_remote_code, local_files_only=True)
        # prmtool reports loading itself; transformers' bars (some plain tqdm, as in GGUF
        # loading) would break its stderr contract and --quiet, so they are swallowed.
        transformers.utils.logging.disable_progress_bar()
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                tokenizer = AutoTokenizer.from_pretrained(location.folder, **load_kwargs)
                loaded = AutoModelForCausalLM.from_pretrained(location.folder, dtype=torch_dtype, **load_kwargs)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise EngineError(f"cannot load model {location.path}: {first_line}") from error
        return cls(loaded.to(device), tokenizer, **options)

    # ------------------------------------------------------------------ sampling

    def sample(
        self, requests: list[SamplingRequest], on_progress: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        check_requests(requests)
        if not requests:
            return []
        longest = max(len(r.prompt_ids) + r.max_tokens for r in requests)
        if self.sliding_window is not None and longest > self.sliding_window:
            raise EngineError(
                f"a request needs {longest} tokens but the model attends over a sliding window of "
                f"{self.sliding_window}, which the hf engine does not implement: use the vllm engine"
            )
        # Drawn up front, in request order, so a run is reproducible for a fixed engine seed.
        seeds = [r.seed if r.seed is not None else self.seed_source.getrandbits(63) for r in requests]
        max_len = round_up(longest, CACHE_LENGTH_STEP)
        max_tokens = round_up(max(r.max_tokens for r in requests), CACHE_LENGTH_STEP)
        total_samples = sum(r.n for r in requests)
        with torch.inference_mode():
            decoder = self._decoder_for(total_samples, max_len, max_tokens)
            sampler = BatchSampler(
                decoder, self.tokenizer, requests, seeds, self.eos_token_ids, self.max_batch_tokens, on_progress
            )
            results = sampler.run()
        self.last_stats = sampler.stats
        return results

    def _decoder_for(self, total_samples: int, max_len: int, max_tokens: int) -> SlotDecoder:
        # Pool sizes are powers of two and lengths multiples of CACHE_LENGTH_STEP, so repeated
        # calls of a stage find the decoder (and its captured graph) of the previous call.
        wanted_slots = min(self.max_batch_size, 1 << (total_samples - 1).bit_length())
        shape = (wanted_slots, max_len, max_tokens)
        if self.decoder is not None and self.decoder_shape == shape:
            return self.decoder
        self.decoder = None  # free the old buffers before sizing the new ones
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        num_slots = choose_num_slots(self.parts, max_len, wanted_slots, self.vocab_size)
        self.decoder = SlotDecoder(self.parts, num_slots, max_len, max_tokens, self.use_cuda_graph)
        self.decoder_shape = shape
        return self.decoder

    # ------------------------------------------------------------------ scoring

    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        for number, request in enumerate(requests):
            if not request.prompt_ids:
                raise EngineError(f"scoring request {number}: empty prompt_ids (the first token has no context)")
        results: list[list[float]] = [[] for _ in requests]
        # Length-sorted batches keep padding small.
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids) + len(requests[i].continuation_ids))
        batch: list[int] = []
        with torch.inference_mode():
            # Logits in float32 even for a bf16 model: bf16 rounds a logit near 20 by up to 0.06,
            # too coarse for the log-probability differences that implicit PRM rewards are made of.
            head = self.model.get_output_embeddings()
            float32_head = head if head.weight.dtype == torch.float32 else copy.deepcopy(head).float()
            for index in order:
                request = requests[index]
                if not request.continuation_ids:
                    continue
                length = len(request.prompt_ids) + len(request.continuation_ids)
                if batch and length * (len(batch) + 1) > self.max_batch_tokens:
                    self._score_batch([requests[i] for i in batch], batch, results, float32_head)
                    batch = []
                batch.append(index)
            if batch:
                self._score_batch([requests[i] for i in batch], batch, results, float32_head)
        return results

    def _score_batch(
        self,
        requests: list[ScoringRequest],
        indices: list[int],
        results: list[list[float]],
        float32_head: torch.nn.Module,
    ) -> None:
        device = self.device
        input_ids, lengths = right_padded([list(r.prompt_ids) + list(r.continuation_ids) for r in requests], device)
        # Right padding with a mask from the lengths: pad tokens are never attended to, and no real
        # token (an EOS inside a continuation included) is ever mistaken for padding.
        attention_mask = (torch.arange(input_ids.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
        hidden = self.parts.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

        # The hidden state at position t predicts token t + 1: gather only the positions that
        # predict continuation tokens, flattened over the batch.
        rows, positions, targets = [], [], []
        for row, request in enumerate(requests):
            start = len(request.prompt_ids) - 1
            count = len(request.continuation_ids)
            rows += [row] * count
            positions += range(start, start + count)
            targets += request.continuation_ids
        selected = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
        target_ids = torch.tensor(targets, device=device)
        chunk = self.logits_chunk_rows
        log_probs = []
        for start in range(0, len(targets), chunk):
            logits = self._logits_from_hidden(selected[start : start + chunk].float(), float32_head)
            target_logits = logits.gather(1, target_ids[start : start + chunk].unsqueeze(1)).squeeze(1)
            log_probs.append(target_logits - torch.logsumexp(logits, dim=-1))
        flat = torch.cat(log_probs).tolist()
        offset = 0
        for index, request in zip(indices, requests):
            results[index] = flat[offset : offset + len(request.continuation_ids)]
            offset += len(request.continuation_ids)

    # ------------------------------------------------------------------ shared

    def _logits_from_hidden(self, hidden: torch.Tensor, head: torch.nn.Module | None = None) -> torch.Tensor:
        """The model's output head (or `head`, a float32 copy of it), with the final-logit
        transforms some architectures add."""
        logits = (head or self.model.get_output_embeddings())(hidden)
        config = self.parts.config
        if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3
            cap = config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        if getattr(config, "logit_scale", None):  # Cohere
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None):  # Granite
            logits = logits / config.logits_scaling
        return logits

    def close(self) -> None:
        self.decoder = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def default_eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the generation config (chat models often list several) and of the tokenizer."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def sliding_window_of(config) -> int | None:
    """The attention window when some layers use one, else None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = "sliding_attention" in layer_types or (not layer_types and getattr(config, "use_sliding_window", False))
    return window if window and uses_window else None
