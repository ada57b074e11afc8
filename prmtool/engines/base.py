"""What every engine takes and returns, and the text handling all engines share.

This module imports neither torch nor transformers, so `import prmtool.engines` stays cheap:
the heavy modules load only when `load_engine` builds an engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prmtool.core.errors import InputError


class EngineError(InputError):
    """A model or engine that cannot be used as asked; the message is one line saying why.
    Exit code 2, as for any bad input."""


@dataclass(frozen=True)
class SamplingRequest:
    """Sample `n` continuations of a prompt given as token ids (so step prefixes continue exactly).

    `temperature == 0` means greedy decoding. `seed` fixes the samples of this request whatever
    else runs in the same batch; `None` draws a fresh seed. A seed drives a stream of samples,
    and the request takes numbers `first_sample` to `first_sample + n - 1` of it: two requests
    that split one (n=2, then n=6 with first_sample=2) sample exactly what it would have.
    """

    prompt_ids: list[int]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None
    first_sample: int = 0


@dataclass(frozen=True)
class Completion:
    """One sampled continuation.

    Stop strings follow vLLM: generation ends at the first occurrence of any stop string, `text`
    ends just before it (the stop string is excluded), while `token_ids` keep every generated
    token up to and including the one that completed the stop string (or the EOS token).
    """

    text: str
    token_ids: list[int]
    num_tokens: int  # generated tokens, including the one that hit a stop
    finish_reason: str  # "stop" (EOS or stop string) | "length" (max_tokens reached)


@dataclass(frozen=True)
class ScoringRequest:
    """Ask for log p(continuation token | everything before it) for every continuation token."""

    prompt_ids: list[int]
    continuation_ids: list[int]


# on_progress(requests_done, tokens_generated_delta): requests finished so far in this call
# (cumulative), and tokens generated since the previous call (an increment).
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Cancel:
    """In an answer of `on_done`: stop the request of this key, whose samples are no longer
    wanted; it is never handed back (an engine that cannot stop it drops its result)."""

    key: int


# on_done(finished) -> follow-ups: `finished` holds (request key, its completions) for requests
# that just finished; the answer lists new requests to sample (possibly none), and may cancel
# requests still running.
FollowUp = Callable[[list[tuple[int, list["Completion"]]]], list["SamplingRequest | Cancel"]]


class Engine(ABC):
    """A loaded model that samples and scores token sequences. Close it to free its memory."""

    tokenizer: Any  # the Hugging Face tokenizer of the model

    @abstractmethod
    def sample(
        self, requests: list[SamplingRequest], on_progress: ProgressCallback | None = None
    ) -> list[list[Completion]]:
        """One list of `request.n` completions per request, in request order."""

    def sampling_capacity(self) -> int:
        """How many samples the engine decodes side by side (its batch slots); 0 when unknown.
        label fills slots that would idle with samples it may need next (speculative probes)."""
        return 0

    def spare_slots_are_cheap(self) -> bool:
        """Whether samples added to a call's idle slots cost little (a GPU's decode step reads
        the weights once for every row): label's --speculate is on by default where they do."""
        return True

    def sample_continuously(
        self,
        requests: list[SamplingRequest],
        on_done: FollowUp,
        on_progress: ProgressCallback | None = None,
        longest: int = 0,
    ) -> None:
        """Sample `requests` and hand each finished one to `on_done`, which may answer with more
        requests to sample; ends when nothing is left. Request keys count up from 0 in the order
        requests are given (the first list, then each answer of `on_done`). `longest` is a hint:
        the most tokens (prompt + max_tokens) a later request may need. An engine may also call
        `on_done([])` while it has room, to collect follow-ups that became ready since (the
        caller may prepare them on another thread); `on_done` must not answer an empty call
        with an empty list while it still owes follow-ups and the engine has nothing running.

        This default runs in rounds (`sample_in_rounds`). Engines that admit new requests while
        others decode (hf, vllm) start a follow-up as soon as the request it follows is done."""
        sample_in_rounds(self, requests, on_done, on_progress)

    @abstractmethod
    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        """Natural-log probability of every continuation token, one list per request."""

    def score_async(self, requests: list[ScoringRequest]) -> Callable[[], list[list[float]]]:
        """Start scoring and return a function that waits for the result of `score`. An engine
        that can queue work on its device returns at once, so the caller can prepare the next
        batch (or run another model) while this one computes."""
        results = self.score(requests)
        return lambda: results

    def chat_prompt_ids(
        self, problem: str, system_prompt: str | None = None, prompt_template: str | None = None
    ) -> list[int]:
        """Token ids of the prompt that asks the model to solve `problem`.

        `prompt_template` is any text containing "{problem}" (replaced literally, so braces in
        LaTeX are safe). The user message goes through the tokenizer's chat template with the
        assistant turn opened. A tokenizer without a chat template (a base model) gets the plain
        text: the system prompt, a blank line, then the user message.
        """
        user_message = problem if prompt_template is None else prompt_template.replace("{problem}", problem)
        if not getattr(self.tokenizer, "chat_template", None):
            text = user_message if system_prompt is None else f"{system_prompt}\n\n{user_message}"
            return self.tokenizer.encode(text, add_special_tokens=True)
        messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        messages.append({"role": "user", "content": user_message})
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja2's sandbox refusing the template, or a template bug
            raise EngineError(
                f"the model's chat template cannot be applied ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:160]})"
            ) from None
        # The template already holds every special token (BOS included where the model uses one).
        return self.tokenizer.encode(text, add_special_tokens=False)

    def continuation_ids(self, prompt_ids: list[int], partial_answer: str) -> list[int]:
        """`prompt_ids` followed by the ids of a partial assistant answer (a step prefix).

        The partial answer is encoded on its own, without special tokens: a chat prompt ends at a
        template boundary (`...assistant\\n`), and a model never emits a token that spans text on
        both sides of the prompt's last token, so encoding the answer alone gives the tokens the
        model would have produced for it.

        Token boundary inside the answer: the ids are the tokenizer's own split of exactly this
        text. Cutting a response between steps keeps the tokens of the full response as long as
        the cut falls on a pre-tokenizer boundary; byte-level BPE tokenizers (GPT-2, Llama 3,
        Qwen, SmolLM) end a run of newlines before a letter, so a prefix that ends with "\\n\\n"
        followed by "Step 2" is a token prefix of the whole. A cut inside a word is re-split.
        """
        return list(prompt_ids) + self.tokenizer.encode(partial_answer, add_special_tokens=False)

    def continuation_ids_batch(self, prompt_ids: list[list[int]], partial_answers: list[str]) -> list[list[int]]:
        """`continuation_ids` of each (prompt, partial answer) pair, the same ids. A fast (Rust)
        tokenizer encodes all the answers in one call, on every core: label prepares thousands
        of step prefixes a round, and one `encode` call each costs seconds of them."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or type(self).continuation_ids is not Engine.continuation_ids:
            # a slow tokenizer, or an engine that encodes answers its own way
            pairs = zip(prompt_ids, partial_answers, strict=True)
            return [self.continuation_ids(prompt, answer) for prompt, answer in pairs]
        # What `tokenizer.encode` sets before it encodes: the whole text, no padding.
        backend.no_truncation()
        backend.no_padding()
        encodings = backend.encode_batch(partial_answers, add_special_tokens=False)
        return [list(prompt) + encoding.ids for prompt, encoding in zip(prompt_ids, encodings, strict=True)]

    def close(self) -> None:
        """Release the model. The engine cannot be used afterwards."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def sample_in_rounds(
    engine: Engine, requests: list[SamplingRequest], on_done: FollowUp, on_progress: ProgressCallback | None = None
) -> None:
    """`sample_continuously` in lockstep rounds: one `sample` call for the pending requests,
    then one for all the follow-ups they gave, and so on."""
    pending = list(enumerate(requests))
    next_key = len(pending)
    while pending:
        results = engine.sample([request for _, request in pending], on_progress)
        answer = on_done([(key, samples) for (key, _), samples in zip(pending, results)])
        # A round has ended when on_done runs: nothing is left to cancel.
        follow_ups = [request for request in answer if not isinstance(request, Cancel)]
        pending = list(enumerate(follow_ups, start=next_key))
        next_key += len(pending)


def length_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, shortest first, cut into batches whose padded size (longest
    length x count) fits `max_batch_tokens`. Neighbours in sorted order differ little in
    length, so right-padding a batch wastes few tokens; a sequence longer than the budget gets a
    batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and lengths[index] * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def first_stop_index(text: str, stop: tuple[str, ...]) -> int | None:
    """Index in `text` where the earliest occurrence of any stop string begins, or None."""
    found = [index for index in (text.find(s) for s in stop if s) if index >= 0]
    return min(found) if found else None


def check_requests(requests: list[SamplingRequest]) -> None:
    """Reject requests no engine can serve, with a message naming the request."""
    for number, request in enumerate(requests):
        if not request.prompt_ids:
            raise EngineError(f"sampling request {number}: empty prompt_ids")
        if request.n < 1 or request.max_tokens < 1:
            raise EngineError(f"sampling request {number}: n and max_tokens must be at least 1")
        if request.first_sample < 0:
            raise EngineError(f"sampling request {number}: first_sample must be at least 0")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise EngineError(f"sampling request {number}: need temperature >= 0 and 0 < top_p <= 1")
