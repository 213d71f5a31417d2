"""The control plane's go.mod: its staging-module replaces are generated from upstream's go.mod.

k8s.io/kubernetes points k8s.io/api, k8s.io/apiserver, ... at ./staging; a module depending on
it must replace each with the published v0.X.Y of the same release. gen_replaces.py writes that
block from upstream's own go.mod, and this test checks the committed block against it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CONTROLPLANE = Path(__file__).resolve().parents[1] / "cluster" / "controlplane"
spec = importlib.util.spec_from_file_location("gen_replaces", CONTROLPLANE / "gen_replaces.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)

UPSTREAM = """module k8s.io/kubernetes

require k8s.io/api v0.0.0

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/other/thing => github.com/other/thing v1.2.3
)
"""


def test_staging_modules_are_read_from_upstream() -> None:
    assert gen.staging_modules(UPSTREAM) == ["k8s.io/api", "k8s.io/client-go"]


def test_release_maps_to_the_published_staging_version() -> None:
    assert gen.published("v1.36.3") == "v0.36.3"
    with pytest.raises(SystemExit, match="not v1.MINOR.PATCH"):
        gen.published("1.36")


def test_a_go_mod_without_staging_replaces_is_an_error() -> None:
    with pytest.raises(SystemExit, match="no './staging' replace"):
        gen.staging_modules("module x\n")


def _replaces(text: str) -> set[tuple[str, str, str]]:
    return set(re.findall(r"^\s*(\S+)\s+=>\s+(\S+)\s+(\S+)\s*$", text, re.M))


def _versions() -> dict[str, str]:
    text = (CONTROLPLANE / "versions.env").read_text()
    return dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, re.M))


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (the cluster tier's toolchain)")
def test_committed_replace_block_is_what_the_script_generates(tmp_path: Path) -> None:
    version = _versions()["KUBERNETES_VERSION"]
    info = subprocess.run(
        ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GOFLAGS": "", "GO111MODULE": "on"},
    )
    upstream = Path(json.loads(info.stdout)["GoMod"]).read_text()
    committed = (CONTROLPLANE / "go.mod").read_text()
    generated = gen.render(gen.staging_modules(upstream), gen.published(version))
    # `go mod` may re-align the block: compare what it says, line by line.
    block = committed[committed.index(gen.BEGIN) : committed.index(gen.END)]
    assert _replaces(block) == _replaces(generated), (
        "go.mod's replace block drifted: run gen_replaces.py"
    )
    assert len(_replaces(block)) >= 20
    # And go.mod requires the pinned releases.
    assert f"k8s.io/kubernetes {version}" in committed
    assert f"go.etcd.io/etcd/server/v3 {_versions()['ETCD_VERSION']}" in committed
    assert f"sigs.k8s.io/kwok {_versions()['KWOK_VERSION']}" in committed
