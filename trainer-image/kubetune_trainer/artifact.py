"""Publishing the trained model: ``<output>/model/`` (+ ``merged/``) with lineage and manifest.

``model/`` holds the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) or, for
full fine-tuning, the weights (``model*.safetensors`` + ``config.json``), the tokenizer, and
``lineage.json``; ``manifest.json`` lists them all with sha256 and is uploaded last. The
artifact digest reported in the termination message is the manifest's digest
(:func:`kubetune.storage.manifests.manifest_digest`), so it names every byte of the folder.

``lineage.json`` records where the model came from: base model URI, revision and digest,
dataset URIs and digest, the resolved spec, final and best metrics, the checkpoint step, the
package versions and image, start and end time, and ``contentDigest`` -- a git-tree-like digest
of the weight and tokenizer files (``path\\0sha256`` lines), stable across re-publishing.

With ``output.mergeAdapter`` the adapter is also merged into the base weights and published
under ``merged/`` (same layout as a base model, with its own manifest).
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.times import now_rfc3339
from kubetune.storage.manifests import MANIFEST_NAME, manifest_digest, write_manifest
from kubetune_trainer.sources import model_digest, tree_digest

if TYPE_CHECKING:
    from kubetune_trainer.train import Trainer

log = logging.getLogger("kubetune_trainer.artifact")

PACKAGES = ("kubetune", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the artifact."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _upload(store, folder: Path, prefix: str) -> None:
    # An older manifest must not vouch for a folder whose files are being replaced.
    store.delete(f"{prefix}/{MANIFEST_NAME}")
    store.delete_prefix(f"{prefix}/")
    store.upload_dir(folder, prefix)


def publish(trainer: Trainer, weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write and upload model/ (and merged/); returns the status ``artifact`` block.

    ``weights``: the unsharded weights of a sharded (FSDP) model, gathered on this process;
    None when ``trainer.model`` holds them itself.
    """
    spec = trainer.spec
    settings = trainer.settings
    store = trainer.store
    model = trainer.model
    folder = trainer.work_dir / "publish" / "model"
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    is_adapter = spec.method.type != "full"
    if is_adapter:
        # The adapter names its base by URI, not by the pod-local download folder.
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = spec.base_model.uri
            cfg.revision = spec.base_model.revision
    model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
    trainer.tokenizer.save_pretrained(folder)
    content = tree_digest(folder)
    lineage = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Lineage",
        "job": {
            "name": settings.job_name,
            "namespace": settings.namespace,
            "uid": settings.job_uid,
            "attempt": settings.attempt,
        },
        "artifactType": "adapter" if is_adapter else "model",
        "contentDigest": content,
        "baseModel": {
            "uri": spec.base_model.uri,
            "revision": spec.base_model.revision,
            "digest": model_digest(spec.base_model.uri, spec.storage, trainer.base_dir),
        },
        "dataset": {
            "train": spec.dataset.train,
            "validation": spec.dataset.validation,
            "digest": trainer.data.digest,
            "report": trainer.data.summary.get("reportUri"),
            "trainExamples": len(trainer.data.train),
            "validationExamples": len(trainer.data.validation),
        },
        "spec": spec.dump(),
        "metrics": dict(trainer.state.metrics),
        "best": {"step": trainer.state.best_step, "evalLoss": trainer.state.best_eval_loss},
        "step": trainer.state.step,
        "publishedStep": getattr(trainer, "published_step", trainer.state.step),
        "totalSteps": trainer.total_steps,
        "stoppedEarly": trainer.state.stopped_early,
        "resumedFromStep": trainer.resumed_from,
        "tokensSeen": trainer.state.tokens_seen,
        "precision": trainer.precision,
        "gradientCheckpointing": trainer.gradient_checkpointing,
        "strategy": trainer.strategy,
        "worldSize": settings.dist.world_size,
        "image": settings.image,
        "packages": package_versions(),
        "startTime": trainer.started_at,
        "endTime": now_rfc3339(),
    }
    (folder / "lineage.json").write_text(
        json.dumps(lineage, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    manifest = write_manifest(
        folder,
        {"kind": lineage["artifactType"], "step": trainer.state.step, "contentDigest": content},
    )
    _upload(store, folder, "model")
    artifact = {
        "uri": store.uri_for("model"),
        "digest": manifest_digest(manifest),
        "lineageUri": store.uri_for("model/lineage.json"),
    }
    if is_adapter and spec.output.merge_adapter:
        merged_dir = trainer.work_dir / "publish" / "merged"
        merged = model.merge_and_unload()
        merged.save_pretrained(merged_dir, safe_serialization=True)
        trainer.tokenizer.save_pretrained(merged_dir)
        write_manifest(
            merged_dir,
            {"kind": "merged", "step": trainer.state.step, "adapterDigest": artifact["digest"]},
        )
        _upload(store, merged_dir, "merged")
        artifact["mergedUri"] = store.uri_for("merged")
    log.info("published %s (%s)", artifact["uri"], artifact["digest"])
    return artifact
