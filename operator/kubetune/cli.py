"""The ``kubetune`` command: CRD generation, manifest validation, the operator, the local runtime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cmd_crds(args: argparse.Namespace) -> int:
    """Write crds/*.yaml from the models, or with --check fail when they drift."""
    from kubetune.api.crds import all_crds, render

    out_dir = Path(args.out) if args.out else _repo_root() / "crds"
    drift = []
    for name, crd in all_crds().items():
        path = out_dir / name
        text = render(crd)
        if args.check:
            if not path.exists() or path.read_text() != text:
                drift.append(str(path))
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if drift:
        print(
            "CRDs drifted from operator/kubetune/api; run `make crds` and commit:",
            *drift,
            sep="\n  ",
            file=sys.stderr,
        )
        return 1
    if args.check:
        print("crds/ matches the API models")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate manifests as the API server would with our CRDs (schema, defaults, CEL rules)."""
    from kubetune.api.validation import validate_paths

    checked, errors = validate_paths(args.filename)
    for err in errors:
        print(err, file=sys.stderr)
    print(f"{checked} kubetune manifest(s) checked, {len(errors)} error(s)")
    if not errors:
        # after the summary line, which scripts read first
        for line in memory_estimates(args.filename, args.model_config):
            print(line)
    return 1 if errors else 0


def memory_estimates(paths: list[str], model_config: str | None) -> list[str]:
    """The memory pre-flight of every FineTuneJob whose base model's config.json is readable.

    That is ``--model-config`` when given, else ``<baseModel.uri>/config.json`` for a file://
    base model (an s3:// one would need the cluster's credentials: say so and go on). The
    verdict is advice here: the API server accepts the manifest, the validation Job fails it.
    """
    import json
    from urllib.parse import urlparse

    import yaml
    from pydantic import ValidationError

    from kubetune.api.finetunejob import FineTuneJob
    from kubetune.api.validation import manifest_files
    from kubetune.finetune import memory

    lines = []
    for path in manifest_files(paths):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "FineTuneJob":
                continue
            try:
                job = FineTuneJob.model_validate(doc)
            except ValidationError:
                continue  # reported by the schema check
            where = f"{path}: FineTuneJob {job.metadata.name}: memory"
            uri = job.spec.base_model.uri
            source = Path(model_config) if model_config else None
            if source is None and urlparse(uri).scheme == "file":
                source = Path(urlparse(uri).path) / "config.json"
            if source is None:
                lines.append(f"{where}: not estimated ({uri} is not local; pass --model-config)")
                continue
            try:
                est = memory.preflight(json.loads(source.read_text()), job.spec)
            except (OSError, ValueError) as exc:
                lines.append(f"{where}: not estimated ({source}: {exc})")
                continue
            verdict = "DOES NOT FIT, " if est.fits is False else ""
            lines.append(f"{where}: {verdict}{est.message}; {memory.describe(est)}")
    return lines


def cmd_docs(args: argparse.Namespace) -> int:
    """Write docs/api-reference.md from the models, or with --check fail when it drifts."""
    from kubetune.api.reference import render_api_reference, splice_readme

    path = Path(args.out) if args.out else _repo_root() / "docs" / "api-reference.md"
    targets = {path: render_api_reference()}
    readme = _repo_root() / "README.md"
    if not args.out and readme.exists():
        # The README carries every spec field between two markers (same generator).
        targets[readme] = splice_readme(readme.read_text())
    drifted = [p for p, text in targets.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in drifted:
            print(
                f"{p} drifted from operator/kubetune/api; run `kubetune docs` and commit",
                file=sys.stderr,
            )
        if drifted:
            return 1
        print(" and ".join(str(p) for p in targets) + " match the API models")
        return 0
    for p in drifted:
        p.write_text(targets[p])
        print(f"wrote {p}")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the operator (``kopf run -m kubetune.handlers``) against the current kubeconfig or in-cluster."""
    from kopf.cli import main as kopf_main

    argv = ["run", "-m", "kubetune.handlers", "-m", "kubetune.startup"]
    argv += ["--peering", args.peering] if args.peering else ["--standalone"]
    if args.namespace:
        for ns in args.namespace:
            argv += ["--namespace", ns]
    else:
        argv.append("--all-namespaces")
    if args.liveness:
        argv += ["--liveness", args.liveness]
    if args.verbose:
        argv.append("--verbose")
    if args.debug:
        argv.append("--debug")
    try:
        kopf_main.main(args=argv, prog_name="kubetune operator", standalone_mode=False)
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands are added by each layer that owns them)."""
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("crds", help="generate CRDs from the API models")
    p.add_argument("--out", help="output folder (default: <repo>/crds)")
    p.add_argument("--check", action="store_true", help="fail when crds/ differs from the models")
    p.set_defaults(func=cmd_crds)
    p = sub.add_parser(
        "validate", help="validate manifests against the CRDs (schema + CEL), offline"
    )
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="file or folder (repeatable)"
    )
    p.add_argument(
        "--model-config",
        help="the base model's config.json, for the memory estimate of FineTuneJobs whose "
        "base model is not a local folder",
    )
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("docs", help="generate docs/api-reference.md from the API models")
    p.add_argument("--out", help="output file (default: <repo>/docs/api-reference.md)")
    p.add_argument(
        "--check", action="store_true", help="fail when the file differs from the models"
    )
    p.set_defaults(func=cmd_docs)
    p = sub.add_parser(
        "operator", help="run the Kubernetes operator (FineTuneJob, ModelDeployment)"
    )
    p.add_argument(
        "-n", "--namespace", action="append", help="watch this namespace (repeatable; default: all)"
    )
    p.add_argument(
        "--peering", help="Kopf peering object for several replicas (default: standalone)"
    )
    p.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--debug", action="store_true", help="log everything, incl. API calls")
    p.set_defaults(func=cmd_operator)
    # `kubetune local ...` and `kubetune demo` belong to the local runtime (kubetune.local).
    from kubetune.local.commands import add_parsers as add_local_parsers

    add_local_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kubetune`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
