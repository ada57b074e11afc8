"""Model engines: the only part of prmtool that touches torch, transformers or vLLM.

    from prmtool.engines import load_engine, SamplingRequest
    with load_engine("hf") as engine:            # the embedded SmolLM2-135M-Instruct
        prompt = engine.chat_prompt_ids("What is 2 + 3?")
        [[completion]] = engine.sample([SamplingRequest(prompt, max_tokens=64, seed=0)])

Importing this package is cheap; torch and transformers load when an engine is built.
"""

from __future__ import annotations

import importlib
import re

from prmtool.engines.base import (
    Cancel,
    Completion,
    Engine,
    EngineError,
    SamplingRequest,
    ScoringRequest,
)
from prmtool.engines.model_files import default_model_path

__all__ = [
    "Cancel",
    "Completion",
    "Engine",
    "EngineError",
    "SamplingRequest",
    "ScoringRequest",
    "check_device",
    "check_loadable",
    "default_model_path",
    "load_engine",
    "load_step_classifier",
]

# name (--engine) -> the module whose `load(model, *, device, dtype, trust_remote_code, **options)`
# builds the engine. Adding an engine is one module plus one line here.
ENGINES = {
    "hf": "prmtool.engines.hf",
    "vllm": "prmtool.engines.vllm",
}
ENGINE_NAMES = tuple(ENGINES)


def load_engine(
    name: str = "hf",
    model: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    **options,
) -> Engine:
    """Load `model` (a local transformers folder or .gguf file; None = the embedded default).

    name: "hf" (transformers, CPU or CUDA) or "vllm" (CUDA, needs the vllm extra).
    dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32.
    options: engine settings, see HFEngine / VLLMEngine.
    """
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: expected one of {', '.join(ENGINE_NAMES)}")
    module = importlib.import_module(ENGINES[name])
    return module.load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **options)


def check_device(device: str | None) -> None:
    """Refuse a --device this machine cannot run on, before any input is read or model loaded."""
    if device in (None, "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise EngineError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise EngineError(
            f"--device {device}: this machine has no CUDA device that torch {torch.__version__} can use; use "
            f"--device cpu"
        )
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise EngineError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )


def check_loadable(name: str, model: str | None, *, device: str | None, trust_remote_code: bool = False) -> None:
    """Everything about loading `model` on engine `name` that can be checked without loading it:
    the engine is installed, the device is there, the model's files exist and its config loads.
    `prmtool run` checks every stage's model so before it touches any record."""
    from prmtool.engines.model_files import locate_model

    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: expected one of {', '.join(ENGINE_NAMES)}")
    check_device(device)
    if name == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise EngineError(
                "--engine vllm: vLLM is not installed (pip install -e '.[vllm]' in the prmtool repository)"
            )
        if device == "cpu":
            raise EngineError("--engine vllm runs on CUDA only, not with --device cpu")
        import torch

        if device is None and not torch.cuda.is_available():
            raise EngineError("--engine vllm runs on CUDA only, and this machine has no CUDA device that torch can use")
    location = locate_model(model)  # a missing folder, or one without config.json
    if location.gguf_file is not None:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(location.folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as error:  # an unknown model type, remote code not allowed, broken JSON: one line
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise EngineError(f"model {location.folder}: its config does not load: {first_line}") from None


def load_step_classifier(
    model: str, *, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False, **options
):
    """A token-classification PRM (as TRL's PRMTrainer trains) from a local folder."""
    from prmtool.engines.hf.classifier import StepClassifier

    return StepClassifier.from_pretrained(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **options
    )
