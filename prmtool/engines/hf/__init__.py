"""The `hf` engine: transformers + torch, batched sampling and scoring on CPU or CUDA."""

from __future__ import annotations

import contextlib
import copy
import io
import random
from collections.abc import Callable

import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from prmtool.engines.base import (
    Cancel,
    Completion,
    Engine,
    EngineError,
    FollowUp,
    ProgressCallback,
    SamplingRequest,
    ScoringRequest,
    check_requests,
    length_batches,
)
from prmtool.engines.hf import hopper
from prmtool.engines.hf.generate import (
    BatchSampler,
    GenerationStats,
    ModelParts,
    PagedDecoder,
    attention_implementation,
    choose_num_blocks,
    round_up,
    wanted_blocks,
)
from prmtool.engines.hf.gguf_cache import loadable
from prmtool.engines.hf.log_probs import choose_target_log_probs, triton_available
from prmtool.engines.hf.transfer import on_device
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


def load(model: str | None, *, device=None, dtype=None, trust_remote_code: bool = False, **options) -> HFEngine:
    """`load_engine("hf", ...)`: options are HFEngine's own (max_batch_tokens, compile, ...)."""
    import inspect

    accepted = set(inspect.signature(HFEngine.__init__).parameters) - {"self", "model", "tokenizer"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise EngineError(f"unknown hf engine option(s) {', '.join(unknown)}: expected {', '.join(sorted(accepted))}")
    return HFEngine.from_pretrained(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **options)


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
      compile: torch.compile the decoder layers for scoring (default: on CUDA when Triton is
        installed). The first batch then takes 12 to 18 s longer on an H200 (bench/bench_score.py:
        19 to 25 s cold against 7.2 s warm for two 1.5B models over 606k tokens).
      kv_cache_tokens: positions the KV cache holds, all sequences together (default: on CUDA
        what 90% of free memory holds, capped by what the call's slots could fill unshared;
        on CPU that cap). Samples of one prompt, and prompts with a common prefix, share its
        keys and values; when the cache fills, the samples started last are recomputed later.
      prefix_cache: remember prompts' full blocks, so later prompts with the same beginning
        reuse their keys and values (default True). On a GPU, keys and values computed in
        another batch can differ in their last bits, so a sample may then differ, rarely, from
        the one a fresh engine draws; off, a sample depends on its seed alone (as before).
      shared_prefix_attention: on CUDA, a decode step reads the keys and values of a prompt
        once for all its samples rather than once per sample (cascade attention; default True).
      compact_rows: when samples finish and no request waits for their rows, move the busy
        rows above the fewest that hold them into idle ones, so a step computes about as many
        rows as are busy (default True; off, a step computes every row up to the highest busy one).
      compile_decode: torch.compile the decoder layers for decoding too (attention stays eager),
        so each layer's norms, rotary embedding, activation and residual adds run as a few fused
        kernels instead of some twenty small ones: the same samples, a 7B long-prefix step 1.12x
        faster on an H100 (bench/bench_generate.py, `hf` against `hf-eager-decode`), about 8 s
        of compilation the first time. Default: as `compile` (on CUDA where Triton is installed).
      sampling_kernel: sample the next tokens in one Triton kernel that reads the logits in
        place (sampling.py) instead of torch's cast, softmax and cumulative sum over the
        vocabulary: 0.25 ms against 1.41 for 512 rows of a 152k vocabulary on an H100, a 7B
        long-prefix run 1.04x faster (bench/bench_generate.py, `hf-torch-sampler` against `hf`).
        The same distribution; a token may differ from torch's within rounding. Default: on
        where the engine runs on CUDA with Triton installed (torch samples elsewhere).
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
        compile: bool | None = None,
        kv_cache_tokens: int | None = None,
        prefix_cache: bool = True,
        shared_prefix_attention: bool = True,
        compact_rows: bool = True,
        compile_decode: bool | None = None,
        sampling_kernel: bool | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.max_batch_size = max_batch_size or (1024 if on_cuda else 64)
        self.max_batch_tokens = max_batch_tokens or (16384 if on_cuda else 4096)
        self.use_cuda_graph = cuda_graph
        self.kv_cache_tokens = kv_cache_tokens
        self.prefix_cache = prefix_cache
        self.shared_prefix_attention = shared_prefix_attention
        self.compact_rows = compact_rows
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
        # Scoring computes vocab-sized float32 logits for this many positions at a time
        # (1 GiB on CUDA, where larger matmuls pay; 64 MiB on CPU).
        self.logits_chunk_rows = max(1, (2**28 if on_cuda else 2**24) // self.vocab_size)
        self.compile = on_cuda and triton_available() if compile is None else compile
        self.compile_decode = self.compile if compile_decode is None else compile_decode
        self.sampling_kernel = on_cuda and triton_available() and sampling_kernel is not False
        self._decode_layers: CompiledLayers | None = None  # compile_decode's, made with the first decoder
        self._compiled_layers: CompiledLayers | None = None
        self._float32_head = None
        self._mm_out_float32 = on_cuda and _mm_writes_float32(self.device)
        self._scoring_attention = (
            CAUSAL_SCORING_ATTENTION if plain_causal_attention(config) else config._attn_implementation
        )
        self._target_log_probs = choose_target_log_probs(self.device, self.compile)
        # On Hopper GPUs the output head and the log-normalizer run as one kernel (hopper.py).
        head = model.get_output_embeddings()
        self._fused_head = (
            hopper.available(self.device) and hopper.head_fusable(head) and not has_final_logit_transforms(config)
        )
        self.sliding_window = sliding_window_of(config)
        self.decoder: PagedDecoder | None = None  # kept between calls to reuse buffers and the graph
        self.decoders_built = 0
        self.retired_setup_seconds = 0.0  # setup_seconds of the decoders already replaced
        self.last_stats = GenerationStats()
        # How many samples the KV cache held when it last ran out (0: never seen): with long
        # prompts memory runs out before the slots do (sampling_capacity).
        self.samples_memory_holds = 0
        self._running: BatchSampler | None = None  # the call in progress, read by sampling_capacity

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
        # prmtool reports loading itself; transformers' bars (some plain tqdm, as in GGUF
        # loading) would break its stderr contract and --quiet, so they are swallowed.
        transformers.utils.logging.disable_progress_bar()
        try:
            files = loadable(location, torch_dtype)  # a GGUF file's converted folder (see gguf_cache)
            load_kwargs = files.from_pretrained_kwargs(trust_remote_code)
            with contextlib.redirect_stderr(io.StringIO()):
                tokenizer = AutoTokenizer.from_pretrained(files.folder, **load_kwargs)
                loaded = AutoModelForCausalLM.from_pretrained(files.folder, dtype=torch_dtype, **load_kwargs)
        except Exception as error:  # refused pickle weights, a broken config, a missing file: one line
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if first_line.startswith("Weights only load failed"):  # torch's refusal runs on for a paragraph
                first_line = (
                    "its weights are a pickle that torch refuses to run (weights_only); convert them to safetensors"
                )
            raise EngineError(f"cannot load model {location.path}: {first_line}") from error
        return cls(loaded.to(device), tokenizer, **options)

    # ------------------------------------------------------------------ sampling

    def sample(
        self, requests: list[SamplingRequest], on_progress: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        self._check_requests(requests)
        if not requests:
            return []
        self._check_window(max(len(r.prompt_ids) + r.max_tokens for r in requests))
        return self._run_sampler(requests, on_progress)

    def sample_continuously(
        self,
        requests: list[SamplingRequest],
        on_done: FollowUp,
        on_progress: ProgressCallback | None = None,
        longest: int = 0,
    ) -> None:
        """As `Engine.sample_continuously`, with follow-ups admitted into free decode slots while
        the other samples decode. The cache is sized for `longest` tokens (or the longest first
        request); a follow-up that needs more waits for a second pass sized for it."""
        pending = list(enumerate(requests))
        next_key = len(pending)
        while pending:
            self._check_requests([request for _, request in pending])
            need = max([longest] + [len(r.prompt_ids) + r.max_tokens for _, r in pending])
            self._check_window(need)
            max_tokens = max(r.max_tokens for _, r in pending)
            keys = [key for key, _ in pending]  # sampler request index -> request key
            index_of = {key: index for index, key in enumerate(keys)}
            later: list[tuple[int, SamplingRequest]] = []

            def follow_up(finished: list[int]) -> list[tuple[SamplingRequest, int]]:
                nonlocal next_key, later
                answer = on_done([(keys[index], sampler.results[index]) for index in finished])
                cancelled = {item.key for item in answer if isinstance(item, Cancel)}
                requests = [item for item in answer if not isinstance(item, Cancel)]
                self._check_requests(requests)
                if cancelled:
                    sampler.cancel({index_of[key] for key in cancelled if key in index_of})
                    later = [(key, request) for key, request in later if key not in cancelled]
                admitted = []
                for request in requests:
                    key, next_key = next_key, next_key + 1
                    if len(request.prompt_ids) + request.max_tokens <= need and request.max_tokens <= max_tokens:
                        index_of[key] = len(keys)
                        keys.append(key)
                        admitted.append((request, self._seed_of(request)))
                    else:
                        later.append((key, request))
                return admitted

            sampler = self._sampler([request for _, request in pending], on_progress, follow_up, need, max_tokens)
            self._running_until_done(sampler)
            pending = later

    def sampling_capacity(self) -> int:
        # The slots of the call in progress, or between calls the most a call may have (the
        # next call sizes its decoder for what it is given), or fewer where the KV cache ran out
        # with fewer samples decoding: label fills this capacity with probes it may ask next,
        # and past it they take blocks from the asked-for samples, which are preempted and
        # computed again. Not the last decoder's slots: a small call (a warm-up, a short last
        # shard) would cap every later one, whose decoder is sized by what it is first given.
        if self._running is not None:  # a continuous call learns as it goes
            self._learn_memory(self._running.stats)
            slots = self._running.decoder.num_slots
        else:
            slots = self.max_batch_size
        return min(slots, self.samples_memory_holds) if self.samples_memory_holds else slots

    def spare_slots_are_cheap(self) -> bool:
        return self.device.type == "cuda"  # on a CPU every row of a step costs its share

    def reset_prefix_cache(self) -> None:
        """Forget the prompts' blocks kept for later calls (as vLLM's `LLM.reset_prefix_cache`),
        so a benchmark's run finds none of an earlier run's prefixes."""
        if self.decoder is not None:
            self.decoder.pool.forget_all()

    def _learn_memory(self, stats: GenerationStats) -> None:
        if stats.samples_when_full:
            self.samples_memory_holds = stats.samples_when_full
        elif self.samples_memory_holds and stats.peak_samples > self.samples_memory_holds:
            self.samples_memory_holds = stats.peak_samples  # more fitted (shorter prompts) than last seen

    def _running_until_done(self, sampler: BatchSampler) -> list[list[Completion]]:
        self._running = sampler
        try:
            with torch.inference_mode():
                return sampler.run()
        finally:
            self._running = None
            self.last_stats = sampler.stats
            self._learn_memory(sampler.stats)

    def _check_requests(self, requests: list[SamplingRequest]) -> None:
        """check_requests, and no prompt longer than the model's context (its positions past
        it would be computed, as garbage, where vLLM refuses the request)."""
        check_requests(requests)
        context = getattr(self.model.config, "max_position_embeddings", None)
        longest = max((len(request.prompt_ids) for request in requests), default=0)
        if isinstance(context, int) and longest >= context:
            raise EngineError(
                f"a prompt of {longest:,} tokens does not fit the model's context of {context:,} positions "
                "(max_position_embeddings): shorten the prompts (fewer or shorter steps) or use a model of a longer "
                "context"
            )

    def _check_window(self, longest: int) -> None:
        if self.sliding_window is not None and longest > self.sliding_window:
            raise EngineError(
                f"a request needs {longest} tokens but the model attends over a sliding window of "
                f"{self.sliding_window}, which the hf engine does not implement: use the vllm engine"
            )

    def _seed_of(self, request: SamplingRequest) -> int:
        return request.seed if request.seed is not None else self.seed_source.getrandbits(63)

    def _sampler(self, requests, on_progress, follow_up=None, longest=0, max_tokens=0) -> BatchSampler:
        # Seeds are drawn up front, in request order, so a run is reproducible for a fixed engine seed.
        seeds = [self._seed_of(r) for r in requests]
        max_len = round_up(max([longest] + [len(r.prompt_ids) + r.max_tokens for r in requests]), CACHE_LENGTH_STEP)
        max_tokens = round_up(max([max_tokens] + [r.max_tokens for r in requests]), CACHE_LENGTH_STEP)
        total_samples = sum(r.n for r in requests)
        if follow_up is not None:
            # A follow-up replaces the request it follows, but may ask for more samples (label's
            # staged sampling draws k/4 rollouts first, then the other 3k/4): room for 4x.
            total_samples *= 4
        with torch.inference_mode():
            decoder = self._decoder_for(total_samples, max_len, max_tokens)
        return BatchSampler(
            decoder,
            self.tokenizer,
            requests,
            seeds,
            self.eos_token_ids,
            self.max_batch_tokens,
            on_progress,
            follow_up,
            compact_rows=self.compact_rows,
        )

    def _run_sampler(self, requests, on_progress) -> list[list[Completion]]:
        return self._running_until_done(self._sampler(requests, on_progress))

    def _decoder_for(self, total_samples: int, max_len: int, max_tokens: int) -> PagedDecoder:
        # Pool sizes are powers of two and lengths multiples of CACHE_LENGTH_STEP, so repeated
        # calls of a stage find the decoder (and its captured graphs) of the previous call.
        # A decoder with more slots and longer rows serves fewer samples and shorter requests
        # at no cost per step (a step computes only the rows up to the highest busy one, and
        # attention reads only the positions they fill), and saves a new cache and new graphs:
        # label's rounds differ in their prompts' lengths and in how many searches are left.
        wanted_slots = min(self.max_batch_size, 1 << (total_samples - 1).bit_length())
        old = self.decoder
        if (
            old is not None
            and old.num_slots >= wanted_slots
            and old.max_len >= max_len
            and old.max_tokens >= max_tokens
        ):
            return old
        wanted = wanted_blocks(wanted_slots, max_len, self.kv_cache_tokens)
        kept = None
        if old is not None:
            self.retired_setup_seconds += old.setup_seconds
            # The KV cache outlives its decoder where it is as large as the new one would be (or
            # was as large as memory allows): a longer round of label's finds the last's prefixes.
            if old.pool.num_blocks >= wanted or old.pool.num_blocks < old.wanted_blocks:
                kept = (old.pool, old.cache)
        self.decoder = old = None  # free the old buffers before sizing the new ones
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        num_blocks = (
            kept[0].num_blocks if kept else choose_num_blocks(self.parts, wanted, wanted_slots, self.vocab_size)
        )
        self.decoder = PagedDecoder(
            self.parts,
            wanted_slots,
            max_len,
            max_tokens,
            num_blocks,
            self.use_cuda_graph,
            kept=kept,
            prefix_cache=self.prefix_cache,
            shared_prefix_attention=self.shared_prefix_attention,
            compiled_layers=self._compiled_decode_layers(),
            sampling_kernel=self.sampling_kernel,
        )
        self.decoder.wanted_blocks = wanted
        self.decoders_built += 1
        return self.decoder

    def _compiled_decode_layers(self) -> CompiledLayers | None:
        # Its own compiled forwards, apart from scoring's: decoding traces other shapes and
        # another attention, and keeps the unfused MLP (few rows a step).
        if self.compile_decode and self._decode_layers is None:
            self._decode_layers = CompiledLayers(self.parts.backbone, self.parts.config.num_hidden_layers)
        return self._decode_layers

    def setup_seconds(self) -> float:
        """Seconds spent so far building decoders (caches, CUDA graphs): work a call pays for
        on top of sampling whenever it needs a decoder of another shape."""
        return self.retired_setup_seconds + (self.decoder.setup_seconds if self.decoder is not None else 0.0)

    # ------------------------------------------------------------------ scoring

    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        """Log p of every continuation token: length-sorted, right-padded batches of at most
        `max_batch_tokens` padded tokens; the vocabulary's log-normalizer in chunks, never a
        batch x length x vocab tensor."""
        return self.score_async(requests)()

    def score_async(self, requests: list[ScoringRequest]) -> Callable[[], list[list[float]]]:
        # Every batch is queued on the device with no host synchronisation; the returned
        # function waits for each batch's copy to the host, in turn.
        for number, request in enumerate(requests):
            if not request.prompt_ids:
                raise EngineError(f"scoring request {number}: empty prompt_ids (the first token has no context)")
        todo = [i for i, r in enumerate(requests) if r.continuation_ids]
        lengths = [len(requests[i].prompt_ids) + len(requests[i].continuation_ids) for i in todo]
        queued = []
        with torch.inference_mode():
            for batch in length_batches(lengths, self.max_batch_tokens):
                indices = [todo[j] for j in batch]
                queued.append((indices, self._copy_to_host(self._score_batch([requests[i] for i in indices]))))

        def wait() -> list[list[float]]:
            results: list[list[float]] = [[] for _ in requests]
            for indices, (log_probs, copied) in queued:
                if copied is not None:
                    copied.synchronize()
                flat, offset = log_probs.tolist(), 0
                for index in indices:
                    count = len(requests[index].continuation_ids)
                    results[index] = flat[offset : offset + count]
                    offset += count
            return results

        return wait

    def _score_batch(self, requests: list[ScoringRequest]) -> torch.Tensor:
        """The continuation tokens' log-probabilities of one batch, flattened, left on the device."""
        width = max(len(r.prompt_ids) + len(r.continuation_ids) for r in requests)
        input_ids = torch.zeros(len(requests), width, dtype=torch.long)
        for row, request in enumerate(requests):
            sequence = list(request.prompt_ids) + list(request.continuation_ids)
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
        # No attention mask: the batch is right-padded, so under the causal mask no real token
        # can see a pad (pads only come after it), and the pads' outputs are never read. A mask
        # built from the pad id would also hide real tokens equal to it (an EOS inside a
        # response, with pad = eos), the reference code's bug. Without a mask SDPA runs its
        # fastest causal kernel.
        with attention_implementation(self.parts.config, self._scoring_attention), self._scoring_backbone() as backbone:
            hidden = backbone(input_ids=on_device(input_ids, self.device), use_cache=False).last_hidden_state

        # The hidden state at position t predicts token t + 1: only the positions that predict
        # continuation tokens go through the output head, flattened over the batch.
        rows, positions, targets = [], [], []
        for row, request in enumerate(requests):
            start = len(request.prompt_ids) - 1
            count = len(request.continuation_ids)
            rows += [row] * count
            positions += range(start, start + count)
            targets += request.continuation_ids
        selected = hidden[on_device(torch.tensor(rows), self.device), on_device(torch.tensor(positions), self.device)]
        target_ids = on_device(torch.tensor(targets), self.device)
        if self._fused_head:
            return hopper.head_target_log_probs(selected, self.model.get_output_embeddings().weight, target_ids)
        log_probs = []
        for start in range(0, len(targets), self.logits_chunk_rows):
            logits = self._float32_logits(selected[start : start + self.logits_chunk_rows])
            log_probs.append(self._target_log_probs(logits, target_ids[start : start + self.logits_chunk_rows]))
        return torch.cat(log_probs)

    def _copy_to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Queues a copy of `tensor` to host memory right behind the work that computes it, and
        an event that marks its end. Waiting on that event waits for this batch alone, where a
        plain `.tolist()` would queue its copy after every batch launched since, and the device
        would idle while the host reads results and launches the next batch."""
        if self.device.type != "cuda":
            return tensor, None
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    def _float32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 even for a bf16 model: bf16 rounds a logit near 20 by up to 0.06,
        too coarse for the log-probability differences implicit PRM rewards are made of. On
        CUDA the bf16 matmul writes float32 directly (float32 accumulation, bf16 speed)."""
        head = self.model.get_output_embeddings()
        if head.weight.dtype == torch.float32:
            logits = head(hidden.float())
        elif self._mm_out_float32:
            logits = torch.mm(hidden, head.weight.T, out_dtype=torch.float32)
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias.float()
        else:
            if self._float32_head is None:
                self._float32_head = copy.deepcopy(head).float()
            logits = self._float32_head(hidden.float())
        return self._final_logit_transforms(logits)

    @contextlib.contextmanager
    def _scoring_backbone(self):
        """The backbone to score with: compiled when `self.compile` (see CompiledLayers)."""
        if not self.compile:
            yield self.parts.backbone
            return
        if self._compiled_layers is None:
            self._compiled_layers = CompiledLayers(
                self.parts.backbone, self.parts.config.num_hidden_layers, fuse_mlp=hopper.available(self.device)
            )
        with self._compiled_layers.swapped_in() as backbone:
            yield backbone

    # ------------------------------------------------------------------ shared

    def _logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._final_logit_transforms(self.model.get_output_embeddings()(hidden))

    def _final_logit_transforms(self, logits: torch.Tensor) -> torch.Tensor:
        """The final-logit transforms some architectures add after the output head (see
        has_final_logit_transforms)."""
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


class CompiledLayers:
    """torch.compile of a model's repeated decoder layers ("regional compilation"). The layers
    share one code object, so one compilation serves them all: seconds, where compiling the
    whole backbone takes over a minute. The rotary tables, computed once per forward outside
    the layers, are then read instead of recomputed inside every layer. The compiled forwards
    are swapped in only while they run (scoring; decode steps under compile_decode, each with
    its own instance), so everything else keeps the eager layers.
    With `fuse_mlp`, SwiGLU MLPs run hopper.swiglu meanwhile. A backbone without a list of
    identical layers is compiled whole."""

    def __init__(self, backbone: torch.nn.Module, num_layers: int, fuse_mlp: bool = False):
        self.backbone = backbone
        self.layers = repeated_layers(backbone, num_layers)
        mlps = [getattr(layer, "mlp", None) for layer in self.layers]
        self.fused_mlps = (
            [(mlp, hopper.fused_mlp_forward(mlp)) for mlp in mlps]
            if fuse_mlp and mlps and all(mlp is not None and hopper.swiglu_fusable(mlp) for mlp in mlps)
            else []
        )
        # dynamic=True: one compiled graph serves every batch shape.
        self.forwards = [torch.compile(layer.forward, dynamic=True) for layer in self.layers]
        self.whole = None if self.layers else torch.compile(backbone, dynamic=True)

    @contextlib.contextmanager
    def swapped_in(self):
        if self.whole is not None:
            yield self.whole
            return
        for layer, forward in zip(self.layers, self.forwards):
            layer.forward = forward
        for mlp, forward in self.fused_mlps:
            mlp.forward = forward
        try:
            yield self.backbone
        finally:
            for module in self.layers + [mlp for mlp, _ in self.fused_mlps]:
                del module.forward  # back to the class's eager forward


def repeated_layers(backbone: torch.nn.Module, num_layers: int) -> list[torch.nn.Module]:
    """The backbone's decoder layers: a child ModuleList of `num_layers` modules of one class."""
    for child in backbone.children():
        if (
            isinstance(child, torch.nn.ModuleList)
            and len(child) == num_layers
            and len({type(layer) for layer in child}) == 1
        ):
            return list(child)
    return []


def causal_scoring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain causal attention for scoring right-padded batches: no mask tensor at all (none is
    needed, see HFEngine._score_batch), so SDPA runs its fastest causal kernel even under
    torch.compile (which makes transformers materialise its mask), and grouped-query heads are
    read in place instead of being copied once per query head."""
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return output.transpose(1, 2), None


CAUSAL_SCORING_ATTENTION = "prmtool_causal_scoring"
# Registered as an attention function only: for an implementation with no mask function,
# transformers builds no mask and skips its check for packed sequences, whose `if tensor.all()`
# would make the host wait for the device before every forward pass (1 ms idle each time).
AttentionInterface.register(CAUSAL_SCORING_ATTENTION, causal_scoring_attention)


def plain_causal_attention(config) -> bool:
    """Whether every layer's attention is plain causal softmax attention (what
    causal_scoring_attention computes): no sliding windows, logit soft-capping or sinks."""
    layer_types = set(getattr(config, "layer_types", None) or [])
    return (
        config._attn_implementation in ("sdpa", "eager")
        and sliding_window_of(config) is None
        and not getattr(config, "attn_logit_softcapping", None)
        and layer_types <= {"full_attention"}
    )


def _mm_writes_float32(device: torch.device) -> bool:
    """Whether this torch can multiply bf16 matrices into a float32 result (torch >= 2.9)."""
    try:
        a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def has_final_logit_transforms(config) -> bool:
    return any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


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
    uses_window = "sliding_attention" in layer_types or (
        not layer_types and getattr(config, "use_sliding_window", False)
    )
    return window if window and uses_window else None
