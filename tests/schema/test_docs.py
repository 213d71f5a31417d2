"""The operations docs name every condition type, reason and operator metric that exists.

Covers: each condition type and ``Reason`` constant in ``kubetune.api.conditions`` appears in
docs/operations.md (so ``kubectl wait --for=condition=...`` and Events are documented); each
metric of ``kubetune.metrics.REGISTRY`` appears in its metrics table; the values table names
only keys that exist in the chart's values.yaml; the README's "Run on a cluster"
section uses the chart's real path, real files and the two wait commands.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kubetune import metrics
from kubetune.api import conditions

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = (REPO / "docs" / "operations.md").read_text()


def test_every_condition_type_and_reason_is_documented() -> None:
    types = [v for k, v in vars(conditions).items() if k.isupper() and isinstance(v, str)]
    reasons = [v for k, v in vars(conditions.Reason).items() if k.isupper()]
    assert len(types) >= 9 and len(reasons) >= 30
    missing = [name for name in types + reasons if f"`{name}`" not in OPERATIONS]
    assert missing == []


def test_every_operator_metric_is_documented() -> None:
    names = {m.name for m in metrics.REGISTRY.collect()}
    assert names
    missing = [n for n in names if not re.search(rf"`{n}(_total)?`", OPERATIONS)]
    assert missing == []


def test_documented_chart_values_exist() -> None:
    values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    section = OPERATIONS.split("Common values")[1].split("Namespace-scoped install")[0]
    keys = re.findall(r"^\| `([a-zA-Z.]+)`", section, flags=re.M)
    keys += re.findall(r"^\| `[a-zA-Z.]+`, `([a-zA-Z.]+)`", section, flags=re.M)
    assert len(keys) >= 8
    for key in keys:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, (
                f"docs/operations.md documents unknown value {key}"
            )
            node = node[part]


def test_cluster_section_uses_real_paths_and_commands() -> None:
    text = (REPO / "README.md").read_text().split("## Run on a cluster")[1].split("\n## ")[0]
    assert "helm install kubetune charts/kubetune" in text
    assert "kubectl wait --for=condition=Succeeded ftj/" in text
    assert "kubectl wait --for=condition=Ready mdep/" in text
    for path in re.findall(r"\]\(((?:\.\./)?(?:examples|docs|charts|argocd)/[^)]+)\)", text):
        assert (REPO / "docs" / path).resolve().exists() or (REPO / path).exists(), path


def test_documented_kubectl_get_columns_match_the_crds() -> None:
    """The `kubectl get ftj|mdep` comments in docs/operations.md show the CRDs' default columns."""
    for short, crd_file in (
        ("ftj", "finetunejobs.kubetune.io.yaml"),
        ("mdep", "modeldeployments.kubetune.io.yaml"),
    ):
        crd = yaml.safe_load((REPO / "crds" / crd_file).read_text())
        columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        default = ", ".join(c["name"].upper() for c in columns if not c.get("priority"))
        wide = ", ".join(c["name"].upper() for c in columns if c.get("priority"))
        assert re.search(rf"^kubectl get {short} +# {re.escape(default)}$", OPERATIONS, re.M), (
            default
        )
        if short == "ftj":
            assert re.search(
                rf"^kubectl get {short} -o wide +# \+ {re.escape(wide)}$", OPERATIONS, re.M
            ), wide
