"""Cluster-wide defaults of the pods kubetune builds, set by the platform team through the chart.

The chart's ``defaults`` values reach the operator as one environment variable,
``KUBETUNE_POD_DEFAULTS`` (JSON of :class:`PodDefaults`), read once at start-up: a values
change rolls the operator's pods, so there is no ConfigMap to watch and no window in which two
replicas disagree. The builders take the parsed object; the local runtime uses the built-in
defaults (it runs no images).

Precedence, for each pod (docs/operations.md, "Cluster defaults"): the object's own spec wins,
then the cluster default, then the built-in one.

- images: ``spec.image`` / ``spec.server.image``, else ``trainerImage`` / ``serverImage``,
  else ``ghcr.io/kubetune/{trainer,server}:<version>``;
- ``imagePullSecrets``: the spec's list, else the cluster's (a list is replaced, not merged);
- GPU pods only (``resources.gpus > 0``): ``gpuNodeSelector`` fills the keys that neither
  ``resources`` nor ``podTemplate.nodeSelector`` set (a map is merged key by key);
  ``gpuTolerations`` are added to the spec's (a toleration only widens where a pod may run).

Objects stored before the image defaults moved out of the CRD carry the old CRD default in
``spec.image`` (the API server wrote it in at creation): those keep their image, as a spec
value does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError

from kubetune.api.common import LabelValue, Model, Toleration
from kubetune.api.finetunejob import DEFAULT_TRAINER_IMAGE
from kubetune.api.modeldeployment import DEFAULT_SERVER_IMAGE
from kubetune.api.pods import LocalObjectReference

ENV_VAR = "KUBETUNE_POD_DEFAULTS"


class PodDefaults(Model):
    """What the chart's ``defaults`` values set (every field optional)."""

    trainer_image: str = Field(
        default=DEFAULT_TRAINER_IMAGE,
        min_length=1,
        description="Trainer image of FineTuneJobs that set no spec.image.",
    )
    server_image: str = Field(
        default=DEFAULT_SERVER_IMAGE,
        min_length=1,
        description="Server image of ModelDeployments that set no spec.server.image.",
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Pull secrets of pods whose spec lists none."
    )
    gpu_node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Node labels every GPU pod must match (spec keys win)."
    )
    gpu_tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations added to every GPU pod."
    )


class DefaultsError(ValueError):
    """KUBETUNE_POD_DEFAULTS is not valid (says which field)."""


def load_defaults(environ: Mapping[str, str]) -> PodDefaults:
    """The defaults in ``environ[KUBETUNE_POD_DEFAULTS]`` (built-in ones when unset or empty)."""
    raw = (environ.get(ENV_VAR) or "").strip()
    if not raw:
        return PodDefaults()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise DefaultsError(f"{ENV_VAR} is not valid JSON: {exc}") from exc
    # The chart renders "" for an image left to the chart's version; treat it as unset.
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if v not in ("", None)}
    try:
        return PodDefaults.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in err["loc"]) + ": " + err["msg"] for err in exc.errors()[:5]
        )
        raise DefaultsError(f"{ENV_VAR}: {problems}") from exc


def apply_cluster_defaults(
    template: dict[str, Any], defaults: PodDefaults | None, *, gpu: bool
) -> dict[str, Any]:
    """The pod template with the cluster defaults filled where the spec left them unset.

    Runs after :func:`kubetune.api.pods.merge_pod_template`, so the spec (resources and
    podTemplate alike) always wins over a cluster default and never conflicts with one.
    """
    if defaults is None:
        return template
    out = copy.deepcopy(template)
    pod = out["spec"]
    if defaults.image_pull_secrets and not pod.get("imagePullSecrets"):
        pod["imagePullSecrets"] = [s.dump() for s in defaults.image_pull_secrets]
    if gpu:
        if defaults.gpu_node_selector:
            pod["nodeSelector"] = {**defaults.gpu_node_selector, **(pod.get("nodeSelector") or {})}
        tolerations = pod.get("tolerations") or []
        for toleration in defaults.gpu_tolerations:
            item = toleration.dump()
            if item not in tolerations:
                tolerations.append(item)
        if tolerations:
            pod["tolerations"] = tolerations
    return out


def effective_for_pod(
    defaults: PodDefaults | None, *, gpu: bool, spec_pull_secrets: bool
) -> dict[str, Any]:
    """The part of the defaults that reaches one pod (a ModelDeployment's revision includes it)."""
    if defaults is None:
        return {}
    out: dict[str, Any] = {}
    if defaults.image_pull_secrets and not spec_pull_secrets:
        out["imagePullSecrets"] = [s.dump() for s in defaults.image_pull_secrets]
    if gpu and defaults.gpu_node_selector:
        out["gpuNodeSelector"] = dict(defaults.gpu_node_selector)
    if gpu and defaults.gpu_tolerations:
        out["gpuTolerations"] = [t.dump() for t in defaults.gpu_tolerations]
    return out
