"""Loading a model for a stage: once, and only when a shard actually needs work."""

from __future__ import annotations

from prmtool.report import RunStats


class EngineOnDemand:
    """The engine, loaded on first use: after every input has been validated (bad input fails
    in a second, not after a model load), and never when every shard is already complete."""

    def __init__(self, name: str, model: str | None, device: str | None, trust_remote_code: bool, stats: RunStats,
                 **options) -> None:
        self.name, self.model, self.device, self.trust_remote_code, self.stats = name, model, device, trust_remote_code, stats
        self.options = options  # engine settings, e.g. max_batch_tokens
        self._engine = None

    def get(self):
        if self._engine is None:
            from prmtool.engines import load_engine, load_step_classifier

            what = "token-classification PRM" if self.name == "token-classification" else f"model with the {self.name} engine"
            self.stats.log(f"loading {what}: {self.model or '(embedded SmolLM2-135M-Instruct)'}")
            settings = dict(device=self.device, trust_remote_code=self.trust_remote_code, **self.options)
            if self.name == "token-classification":
                self._engine = load_step_classifier(self.model, **settings)
            else:
                self._engine = load_engine(self.name, self.model, **settings)
        return self._engine

    def __enter__(self) -> EngineOnDemand:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._engine is not None:
            self._engine.close()
