"""Loading a model for a stage: once, and only when a shard actually needs work."""

from __future__ import annotations

from prmtool.report import RunStats


class EngineOnDemand:
    """The engine, loaded on first use: after every input has been validated (bad input fails
    in a second, not after a model load), and never when every shard is already complete."""

    def __init__(self, name: str, model: str | None, device: str | None, trust_remote_code: bool, stats: RunStats) -> None:
        self.name, self.model, self.device, self.trust_remote_code, self.stats = name, model, device, trust_remote_code, stats
        self._engine = None

    def get(self):
        if self._engine is None:
            from prmtool.engines import load_engine

            self.stats.log(f"loading model {self.model or '(embedded SmolLM2-135M-Instruct)'} with the {self.name} engine")
            self._engine = load_engine(self.name, self.model, device=self.device, trust_remote_code=self.trust_remote_code)
        return self._engine

    def __enter__(self) -> EngineOnDemand:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._engine is not None:
            self._engine.close()
