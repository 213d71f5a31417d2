"""What the pods kubetune builds assume about its images, checked without building them.

Covers the bugs a first real run of the images found (issue 12):

- the builders set ``runAsUser: 1000`` while the images create and own everything as UID 10001:
  the UID is now defined once (``kubetune.api.security.IMAGE_UID``), every Dockerfile's USER
  equals it, and the pods rely on it through ``runAsNonRoot`` with no fixed UID;
- serving pods had ``terminationGracePeriodSeconds: 30`` while the server drains for
  ``requestTimeoutSeconds + 5`` (65 s by default): the grace period is now derived from the
  drain and always longer;
- ``examples/argocd/application.yaml`` named ``argocd/argocd-cm-health.yaml``, which does not
  exist: every repository path an example, a README, a doc or a Dockerfile mentions must exist.

The images tier (tests/images/) runs the real images under these pod specs.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from kubetune.api.modeldeployment import DRAIN_MARGIN_SECONDS, ModelDeploymentSpec
from kubetune.api.security import IMAGE_UID
from kubetune.finetune import builders as ftb
from kubetune.rollout import builders as rb
from tests.unit.test_finetune_builders import make_ftj
from tests.unit.test_rollout_builders import MD, REV

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(REPO.glob("*-image/Dockerfile"))


def _pods() -> dict[str, dict]:
    ftj = make_ftj()
    return {
        "validate": ftb.build_validate_job(ftj)["spec"]["template"]["spec"],
        "train": ftb.build_train_job(ftj, attempt=1)["spec"]["template"]["spec"],
        "server": rb.build_server_deployment(MD, REV, role=rb.ROLE_STABLE)["spec"]["template"][
            "spec"
        ],
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_runasuser_1000_against_images_owned_by_10001_every_image_runs_as_image_uid(dockerfile):
    users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
    assert users == [f"{IMAGE_UID}:{IMAGE_UID}"], dockerfile
    # The final stage creates that user and owns its writable places as it.
    text = dockerfile.read_text()
    assert f"--uid {IMAGE_UID} --gid {IMAGE_UID}" in text


def test_three_dockerfiles_are_checked():
    assert [p.parent.name for p in DOCKERFILES] == ["operator-image", "server-image", "trainer-image"]


@pytest.mark.parametrize("kind", ["validate", "train", "server"])
def test_pods_rely_on_the_image_uid_through_run_as_non_root_with_no_fixed_uid(kind):
    pod = _pods()[kind]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert "runAsUser" not in ctx


@pytest.mark.parametrize("timeout", [1, 60, 600, 3600])
def test_grace_30_against_a_65_second_drain_serving_grace_outlasts_the_drain(timeout):
    md = {**MD, "spec": {**MD["spec"], "server": {**MD["spec"]["server"], "requestTimeoutSeconds": timeout}}}
    pod = rb.build_server_deployment(md, REV, role=rb.ROLE_STABLE)["spec"]["template"]["spec"]
    drain = ModelDeploymentSpec.model_validate(md["spec"]).server.drain_seconds
    assert drain == timeout + DRAIN_MARGIN_SECONDS
    assert pod["terminationGracePeriodSeconds"] == drain + rb.EXIT_MARGIN_SECONDS
    assert pod["terminationGracePeriodSeconds"] > drain


def test_the_default_server_drains_65_seconds_and_gets_75():
    pod = rb.build_server_deployment(
        {**MD, "spec": {**MD["spec"], "server": {}}}, REV, role=rb.ROLE_STABLE
    )["spec"]["template"]["spec"]
    assert ModelDeploymentSpec.model_validate({**MD["spec"], "server": {}}).server.drain_seconds == 65
    assert pod["terminationGracePeriodSeconds"] == 75


# --- repository paths named by examples and docs ------------------------------------------------

TOP_LEVEL = sorted(p.name for p in REPO.iterdir() if not p.name.startswith("."))
# A repository path: a top-level entry followed by /... (stops at ``::``, ``:line``, quotes, ...).
TOPS = "|".join(map(re.escape, TOP_LEVEL))
PATH = re.compile(r"(?<![\w./-])((?:" + TOPS + r")/[\w./*<>{}-]*[\w*>}])")
DOCUMENTS = sorted(
    {
        *REPO.glob("examples/**/*.yaml"),
        *REPO.glob("docs/**/*.md"),
        *REPO.glob("*.md"),
        *REPO.glob("*/README.md"),
        *REPO.glob("charts/*/README.md"),
        *DOCKERFILES,
    }
)


def mentioned_paths(text: str) -> list[tuple[int, str]]:
    """(line, path) for every repository path in ``text``; patterns (``*``, ``<name>``) skipped."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        for path in PATH.findall(line):
            if not any(c in path for c in "*<>{}"):
                out.append((number, path.rstrip(".")))
    return out


