"""Loading a model for a stage: once, and only when a shard actually needs work.

`prmtool run` runs its stages in one process; inside `keep_models_loaded()` a model that one
stage loaded serves the next stage that asks for the same model and settings, instead of being
loaded again (15 s for the embedded model on CPU, minutes for a 7B model on a GPU).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar

from prmtool.core.report import RunStats

# Loaded engines by (engine, model, device, trust_remote_code, options), most recent last.
_loaded: ContextVar[OrderedDict | None] = ContextVar("loaded_engines", default=None)
MODELS_KEPT = 2  # score needs a policy and a reference at once


@contextmanager
def keep_models_loaded():
    """Share loaded models between the stages run inside; close them all at the end."""
    cache: OrderedDict = OrderedDict()
    token = _loaded.set(cache)
    try:
        yield
    finally:
        _loaded.reset(token)
        for engine in cache.values():
            engine.close()


class EngineOnDemand:
    """The engine, loaded on first use: after every input has been validated (bad input fails
    in a second, not after a model load), and never when every shard is already complete."""

    def __init__(
        self,
        name: str,
        model: str | None,
        device: str | None,
        trust_remote_code: bool,
        stats: RunStats,
        *,
        why: str = "",
        **options,
    ) -> None:
        self.name, self.model, self.device, self.trust_remote_code, self.stats = (
            name,
            model,
            device,
            trust_remote_code,
            stats,
        )
        self.options = options  # engine settings, e.g. max_batch_tokens
        self.why = why  # how --engine auto chose the engine: said when the model is first used
        from prmtool.engines import check_device

        check_device(device)  # before any input is read: a bad --device fails at once
        self._engine = None
        self._shared = False

    def get(self):
        if self._engine is None:
            if self.why:
                self.stats.log(self.why)
            cache = _loaded.get()
            key = (self.name, self.model, self.device, self.trust_remote_code, tuple(sorted(self.options.items())))
            if cache is not None and key in cache:
                cache.move_to_end(key)
                self.stats.log(f"using the already loaded model: {self.model or '(embedded SmolLM2-135M-Instruct)'}")
                self._engine, self._shared = cache[key], True
                return self._engine
            if cache is not None:  # the model on another engine: closed, its memory goes to this one
                for other in [key for key in cache if key[1] == self.model and key[0] != self.name]:
                    cache.pop(other).close()
            self._engine = self._load()
            if cache is not None:
                cache[key], self._shared = self._engine, True
                while len(cache) > MODELS_KEPT:
                    cache.popitem(last=False)[1].close()
        return self._engine

    def _load(self):
        from prmtool.engines import load_engine, load_step_classifier

        what = (
            "token-classification PRM" if self.name == "token-classification" else f"model with the {self.name} engine"
        )
        self.stats.log(f"loading {what}: {self.model or '(embedded SmolLM2-135M-Instruct)'}")
        settings = dict(device=self.device, trust_remote_code=self.trust_remote_code, **self.options)
        if self.name == "token-classification":
            return load_step_classifier(self.model, **settings)
        return load_engine(self.name, self.model, **settings)

    def __enter__(self) -> EngineOnDemand:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._engine is not None and not self._shared:  # shared ones close with the recipe
            self._engine.close()
