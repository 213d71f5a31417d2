"""Fetch model folders (s3:// or file://) and load the base model, its tokenizer and adapters.

Fetching: an ``s3://`` folder is downloaded once into ``KUBETUNE_CACHE_DIR/<sha of URI>``. The
download lands in a temporary sibling folder, is verified against its ``manifest.json`` (when
the folder has one: every artifact the trainer publishes does) and only then renamed into
place, so a pod killed mid-download never leaves a folder a restart would trust. A ``file://``
folder is used where it lies (copying it would only cost time and disk); its manifest is
verified just the same. A folder without a manifest (a hand-made base model) is accepted with a
log line: there is nothing to verify it against.

Loading: transformers + peft. Several adapters can sit over one base (``PeftModel`` with named
adapters, chosen per batch); with ``mergeAdapter`` the single adapter is folded into the
weights (faster, but the bare base is then no longer available).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubetune.api.conditions import Reason
from kubetune.storage import open_store
from kubetune.storage.manifests import ManifestError, manifest_digest, verify_dir
from kubetune.storage.stores import MANIFEST_NAME
from kubetune_server.config import Settings

log = logging.getLogger("kubetune_server.loading")

# Written into a cache folder after it verified: its presence means "complete and checked".
_COMPLETE = ".kubetune-complete"

# Used when a tokenizer has no chat template of its own: ChatML, the most common format.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class LoadError(RuntimeError):
    """A model or adapter folder cannot be fetched, verified or loaded (names the URI)."""


#: The /readyz ``reason`` of a pod whose adapter is not the one its revision was built for.
DIGEST_MISMATCH = Reason.ADAPTER_DIGEST_MISMATCH


class DigestMismatch(LoadError):
    """The adapter under the URI is not the artifact the revision was built for (lineage).

    The server does not serve it and does not exit either: the pod stays unready, saying
    which digest it found on /readyz, where both runtimes read it into the ModelDeployment's
    status (a crash loop would only re-download the same wrong artifact).
    """

    def __init__(self, uri: str, expected: str, found: str | None):
        self.expected = expected
        self.found = found
        super().__init__(
            f"{uri}: adapter digest {found or 'unknown (the folder has no manifest.json)'} "
            f"is not {expected}, the digest this revision was built for; not serving it "
            "(republish the artifact, or let the ModelDeployment resolve the new one as a new revision)"
        )


def expected_digest(settings: Settings) -> str | None:
    """The manifest digest the adapter must have, when the revision pins one.

    Only a ``sha256:`` value is a manifest digest (a FineTuneJob artifact's, or an explicit
    ``adapter.revision`` written as one); any other revision label is informational.
    """
    digest = settings.adapter_digest.strip()
    return digest if digest.startswith("sha256:") else None


@dataclass(frozen=True)
class Fetched:
    """A local copy of a model folder and its manifest digest (None without a manifest)."""

    path: Path
    digest: str | None


def fetch(uri: str, cache_dir: Path) -> Fetched:
    """A verified local folder for ``uri`` (downloaded into ``cache_dir`` when remote)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(parsed.path)
        if not path.is_dir():
            raise LoadError(f"{uri}: not a folder")
        return Fetched(path, _verify(path, uri))
    if parsed.scheme != "s3":
        raise LoadError(f"{uri}: unsupported scheme; use s3:// or file://")
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if (target / _COMPLETE).is_file():
        log.info("using cached %s at %s", uri, target)
        return Fetched(target, _verify(target, uri))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}."))
    try:
        log.info("downloading %s into %s", uri, target)
        try:
            open_store(uri).download_dir("", tmp)
        except Exception as exc:  # StorageError and botocore errors alike
            raise LoadError(f"{uri}: download failed: {exc}") from exc
        digest = _verify(tmp, uri)
        (tmp / _COMPLETE).write_text(digest or "no manifest\n")
        if target.exists():
            # A previous, unverified attempt (no marker): replace it.
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Fetched(target, digest)


def _verify(path: Path, uri: str) -> str | None:
    """Verify the folder's manifest when it has one; returns its digest."""
    if not (path / MANIFEST_NAME).is_file():
        log.info("%s has no %s: nothing to verify", uri, MANIFEST_NAME)
        return None
    try:
        manifest = verify_dir(path)
    except ManifestError as exc:
        raise LoadError(f"{uri}: {exc}") from exc
    return manifest_digest(manifest)


