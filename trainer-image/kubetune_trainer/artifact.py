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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.api.times import now_rfc3339
from kubetune.storage import Store
from kubetune.storage.manifests import MANIFEST_NAME, manifest_digest, write_manifest
from kubetune_trainer.sources import model_digest, tree_digest

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


@dataclass(frozen=True)
class Publication:
    """What publishing needs of a finished run (``Trainer.publication`` builds it)."""

    spec: FineTuneJobSpec
    store: Store
    #: The trained model (a PEFT model for an adapter method) and its tokenizer.
    model: Any
    tokenizer: Any
    #: Where model/ (and merged/) are staged; the downloaded base model (its digest).
    work_dir: Path
    base_dir: Path
    #: lineage.json's ``job``: name, namespace, uid, attempt.
    job: dict[str, Any]
    image: str | None
    world_size: int
    #: The validated data: digest, data report URI, example counts.
    data_digest: str
    data_report_uri: str | None
    train_examples: int
    validation_examples: int
    #: The run: last step, the step whose weights are published, metrics, best eval.
    step: int
    published_step: int
    total_steps: int
    metrics: dict[str, Any]
    best_step: int | None
    best_eval_loss: float | None
    stopped_early: bool
    resumed_from: int | None
    tokens_seen: int
    precision: str
    gradient_checkpointing: bool
    strategy: str
    started_at: str


def publish(run: Publication, weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write and upload model/ (and merged/); returns the status ``artifact`` block.

    ``weights``: the unsharded weights of a sharded (FSDP) model, gathered on this process;
    None when ``run.model`` holds them itself.
    """
    spec, store, model = run.spec, run.store, run.model
    folder = run.work_dir / "publish" / "model"
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    is_adapter = spec.method.type != "full"
    if is_adapter:
        # The adapter names its base by URI, not by the pod-local download folder.
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = spec.base_model.uri
            cfg.revision = spec.base_model.revision
    model.save_pretrained(folder, safe_serialization=True, state_dict=weights)
    run.tokenizer.save_pretrained(folder)
    content = tree_digest(folder)
    lineage = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "Lineage",
        "job": dict(run.job),
        "artifactType": "adapter" if is_adapter else "model",
        "contentDigest": content,
        "baseModel": {
            "uri": spec.base_model.uri,
            "revision": spec.base_model.revision,
            "digest": model_digest(spec.base_model.uri, spec.storage, run.base_dir),
        },
        "dataset": {
            "train": spec.dataset.train,
            "validation": spec.dataset.validation,
            "digest": run.data_digest,
            "report": run.data_report_uri,
            "trainExamples": run.train_examples,
            "validationExamples": run.validation_examples,
        },
        "spec": spec.dump(),
        "metrics": dict(run.metrics),
        "best": {"step": run.best_step, "evalLoss": run.best_eval_loss},
        "step": run.step,
        "publishedStep": run.published_step,
        "totalSteps": run.total_steps,
        "stoppedEarly": run.stopped_early,
        "resumedFromStep": run.resumed_from,
        "tokensSeen": run.tokens_seen,
        "precision": run.precision,
        "gradientCheckpointing": run.gradient_checkpointing,
        "strategy": run.strategy,
        "worldSize": run.world_size,
        "image": run.image,
        "packages": package_versions(),
        "startTime": run.started_at,
        "endTime": now_rfc3339(),
    }
    (folder / "lineage.json").write_text(
        json.dumps(lineage, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    manifest = write_manifest(
        folder,
        {"kind": lineage["artifactType"], "step": run.step, "contentDigest": content},
    )
    _upload(store, folder, "model")
    artifact = {
        "uri": store.uri_for("model"),
        "digest": manifest_digest(manifest),
        "lineageUri": store.uri_for("model/lineage.json"),
    }
    if is_adapter and spec.output.merge_adapter:
        merged_dir = run.work_dir / "publish" / "merged"
        merged = model.merge_and_unload()
        merged.save_pretrained(merged_dir, safe_serialization=True)
        run.tokenizer.save_pretrained(merged_dir)
        write_manifest(
            merged_dir,
            {"kind": "merged", "step": run.step, "adapterDigest": artifact["digest"]},
        )
        _upload(store, merged_dir, "merged")
        artifact["mergedUri"] = store.uri_for("merged")
    log.info("published %s (%s)", artifact["uri"], artifact["digest"])
    return artifact
