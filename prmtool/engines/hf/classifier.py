"""A trained discriminative PRM: a token-classification model (what TRL's PRMTrainer trains)
that reads a step's label at the last token of the step and its separator."""

from __future__ import annotations

import contextlib
import io

import torch
import transformers
from transformers import AutoModelForTokenClassification, AutoTokenizer

from prmtool.engines.base import EngineError, length_batches
from prmtool.engines.hf import DTYPES
from prmtool.engines.hf.generate import right_padded
from prmtool.engines.hf.gguf_cache import loadable
from prmtool.engines.model_files import locate_model


class StepClassifier:
    """P(step is good) at given positions of token sequences, in length-sorted batches."""

    def __init__(self, model, tokenizer, *, max_batch_tokens: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens or (16384 if self.device.type == "cuda" else 4096)
        self.num_labels = model.config.num_labels
        if self.num_labels not in (1, 2):
            raise EngineError(
                f"a step classifier needs 1 label (sigmoid) or 2 (bad, good), this model has {self.num_labels}"
            )

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        **options,
    ) -> StepClassifier:
        location = locate_model(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = DTYPES.get(dtype or "", torch.bfloat16 if device.startswith("cuda") else torch.float32)
        transformers.utils.logging.disable_progress_bar()
        try:
            files = loadable(location, torch_dtype)  # a GGUF file's converted folder (see gguf_cache)
            kwargs = files.from_pretrained_kwargs(trust_remote_code)
            with contextlib.redirect_stderr(io.StringIO()):
                tokenizer = AutoTokenizer.from_pretrained(files.folder, **kwargs)
                loaded = AutoModelForTokenClassification.from_pretrained(files.folder, dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise EngineError(f"cannot load token-classification PRM {location.path}: {first_line}") from error
        return cls(loaded.to(device), tokenizer, **options)

    def step_probabilities(self, sequences: list[list[int]], positions: list[list[int]]) -> list[list[float]]:
        """For each sequence, P(good) read at each of its `positions`."""
        results: list[list[float]] = [[] for _ in sequences]
        with torch.inference_mode():
            for batch in length_batches([len(s) for s in sequences], self.max_batch_tokens):
                batch = [i for i in batch if positions[i]]
                if not batch:
                    continue
                input_ids, lengths = right_padded([sequences[i] for i in batch], self.device)
                # Classifier heads may attend both ways, so pads are masked here, by length.
                mask = (torch.arange(input_ids.shape[1], device=self.device)[None] < lengths[:, None]).long()
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
                rows = torch.tensor([r for r, i in enumerate(batch) for _ in positions[i]], device=self.device)
                cols = torch.tensor([p for i in batch for p in positions[i]], device=self.device)
                picked = logits[rows, cols]
                good = torch.sigmoid(picked[:, 0]) if self.num_labels == 1 else torch.softmax(picked, dim=-1)[:, 1]
                flat, offset = good.tolist(), 0
                for i in batch:
                    results[i] = flat[offset : offset + len(positions[i])]
                    offset += len(positions[i])
        return results

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
