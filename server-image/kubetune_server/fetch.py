"""``python -m kubetune_server.fetch``: fill a folder with a revision's verified weights, for vLLM.

The init container of a ``server.engine: vllm`` pod (kubetune.rollout.builders). vLLM cannot
read ``s3://`` through kubetune's storage code nor check a published artifact's manifest, so
this entrypoint runs first, in the kubetune server image, with the very environment the
built-in server gets (docs/contracts.md, "Server pod environment"), and fetches through the
same ``loading.fetch_all``: the same download, the same manifest verification, the same
adapter digest check. It leaves, in ``KUBETUNE_FETCH_DIR`` (an emptyDir shared with vLLM):

    model                 the base model folder (a link into the download cache)
    adapters/<name>       each adapter, under its served name (URL-quoted: names may hold '/')
    fetched.json          what was fetched: URIs, folders, the default adapter's digest

``KUBETUNE_MAX_LORA_RANK`` is the rank vLLM will reserve (--max-lora-rank, or vLLM's default):
an adapter of a larger rank is refused here, with the flag to set, instead of by vLLM at the
first request that names it.

Exit codes as the built-in server's start-up: 2 for a bad environment, 1 for weights that
cannot be fetched or verified; the reason goes to the termination log as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from kubetune.api.conditions import Reason
from kubetune.rollout.builders import VLLM_LORA_RANKS
from kubetune.rollout.builders import adapter_folder as _adapter_folder
from kubetune_server import loading
from kubetune_server.config import ConfigError, from_env

log = logging.getLogger("kubetune_server.fetch")

ADAPTER_DIGEST_MISMATCH = Reason.ADAPTER_DIGEST_MISMATCH


def adapter_folder(root: Path, name: str) -> Path:
    """Where the adapter served as ``name`` lies under ``root``: the path the builder gives vLLM."""
    return Path(_adapter_folder(str(root), name))


def adapter_rank(folder: Path) -> int | None:
    """The largest LoRA rank of a PEFT adapter folder (``r`` and any ``rank_pattern``)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    ranks = [int(r) for r in ranks if isinstance(r, int | float)]
    return max(ranks) if ranks else None


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` (relative when inside the same folder), replacing it atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest = os.path.relpath(target, link.parent)
    except ValueError:
        dest = str(target)
    tmp = link.with_name(f".{link.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(dest, target_is_directory=True)
    os.replace(tmp, link)


def _write_termination(path: str | None, outcome: str, message: str, **extra: str | None) -> None:
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as fh:
        json.dump({"outcome": outcome, "message": message[:3500], **extra}, fh)


def run(env: Mapping[str, str]) -> dict:
    """Fetch, verify and lay out everything; returns what ``fetched.json`` records.

    Raises ConfigError (bad environment) or loading.LoadError (weights that cannot be used).
    """
    settings = from_env(env)
    raw_root = env.get("KUBETUNE_FETCH_DIR", "").strip()
    if not raw_root:
        raise ConfigError("KUBETUNE_FETCH_DIR is required: the folder to fill for vLLM")
    root = Path(raw_root)
    raw_rank = env.get("KUBETUNE_MAX_LORA_RANK", "").strip()
    try:
        max_rank = int(raw_rank) if raw_rank else None
    except ValueError:
        raise ConfigError(f"KUBETUNE_MAX_LORA_RANK={raw_rank!r}: not a whole number") from None

    got = loading.fetch_all(settings, root / ".cache")
    for name, fetched in got.adapters.items():
        rank = adapter_rank(fetched.path)
        if max_rank is not None and rank is not None and rank > max_rank:
            fits = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
            hint = (
                f"set spec.server.vllm.maxLoraRank to {fits}"
                if fits
                else f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}: merge the adapter "
                "(FineTuneJob output.mergeAdapter and server.mergeAdapter)"
            )
            raise loading.LoadError(
                f"{got.uris[name]}: LoRA rank {rank} is above the {max_rank} vLLM reserves "
                f"(--max-lora-rank): {hint}"
            )
    _link(root / "model", got.base.path)
    for name, fetched in got.adapters.items():
        _link(adapter_folder(root, name), fetched.path)
    record = {
        "modelUri": settings.model_uri,
        "model": str(root / "model"),
        "adapters": {
            name: {"uri": got.uris[name], "folder": str(adapter_folder(root, name))}
            for name in got.adapters
        },
        "adapterDigest": got.digest,
    }
    (root / "fetched.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def main(env: Mapping[str, str] | None = None) -> int:
    """Entry point: 0 when the folder is ready, 2 for a bad environment, 1 for unusable weights."""
    env = os.environ if env is None else env
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    termination = env.get("KUBETUNE_TERMINATION_LOG", "").strip() or None
    try:
        record = run(env)
    except ConfigError as exc:
        print(f"kubetune_server.fetch: configuration error: {exc}", file=sys.stderr)
        _write_termination(termination, "config_error", str(exc))
        return 2
    except loading.DigestMismatch as exc:
        # The lineage guarantee: the reason and both digests in the termination message, which
        # the operator reads from the init container's status into the ModelDeployment's (the
        # shape of the built-in server's /readyz answer, kubetune.rollout.builders.readiness_failure).
        log.error("not fetching for vLLM: %s", exc)
        _write_termination(
            termination,
            "digest_mismatch",
            str(exc),
            reason=ADAPTER_DIGEST_MISMATCH,
            foundDigest=exc.found,
            expectedDigest=exc.expected,
        )
        return 1
    except loading.LoadError as exc:
        log.error("cannot fetch: %s", exc)
        _write_termination(termination, "storage_error", str(exc))
        return 1
    log.info("ready for vLLM: %s", json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
