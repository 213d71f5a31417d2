"""Revisions: what a ModelDeployment serves, resolved and named by a stable hash.

A revision is everything that changes the serving pods (DESIGN.md): the resolved base model and
adapter (with the adapter's digest, so re-publishing a FineTuneJob artifact under the same URI is
still a new revision), the model name clients send, the server settings and image, the
per-pod resources and the storage settings the pods read weights with. Replica count, traffic
and rollout settings are deliberately *not* part of it: scaling or retuning the canary strategy
must never start a new canary.

Resolution is pure: the caller (operator or local runtime) passes the referenced FineTuneJob
object as it read it (or None when it does not exist), and gets back either a ``Revision`` or a
``ModelProblem`` that says what is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.conditions import Reason
from kubetune.api.defaults import PodDefaults, effective_for_pod
from kubetune.api.finetunejob import LoraSpec
from kubetune.api.modeldeployment import REVISION_HASH_LENGTH, ModelDeploymentSpec, VllmSpec

# Ten hex digits (40 bits): collisions between the handful of revisions one ModelDeployment
# ever has are out of the question. The CRD limits metadata.name so that `<mdep>-<hash>` fits
# the 63 characters of a Service name (kubetune.api.modeldeployment.NAME_MAX_LENGTH).
HASH_LENGTH = REVISION_HASH_LENGTH


@dataclass(frozen=True)
class Revision:
    """One resolved, servable revision: the hash plus what the builders need to know about it."""

    name: str
    model_uri: str
    adapter_uri: str | None
    adapter_digest: str | None
    fine_tune_job: str | None
    model_name: str
    image: str
    # Serving engine (builtin, vllm) and, when known, the LoRA rank of the adapter (the
    # FineTuneJob that trained it says it): vLLM reserves room for the largest rank at start.
    engine: str = "builtin"
    adapter_rank: int | None = None


@dataclass(frozen=True)
class ModelProblem:
    """Why there is nothing to deploy yet (or any more): a condition reason and a message."""

    reason: str
    message: str
    # Terminal problems (the FineTuneJob failed) will not fix themselves; waiting ones will.
    terminal: bool = False


def server_image(spec: ModelDeploymentSpec, defaults: PodDefaults | None = None) -> str:
    """spec.server.image, else the cluster's default server image (kubetune.api.defaults).

    With engine vllm this is the image of the fetch init container; the engine container runs
    ``serving_image``.
    """
    return spec.server.image or (defaults or PodDefaults()).server_image


def serving_image(spec: ModelDeploymentSpec, defaults: PodDefaults | None = None) -> str:
    """The image of the serving container: kubetune's server, or vLLM's for engine vllm."""
    if spec.server.engine == "vllm":
        return (spec.server.vllm or VllmSpec()).image
    return server_image(spec, defaults)


def _serving_fingerprint(
    spec: ModelDeploymentSpec, resolved: dict[str, Any], defaults: PodDefaults | None = None
) -> dict[str, Any]:
    """The part of the spec that changes serving pods, in wire form (stable key order below).

    The engine and its settings count (a switch to vLLM, or a new vLLM image, is a new
    revision), but a builtin server's fingerprint leaves them out: it is then exactly what it
    was before engines existed, so upgrading the operator starts no canary for an unchanged
    ModelDeployment.
    """
    # The image as resolved: a spec that names the built-in default and one that leaves it to
    # the cluster hash alike (so objects stored with the old CRD default keep their revision),
    # and a new cluster default image rolls out as a canary.
    server = {**spec.server.dump(), "image": server_image(spec, defaults)}
    if spec.server.engine == "builtin":
        server.pop("engine", None)
        server.pop("vllm", None)
    elif spec.server.vllm is None:
        # Omitted and spelled-out defaults are the same vLLM settings, so the same revision.
        server["vllm"] = VllmSpec().dump()
    out = {
        "model": resolved,
        "server": server,
        "resources": spec.resources.dump(),
        "storage": spec.storage.dump(),
    }
    if spec.service_account_name:
        # One account, wherever it is written: moving storage.serviceAccountName to
        # serviceAccountName is no new revision.
        out["storage"]["serviceAccountName"] = spec.service_account_name
    # Pod-level settings join the fingerprint only when set, so that the revisions of
    # ModelDeployments written before these fields existed keep their names (no new canary).
    for key, value in (
        ("podTemplate", spec.pod_template.dump() if spec.pod_template else None),
        ("imagePullSecrets", [s.dump() for s in spec.image_pull_secrets or []]),
        (
            "clusterDefaults",
            effective_for_pod(
                defaults, gpu=spec.resources.gpus > 0, spec_pull_secrets=bool(spec.image_pull_secrets)
            ),
        ),
    ):
        if value:
            out[key] = value
    return out


def revision_hash(
    spec: ModelDeploymentSpec, resolved: dict[str, Any], defaults: PodDefaults | None = None
) -> str:
    """Stable hash of the serving-relevant spec and the resolved model.

    Canonical JSON (sorted keys, no whitespace) so that the same spec always yields the same
    name, across processes, restarts and Python versions.
    """
    fingerprint = _serving_fingerprint(spec, resolved, defaults)
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def resolve(
    spec: ModelDeploymentSpec,
    mdep_name: str,
    finetunejob: dict[str, Any] | None = None,
    defaults: PodDefaults | None = None,
) -> Revision | ModelProblem:
    """Resolve the spec's model source into a Revision, or say why it cannot be resolved yet.

    ``finetunejob`` is the referenced FineTuneJob object (a dict as read from the API or from
    the local runtime's store) when ``spec.model.fineTuneJobRef`` is set; None means it does
    not exist. Its ``status.artifact`` is only trusted once ``status.phase`` is Succeeded.
    ``defaults`` are the cluster's pod defaults (image, pull secrets, GPU placement): the part
    that reaches the pods is part of the revision.
    """
    source = spec.model
    model_name = source.name or mdep_name
    if source.fine_tune_job_ref is not None:
        ref = source.fine_tune_job_ref.name
        if finetunejob is None:
            return ModelProblem(Reason.MODEL_NOT_FOUND, f"FineTuneJob {ref!r} does not exist (yet)")
        status = finetunejob.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase == "Failed":
            return ModelProblem(
                Reason.MODEL_FAILED,
                f"FineTuneJob {ref!r} failed: {status.get('message') or 'see its conditions'}",
                terminal=True,
            )
        if phase != "Succeeded":
            return ModelProblem(
                Reason.WAITING_FOR_MODEL,
                f"waiting for FineTuneJob {ref!r} to succeed (it is {phase})",
            )
        artifact = status.get("artifact") or {}
        if not artifact.get("uri"):
            return ModelProblem(
                Reason.WAITING_FOR_MODEL,
                f"FineTuneJob {ref!r} succeeded but has no status.artifact.uri yet",
            )
        base = ((finetunejob.get("spec") or {}).get("baseModel") or {}).get("uri")
        if not base:
            return ModelProblem(
                Reason.MODEL_NOT_FOUND, f"FineTuneJob {ref!r} has no spec.baseModel.uri"
            )
        merged = artifact.get("mergedUri")
        if merged and spec.server.merge_adapter:
            # The job already published merged weights: serve them directly, no adapter at all.
            model_uri, adapter_uri = merged, None
        else:
            model_uri, adapter_uri = base, artifact["uri"]
        digest = artifact.get("digest")
        ftj_name: str | None = ref
        rank = _lora_rank(finetunejob) if adapter_uri else None
    else:
        if source.base_model is None:
            return ModelProblem(
                Reason.MODEL_NOT_FOUND,
                "spec.model: set model.fineTuneJobRef or model.baseModel",
                terminal=True,
            )
        model_uri = source.base_model.uri
        adapter_uri = source.adapter.uri if source.adapter else None
        # An explicit adapter's "revision" label is the closest thing to a digest we have.
        digest = source.adapter.revision if source.adapter else None
        ftj_name = None
        rank = None
    resolved = {
        "modelUri": model_uri,
        "adapterUri": adapter_uri,
        "adapterDigest": digest,
        "modelName": model_name,
        "modelRevision": source.base_model.revision if source.base_model else None,
    }
    return Revision(
        name=revision_hash(spec, resolved, defaults),
        model_uri=model_uri,
        adapter_uri=adapter_uri,
        adapter_digest=digest,
        fine_tune_job=ftj_name,
        model_name=model_name,
        image=serving_image(spec, defaults),
        engine=spec.server.engine,
        adapter_rank=rank,
    )


def _lora_rank(finetunejob: dict[str, Any]) -> int | None:
    """The LoRA rank a FineTuneJob trained with (spec.method.lora.r), None for full fine-tuning."""
    method = (finetunejob.get("spec") or {}).get("method") or {}
    if method.get("type", "lora") not in ("lora", "qlora"):
        return None
    rank = (method.get("lora") or {}).get("r", LoraSpec().r)
    return int(rank) if isinstance(rank, int | float) else None


def resource_name(mdep_name: str, revision: str) -> str:
    """Name of a revision's Deployment, Service and PodDisruptionBudget: ``<mdep>-<revision>``."""
    return f"{mdep_name}-{revision}"


def revision_status(rev: Revision) -> dict[str, Any]:
    """The revision as status.stable / status.canary records it (api.modeldeployment.RevisionStatus)."""
    out: dict[str, Any] = {
        "name": rev.name,
        "modelUri": rev.model_uri,
        "modelName": rev.model_name,
        "image": rev.image,
        "engine": rev.engine,
    }
    if rev.adapter_uri:
        out["adapterUri"] = rev.adapter_uri
    if rev.adapter_digest:
        out["adapterDigest"] = rev.adapter_digest
    if rev.fine_tune_job:
        out["fineTuneJob"] = rev.fine_tune_job
    if rev.adapter_rank is not None:
        out["adapterRank"] = rev.adapter_rank
    return out


def revision_from_status(data: Mapping[str, Any], mdep_name: str) -> Revision:
    """Rebuild a Revision from status.stable / status.canary (to recreate a lost Deployment)."""
    return Revision(
        name=data["name"],
        model_uri=data.get("modelUri") or "",
        adapter_uri=data.get("adapterUri"),
        adapter_digest=data.get("adapterDigest"),
        fine_tune_job=data.get("fineTuneJob"),
        model_name=data.get("modelName") or mdep_name,
        image=data.get("image") or "",
        engine=data.get("engine") or "builtin",
        adapter_rank=data.get("adapterRank"),
    )