def test_path_finder_sees_the_argocd_example_bug():
    line = "# Install argocd/argocd-cm-health.yaml first so Argo CD understands their health."
    assert mentioned_paths(line) == [(1, "argocd/argocd-cm-health.yaml")]
    assert not (REPO / "argocd/argocd-cm-health.yaml").exists()
    assert mentioned_paths("see `tests/cluster/test_x.py::test_y` and crds/*.yaml") == [
        (1, "tests/cluster/test_x.py")
    ]


def test_argocd_example_names_a_file_that_exists_every_path_in_examples_and_docs_exists():
    missing = [
        f"{doc.relative_to(REPO)}:{line}: {path}"
        for doc in DOCUMENTS
        for line, path in mentioned_paths(doc.read_text())
        if not (REPO / path).exists()
    ]
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)
    assert len(DOCUMENTS) > 10


def _stages(dockerfile: Path) -> dict[str, list[str]]:
    """Instructions per stage (comments dropped, continuations joined); the last stage is ''."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            words = line.split()
            current = stages.setdefault(words[3] if len(words) > 3 else "", [])
        current.append(line)
    return stages


def _up_to_torch(stages: dict[str, list[str]]) -> list[str]:
    """The instructions a build runs through torch's install: its parent stage, then deps'."""
    deps = stages["deps"]
    end = next(i for i, line in enumerate(deps) if line.startswith("RUN pip install") and "torch" in line)
    return stages[deps[0].split()[1]] + deps[: end + 1]


def test_trainer_and_server_builds_share_the_torch_layer():
    # Builders cache a layer by its parent, its instruction and (COPY) the copied content:
    # identical instructions through torch's install, and the same torch.txt, let the second
    # build reuse the first one's gigabytes instead of storing them twice.
    trainer = _stages(REPO / "trainer-image" / "Dockerfile")
    server = _stages(REPO / "server-image" / "Dockerfile")
    assert _up_to_torch(trainer) == _up_to_torch(server)
    assert _up_to_torch(trainer)[0] == "FROM ${CUDA_IMAGE} AS python"
    # torch.txt is written by the same expression from the same pyproject.toml.
    torch_list = re.compile(r"torch = .*?; open\('requirements\.txt'")
    lists = [torch_list.findall(" ".join(stages["reqs"])) for stages in (trainer, server)]
    assert lists[0] and lists[0] == lists[1]


@pytest.mark.parametrize("name", ["trainer", "server", "operator"])
def test_a_source_change_leaves_the_virtualenv_layer_alone(name: str):
    # The final stage's multi-GB virtualenv comes from stages that never see the sources, nor
    # pyproject.toml itself: only the requirement lists a stage of their own writes from it, so
    # a code change, or a pyproject.toml tool-settings change (the import-linter
    # contracts rebuilt torch), rebuilds only the small application folder.
    stages = _stages(REPO / f"{name}-image" / "Dockerfile")
    final = stages[""]
    venv_from = next(line.split()[1].removeprefix("--from=") for line in final
                     if line.startswith("COPY --from=") and line.endswith("/opt/kubetune /opt/kubetune"))
    chain, stage = [], venv_from
    while stage in stages:
        chain.append(stage)
        stage = stages[stage][0].split()[1]
    copied = [line for s in chain for line in stages[s] if line.startswith("COPY ")]
    assert copied and all(
        re.fullmatch(r"COPY --from=reqs /src/[a-z]+\.txt \./", line) for line in copied
    ), copied
    assert "reqs" not in chain
    assert [line for line in stages["reqs"] if line.startswith("COPY ")] == ["COPY pyproject.toml ./"]
    assert any(line.startswith("COPY --from=") and "/opt/kubetune-app" in line for line in final)


def test_every_package_directory_is_packaged():
    # Found by the real operator image (tests/images/test_operator_image.py): the new
    # kubetune.rollout.steps was not in pyproject.toml's package list, so the installed operator
    # failed at import ("cannot import name 'steps' from 'kubetune.rollout'") while every test
    # that imports the source tree passed.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                relative = init.parent.relative_to(root).parts
                found.add(".".join((package, *relative)))
    assert found - listed == set(), "package folders missing from [tool.setuptools] packages"
    assert listed - found == set(), "listed packages without a folder"
