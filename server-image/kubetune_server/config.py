"""Server settings read from the pod environment (docs/contracts.md, "Server pod environment").

One frozen dataclass built once at start-up by :func:`from_env`. Bad values fail fast with a
:class:`ConfigError` that names the variable and, for ``KUBETUNE_SERVER_CONFIG``, the field
path inside it (``KUBETUNE_SERVER_CONFIG.maxBatchSize: Input should be ...``): a pod that cannot
serve must say why in its first log line, not after loading gigabytes of weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from kubetune.api.modeldeployment import ServerSpec

DEFAULT_PORT = 8000


class ConfigError(ValueError):
    """The environment does not describe a server that can start; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know, resolved from the environment."""

    model_uri: str
    adapter_uri: str | None = None
    #: Extra adapters over the same base: served model name -> URI.
    adapters: Mapping[str, str] = field(default_factory=dict)
    model_name: str = "model"
    revision: str = ""
    adapter_digest: str = ""
    server: ServerSpec = field(default_factory=ServerSpec)
    cache_dir: Path = Path("/tmp/kubetune-cache")
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    fault_error_rate: float = 0.0
    fault_latency_ms: float = 0.0
    #: Extra delay per generated token (a slow accelerator): holds the batch slot longer.
    fault_token_latency_ms: float = 0.0
    termination_log: str | None = None
    #: ``KUBETUNE_API_KEY``: when set, /v1/ requests need ``Authorization: Bearer <key>``.
    #: NB: repr=False keeps it out of every log line that prints the settings.
    api_key: str | None = field(default=None, repr=False)

    @property
    def base_name(self) -> str:
        """The name clients use for the bare base model when an adapter is the default.

        Without any adapter the base model *is* the default and goes by ``model_name``. With
        one, vLLM's convention applies: the base keeps a name of its own (here
        ``<model_name>-base``) so that a golden-prompt gate can compare base and adapter.
        """
        return f"{self.model_name}-base" if self.adapter_uri or self.adapters else self.model_name


def _float(env: Mapping[str, str], name: str, lo: float, hi: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={raw!r}: must be between {lo} and {hi}")
    return value


def _uri(env: Mapping[str, str], name: str, value: str) -> str:
    scheme = urlparse(value).scheme
    if scheme not in ("s3", "file"):
        raise ConfigError(f"{name}={value!r}: use s3://bucket/prefix or file:///path")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (default ``os.environ``); raises ConfigError."""
    env = os.environ if env is None else env
    model_uri = env.get("KUBETUNE_MODEL_URI", "").strip()
    if not model_uri:
        raise ConfigError(
            "KUBETUNE_MODEL_URI is required: the base model folder (s3:// or file://)"
        )
    _uri(env, "KUBETUNE_MODEL_URI", model_uri)
    adapter_uri = env.get("KUBETUNE_ADAPTER_URI", "").strip() or None
    if adapter_uri:
        _uri(env, "KUBETUNE_ADAPTER_URI", adapter_uri)

    adapters: dict[str, str] = {}
    raw_adapters = env.get("KUBETUNE_ADAPTERS", "").strip()
    if raw_adapters:
        try:
            parsed = json.loads(raw_adapters)
        except ValueError as exc:
            raise ConfigError(f"KUBETUNE_ADAPTERS: not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ConfigError('KUBETUNE_ADAPTERS: expected a JSON object {"name": "uri", ...}')
        for name, uri in parsed.items():
            if not isinstance(uri, str):
                raise ConfigError(f"KUBETUNE_ADAPTERS.{name}: expected a URI string")
            adapters[str(name)] = _uri(env, f"KUBETUNE_ADAPTERS.{name}", uri)

    raw_server = env.get("KUBETUNE_SERVER_CONFIG", "").strip()
    try:
        server = ServerSpec.model_validate(json.loads(raw_server) if raw_server else {})
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"KUBETUNE_SERVER_CONFIG.{where}: {first['msg']}") from None
        raise ConfigError(f"KUBETUNE_SERVER_CONFIG: not valid JSON: {exc}") from None

    model_name = env.get("KUBETUNE_MODEL_NAME", "").strip() or _default_name(
        adapter_uri or model_uri
    )
    if model_name in adapters:
        raise ConfigError(f"KUBETUNE_ADAPTERS.{model_name}: clashes with KUBETUNE_MODEL_NAME")
    if server.merge_adapter and adapters:
        raise ConfigError(
            "KUBETUNE_SERVER_CONFIG.mergeAdapter: merging serves exactly one adapter; "
            "drop KUBETUNE_ADAPTERS or set mergeAdapter: false"
        )

    port_raw = env.get("KUBETUNE_PORT", "").strip()
    try:
        port = int(port_raw) if port_raw else server.port
    except ValueError:
        raise ConfigError(f"KUBETUNE_PORT={port_raw!r}: not a port number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"KUBETUNE_PORT={port_raw!r}: not a port number")

    api_key = env.get("KUBETUNE_API_KEY")
    if api_key is not None and not api_key.strip():
        # An empty Secret value would otherwise switch authentication off without a word.
        raise ConfigError("KUBETUNE_API_KEY is set but empty: put the key in the Secret")

    return Settings(
        api_key=api_key.strip() if api_key is not None else None,
        model_uri=model_uri,
        adapter_uri=adapter_uri,
        adapters=adapters,
        model_name=model_name,
        revision=env.get("KUBETUNE_REVISION", ""),
        adapter_digest=env.get("KUBETUNE_ADAPTER_DIGEST", ""),
        server=server,
        cache_dir=Path(env.get("KUBETUNE_CACHE_DIR", "").strip() or "/tmp/kubetune-cache"),
        host=env.get("KUBETUNE_HOST", "").strip() or "0.0.0.0",
        port=port,
        fault_error_rate=_float(env, "KUBETUNE_FAULT_ERROR_RATE", 0.0, 1.0),
        fault_latency_ms=_float(env, "KUBETUNE_FAULT_LATENCY_MS", 0.0, 600_000.0),
        fault_token_latency_ms=_float(env, "KUBETUNE_FAULT_TOKEN_LATENCY_MS", 0.0, 60_000.0),
        termination_log=env.get("KUBETUNE_TERMINATION_LOG", "").strip() or None,
    )


def _default_name(uri: str) -> str:
    """The last path segment of a URI (``s3://b/runs/x/model`` -> ``model``)."""
    parts = [p for p in urlparse(uri).path.split("/") if p]
    return parts[-1] if parts else "model"
