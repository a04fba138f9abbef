"""``train.engine: local`` — one process, no process group; every estimator."""

from __future__ import annotations

from plumage_ds.config import ConfigError, JobConfig
from plumage_ds.optim import build_optimizer

from .base import Engine


class LocalEngine(Engine):
    """The model and the factory's optimizer in this process."""

    name = "local"
    needs_process_group = False

    @classmethod
    def check(cls, job: JobConfig, world_size: int) -> None:
        if world_size != 1:
            raise ConfigError("train.engine", "local", f"runs one process, but the launcher started {world_size}")

    def setup(self, model) -> None:
        self.model = self.module = model.to(self.device)
        self.optimizer, self.rows = build_optimizer(model, self.cfg)
        self.scheduler = self.make_scheduler(self.optimizer)