@dataclass
class Loaded:
    """The loaded model, ready for the engine."""

    model: Any
    tokenizer: Any
    device: str
    #: served model name -> peft adapter name (None = the bare base model).
    names: dict[str, str | None] = field(default_factory=dict)
    #: manifest digest of the default adapter (KUBETUNE_ADAPTER_DIGEST wins), for kubetune_server_info.
    digest: str = ""
    max_position_embeddings: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


@dataclass(frozen=True)
class FetchedModel:
    """Every folder of ``settings``, fetched and verified, and the default adapter's digest."""

    base: Fetched
    #: served name -> adapter URI (the default adapter goes by KUBETUNE_MODEL_NAME).
    uris: dict[str, str]
    #: served name -> its verified local folder.
    adapters: dict[str, Fetched]
    #: manifest digest of the default adapter (KUBETUNE_ADAPTER_DIGEST wins when set).
    digest: str


def fetch_all(settings: Settings, cache_dir: Path | None = None) -> FetchedModel:
    """Fetch and verify the base model and every adapter of ``settings``.

    One path for both engines: the built-in server calls it before loading, and vLLM's fetch
    init container (``kubetune_server.fetch``) calls it to fill the folder vLLM serves from.
    """
    cache = settings.cache_dir if cache_dir is None else cache_dir
    base = fetch(settings.model_uri, cache)
    uris: dict[str, str] = {}
    if settings.adapter_uri:
        uris[settings.model_name] = settings.adapter_uri
    uris.update(settings.adapters)
    fetched = {name: fetch(uri, cache) for name, uri in uris.items()}
    expected = expected_digest(settings)
    if expected and settings.adapter_uri:
        # The lineage guarantee, for both engines: an adapter that is not the artifact the
        # revision was built for is never served.
        found = fetched[settings.model_name].digest
        if found != expected:
            raise DigestMismatch(settings.adapter_uri, expected, found)
    digest = settings.adapter_digest
    if settings.model_name in fetched:
        found = fetched[settings.model_name].digest
        if not settings.adapter_digest:
            digest = found or ""
        elif found and found != settings.adapter_digest:
            # Not a manifest digest (a plain revision label, see expected_digest; a sha256:
            # one was checked above): the artifact is served.
            log.info(
                "%s: manifest digest %s (KUBETUNE_ADAPTER_DIGEST %s is a label)",
                uris[settings.model_name],
                found,
                settings.adapter_digest,
            )
    return FetchedModel(base=base, uris=uris, adapters=fetched, digest=digest)


def load(settings: Settings) -> Loaded:
    """Fetch and load the base model, its tokenizer and every adapter of ``settings``."""
    # Fetch (and verify) everything before importing torch: a wrong URI or a corrupt artifact
    # is reported in a second, not after the multi-second framework import.
    got = fetch_all(settings)
    base, adapters, fetched = got.base, got.uris, got.adapters

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path)
        model = AutoModelForCausalLM.from_pretrained(
            base.path, dtype=_dtype(settings.server.dtype, device)
        )
    except Exception as exc:
        raise LoadError(f"{settings.model_uri}: cannot load the model: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        log.info("tokenizer has no chat template: using ChatML")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE

    names: dict[str, str | None] = {}
    digest = got.digest
    if adapters:
        from peft import PeftModel

        for i, (name, uri) in enumerate(adapters.items()):
            path = fetched[name].path
            try:
                if i == 0:
                    model = PeftModel.from_pretrained(model, path, adapter_name=name)
                else:
                    model.load_adapter(path, adapter_name=name)
            except Exception as exc:
                raise LoadError(f"{uri}: cannot load the adapter: {exc}") from exc
            names[name] = name
        if settings.server.merge_adapter:
            # NB: merging folds the one adapter into the base weights: no LoRA matmuls per
            # token, but the bare base is gone, so it is not served under a name of its own.
            model = model.merge_and_unload()
            names = {settings.model_name: None}
        else:
            names[settings.base_name] = None
    else:
        names[settings.model_name] = None
    model.to(device)
    model.eval()

    eos: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for tok in source if isinstance(source, list | tuple) else [source]:
            if tok is not None and tok not in eos:
                eos.append(int(tok))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        device=device,
        names=names,
        digest=digest,
        max_position_embeddings=getattr(model.config, "max_position_embeddings", None),
        eos_token_ids=tuple(eos),
        pad_token_id=int(pad),
    )
