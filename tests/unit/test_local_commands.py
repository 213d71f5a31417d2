"""``kubetune local annotate|status`` against a local store (in-process, no controller).

Covers: annotate sets ``key=value`` and removes ``key-`` like kubectl (the way to promote,
pause or abort a local rollout); a malformed argument and an unknown object are clear errors;
``status -o json`` prints the stored object as the API would.
"""

from __future__ import annotations

import json

from kubetune.cli import main
from kubetune.local.store import Store

MDEP = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "assistant"},
    "spec": {"model": {"baseModel": {"uri": "file:///tmp/none"}}},
}


def test_annotate_sets_and_removes(tmp_path, capsys):
    store = Store(tmp_path)
    store.apply(MDEP)
    assert (
        main(
            [
                "local",
                "annotate",
                "mdep",
                "assistant",
                "kubetune.io/promote=true",
                "--dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert store.get("ModelDeployment", "assistant")["metadata"]["annotations"] == {
        "kubetune.io/promote": "true"
    }
    assert (
        main(
            [
                "local",
                "annotate",
                "mdep",
                "assistant",
                "kubetune.io/promote-",
                "--dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert store.get("ModelDeployment", "assistant")["metadata"]["annotations"] == {}
    capsys.readouterr()
    assert main(["local", "status", "mdep", "assistant", "-o", "json", "--dir", str(tmp_path)]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["kind"] == "ModelDeployment" and obj["metadata"]["generation"] == 1


def test_annotate_errors_are_clear(tmp_path, capsys):
    Store(tmp_path).apply(MDEP)
    assert main(["local", "annotate", "mdep", "assistant", "promote", "--dir", str(tmp_path)]) == 2
    assert "use key=value to set or key- to remove" in capsys.readouterr().err
    assert main(["local", "annotate", "mdep", "nope", "a=b", "--dir", str(tmp_path)]) == 1
    assert "ModelDeployment 'nope' not found" in capsys.readouterr().err
