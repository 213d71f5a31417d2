"""The trainer's configuration, read once from the environment the operator sets.

docs/contracts.md, "Trainer pod environment": ``KUBETUNE_SPEC`` carries the FineTuneJob spec with
every default filled; it is parsed with the same pydantic model the operator uses, so a spec the
operator accepted is a spec the trainer understands. torchrun's variables (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``) select distributed training.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune_trainer.errors import ConfigError

DEFAULT_TERMINATION_LOG = "/dev/termination-log"


@dataclass(frozen=True)
class Distributed:
    """torchrun's view of this process (single process when WORLD_SIZE is unset)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, reports progress and publishes the artifact."""
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Distributed:
        """Read WORLD_SIZE / RANK / LOCAL_RANK (set by torchrun from NNODES, NODE_RANK, ...)."""
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
            local = int(environ.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {exc}") from exc
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ConfigError(
                f"inconsistent torchrun environment: WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local}"
            )
        return cls(world, rank, local)


@dataclass(frozen=True)
class Settings:
    """Everything the trainer needs to know about its job and its pod."""

    spec: FineTuneJobSpec
    job_name: str = "local"
    namespace: str = "default"
    job_uid: str = ""
    attempt: int = 0
    report: str = "none"
    termination_log: str = DEFAULT_TERMINATION_LOG
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "kubetune")
    image: str | None = None
    dist: Distributed = field(default_factory=Distributed)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse the environment; a missing or invalid KUBETUNE_SPEC is a ConfigError."""
        env = os.environ if environ is None else environ
        raw = env.get("KUBETUNE_SPEC")
        if not raw:
            raise ConfigError("KUBETUNE_SPEC is not set: it must hold the FineTuneJob spec as JSON")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"KUBETUNE_SPEC is not valid JSON: {exc}") from exc
        try:
            spec = FineTuneJobSpec.model_validate(data)
        except Exception as exc:  # pydantic.ValidationError: keep its field paths in the message
            raise ConfigError(f"KUBETUNE_SPEC is not a valid FineTuneJob spec: {exc}") from exc
        try:
            attempt = int(env.get("KUBETUNE_ATTEMPT", "0"))
        except ValueError as exc:
            raise ConfigError(f"KUBETUNE_ATTEMPT must be an integer: {exc}") from exc
        report = env.get("KUBETUNE_REPORT", "none")
        if report not in ("k8s", "none") and not report.startswith("file:///"):
            raise ConfigError(
                f"KUBETUNE_REPORT={report!r}: expected k8s, none or file:///path.json"
            )
        return cls(
            spec=spec,
            job_name=env.get("KUBETUNE_JOB_NAME", "local"),
            namespace=env.get("KUBETUNE_NAMESPACE", "default"),
            job_uid=env.get("KUBETUNE_JOB_UID", ""),
            attempt=attempt,
            report=report,
            termination_log=env.get("KUBETUNE_TERMINATION_LOG", DEFAULT_TERMINATION_LOG),
            work_dir=Path(env.get("KUBETUNE_WORK_DIR") or Path(tempfile.gettempdir()) / "kubetune"),
            image=env.get("KUBETUNE_IMAGE") or spec.image,
            dist=Distributed.from_environ(env),
        )
