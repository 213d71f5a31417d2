"""``kubetune local apply|status|delete`` and ``kubetune demo``: the local runtime's commands.

``cli.py`` only registers these parsers (``add_parsers``); the work happens here and in the
modules this one wires together.

``apply`` stores the manifests under ``.kubetune/`` and then either hands them to the
controller already running on that folder (exactly like ``kubectl apply`` against a cluster
whose operator is running), or becomes the controller itself, in the foreground: it trains,
deploys, rolls out, shows progress bars, and keeps the servers up behind the local router until
Ctrl-C (or, with ``--exit-when-settled``, stops them and exits once nothing more will happen).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kubetune.local.loading import ManifestError, load_manifests
from kubetune.local.processes import kill_registered
from kubetune.local.progress import ProgressPrinter, deployment_line, job_line, progress_lines
from kubetune.local.runtime import build_runtime, controller_pid, install_signal_handlers
from kubetune.local.store import PLURALS, Store, default_root

KIND_ALIASES = {
    "ftj": "FineTuneJob",
    "finetunejob": "FineTuneJob",
    "finetunejobs": "FineTuneJob",
    "mdep": "ModelDeployment",
    "modeldeployment": "ModelDeployment",
    "modeldeployments": "ModelDeployment",
    "secret": "Secret",
    "secrets": "Secret",
}


def _store(args: argparse.Namespace) -> Store:
    return Store(Path(args.dir) if getattr(args, "dir", None) else default_root())


def overall_ok(store: Store) -> bool:
    """False when a FineTuneJob failed or a ModelDeployment is Degraded."""
    jobs_ok = all(
        (o.get("status") or {}).get("phase") != "Failed" for o in store.list("FineTuneJob")
    )
    mdeps_ok = all(
        (o.get("status") or {}).get("phase") != "Degraded" for o in store.list("ModelDeployment")
    )
    return jobs_ok and mdeps_ok


async def run_controller(
    store: Store,
    exit_when_settled: bool,
    timeout: float | None = None,
    printer: ProgressPrinter | None = None,
) -> int:
    """Be the controller of ``store`` in the foreground until settled, Ctrl-C or timeout."""
    printer = printer or ProgressPrinter()

    def on_event(kind: str, name: str, type_: str, reason: str, message: str) -> None:
        marker = "!" if type_ == "Warning" else "-"
        printer.message(f"  {marker} {kind.lower()}/{name}: {reason}: {message}")

    runtime = build_runtime(store, on_event=on_event)
    await runtime.start()
    uninstall = install_signal_handlers(runtime)
    announced: set[str] = set()

    def tick() -> None:
        printer.update(progress_lines(store))
        for name, url in _endpoints(store).items():
            if name not in announced:
                announced.add(name)
                printer.message(
                    f"mdep/{name} endpoint: {url}/v1 (OpenAI-compatible, through the local router; Ctrl-C stops)"
                )

    try:
        if exit_when_settled:
            done = await runtime.run(until=runtime.settled, timeout=timeout, on_tick=tick)
            if not done and not runtime.stopping:
                printer.message(f"timed out after {timeout:.0f}s before everything settled")
                return 1
        else:
            await runtime.run(timeout=timeout, on_tick=tick)
    finally:
        await runtime.stop()
        uninstall()
    if runtime.stopping and not exit_when_settled:
        printer.message("stopped; artifacts and status stay in " + str(store.root))
        return 0
    return 0 if overall_ok(store) else 1


def _endpoints(store: Store) -> dict[str, str]:
    try:
        return json.loads((store.root / "endpoints.json").read_text())
    except (OSError, ValueError):
        return {}


# --- apply -----------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    """Store the manifests; hand them to the running controller or run one in the foreground."""
    store = _store(args)
    try:
        manifests = []
        for path in args.file:
            manifests.extend(load_manifests(path))
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for manifest in manifests:
        old = store.get(manifest["kind"], manifest["metadata"]["name"])
        try:
            _check_update(manifest, old)
        except ManifestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        obj, outcome = store.apply(manifest)
        print(
            f"{obj['kind'].lower()}.kubetune.io/{obj['metadata']['name']} {outcome}".replace(
                "secret.kubetune.io", "secret"
            )
        )
    pid = controller_pid(store)
    if pid is not None:
        print(
            f"the local controller (pid {pid}) picks the change up; watch it with `kubetune local status`"
        )
        return 0
    return asyncio.run(
        run_controller(store, exit_when_settled=args.exit_when_settled, timeout=args.timeout)
    )


def _check_update(manifest: dict[str, Any], old: dict[str, Any] | None) -> None:
    """Run the CRD's transition rules (immutable fields) against the stored object."""
    if old is None or manifest.get("kind") == "Secret":
        return
    try:
        from kubetune.api import validation
    except ImportError:  # pragma: no cover - validation lands with the api package
        return
    errors = validation.validate_manifest(
        manifest, old={k: old[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in old}
    )
    if errors:
        name = manifest["metadata"]["name"]
        raise ManifestError(
            f"{manifest['kind']} {name!r} cannot be updated:\n"
            + "\n".join(f"  {e}" for e in errors)
        )


# --- status ----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """Show the stored objects: a table, or the whole objects as YAML/JSON."""
    store = _store(args)
    kinds = [KIND_ALIASES[args.kind.lower()]] if args.kind else ["FineTuneJob", "ModelDeployment"]
    objects = [
        o
        for kind in kinds
        for o in store.list(kind)
        if not args.name or o["metadata"]["name"] == args.name
    ]
    if args.output in ("yaml", "json"):
        items = objects if len(objects) != 1 else objects[0]
        if args.output == "json":
            print(json.dumps(items, indent=2))
        else:
            print(yaml.safe_dump(items, sort_keys=False), end="")
        return 0
    pid = controller_pid(store)
    state = f"running (pid {pid})" if pid else "not running"
    print(f"controller: {state}   store: {store.root}")
    if not objects:
        print("no objects; apply some with `kubetune local apply -f examples/local/`")
        return 0
    if args.output in ("table", "wide"):
        # The columns of `kubectl get ftj,mdep` (the CRDs' printer columns), kind by kind.
        from kubetune.local.tables import table

        for kind in kinds:
            of_kind = [o for o in objects if o["kind"] == kind]
            if of_kind:
                print()
                print(table(kind, of_kind, wide=args.output == "wide"))
        print()
    for obj in objects:
        print(job_line(obj) if obj["kind"] == "FineTuneJob" else deployment_line(obj))
    for name, url in _endpoints(store).items():
        if pid:
            print(f"mdep/{name} endpoint: {url}/v1")
    return 0


# --- traffic ---------------------------------------------------------------------------------


def cmd_traffic(args: argparse.Namespace) -> int:
    """Send chat requests to a ModelDeployment's local endpoint (what the demo generates).

    A canary's analysis needs requests (``minSamples`` per interval): with the examples applied
    by hand, run this next to the controller. Prompts: the synthetic task's held-out ones, or
    ``--prompts FILE.jsonl`` of ``{"prompt", "answer"}``; answers are checked for exact match.
    """
    from kubetune.local.demo import DemoSettings
    from kubetune.local.traffic import Traffic

    store = _store(args)
    url = _endpoints(store).get(args.name)
    if url is None or controller_pid(store) is None:
        print(
            f"error: no running controller serves modeldeployment {args.name!r} in {store.root}",
            file=sys.stderr,
        )
        return 1
    if args.prompts:
        golden = [
            json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()
        ]
        golden = [
            {"prompt": g["prompt"], "answer": g.get("answer", g.get("expected", ""))}
            for g in golden
        ]
    else:
        from kubetune_trainer.synthetic import task_examples

        golden = task_examples(48, seed=999, variant="a")
    # The serving pods' API key, when the ModelDeployment requires one (spec.server.apiKeySecret).
    from kubetune.api.modeldeployment import ModelDeploymentSpec
    from kubetune.local.containers import ContainerError
    from kubetune.local.deployments import api_key_of

    md = store.get("ModelDeployment", args.name) or {}
    try:
        api_key = api_key_of(
            ModelDeploymentSpec.model_validate(md.get("spec") or {}), store.secret_value
        )
    except ContainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    load = DemoSettings(requests_per_second=args.rps)
    traffic = Traffic(lambda: url, golden, load, model=args.model or args.name, api_key=api_key)

    async def run() -> None:
        await traffic.start()
        try:
            await asyncio.sleep(args.seconds)
        finally:
            await traffic.stop()

    print(f"sending {args.rps:g} requests/s to {url}/v1 for {args.seconds:g}s (Ctrl-C stops)")
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    stats = traffic.stats
    for rev, codes in sorted(stats.codes.items()):
        ok = sum(n for code, n in codes.items() if 200 <= code < 300)
        answered = stats.answered[rev]
        right = f", {stats.correct[rev] / answered:.0%} right" if answered else ""
        print(f"  {rev}: {sum(codes.values())} requests, {ok} ok{right}; by code {dict(codes)}")
    return 0


# --- annotate --------------------------------------------------------------------------------


def cmd_annotate(args: argparse.Namespace) -> int:
    """``kubectl annotate`` for local objects: ``key=value`` sets, ``key-`` removes.

    This is how a human drives a rollout locally, exactly as in a cluster:
    ``kubetune.io/promote=true`` (skip a pause or analysis step), ``kubetune.io/abort=true``,
    ``kubetune.io/pause=true``.
    """
    store = _store(args)
    kind = KIND_ALIASES[args.kind.lower()]
    changes: dict[str, str | None] = {}
    for item in args.annotations:
        if item.endswith("-") and "=" not in item:
            changes[item[:-1]] = None
        elif "=" in item:
            key, value = item.split("=", 1)
            changes[key] = value
        else:
            print(f"error: {item!r}: use key=value to set or key- to remove", file=sys.stderr)
            return 2
    try:
        store.patch_annotations(kind, args.name, changes)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"{kind.lower()}.kubetune.io/{args.name} annotated")
    return 0


# --- delete ----------------------------------------------------------------------------------


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete objects (their processes stop); artifacts stay, as in a cluster."""
    store = _store(args)
    targets: list[tuple[str, str]] = []
    if args.all:
        targets = [(kind, o["metadata"]["name"]) for kind in PLURALS for o in store.list(kind)]
    elif args.file:
        try:
            targets = [(m["kind"], m["metadata"]["name"]) for m in load_manifests(args.file)]
        except ManifestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.kind and args.names:
        targets = [(KIND_ALIASES[args.kind.lower()], n) for n in args.names]
    else:
        print("error: say what to delete: KIND NAME..., -f FILE or --all", file=sys.stderr)
        return 2
    for kind, name in targets:
        if store.delete(kind, name):
            print(f"{kind.lower()}/{name} deleted")
        else:
            print(f"{kind.lower()}/{name} not found")
    pid = controller_pid(store)
    if args.all and pid is not None:
        # Nothing is left to control: stop the controller; it stops its children first.
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while controller_pid(store) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    if pid is None or args.all:
        stopped = kill_registered(store.registry)
        if stopped:
            print(f"stopped {len(stopped)} process(es)")
    return 0


# --- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main command (see demo.py)."""
    from kubetune.local.demo import run_demo

    return run_demo(args)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``kubetune local ...`` and ``kubetune demo`` on the top-level parser."""
    local = sub.add_parser(
        "local", help="run FineTuneJobs and ModelDeployments on this machine, no cluster"
    )
    local_sub = local.add_subparsers(dest="local_command", required=True)

    p = local_sub.add_parser(
        "apply", help="apply manifests and run them (or hand them to the running controller)"
    )
    p.add_argument(
        "-f", "--file", action="append", required=True, help="manifest file or folder (repeatable)"
    )
    p.add_argument("--dir", help="state folder (default: $KUBETUNE_LOCAL_DIR or ./.kubetune)")
    p.add_argument(
        "--exit-when-settled",
        action="store_true",
        help="stop the servers and exit once nothing more will happen (default: keep serving until Ctrl-C)",
    )
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.set_defaults(func=cmd_apply)

    p = local_sub.add_parser("status", help="show the local objects and their status")
    p.add_argument("kind", nargs="?", choices=sorted(KIND_ALIASES), help="only this kind")
    p.add_argument("name", nargs="?", help="only this object")
    p.add_argument(
        "-o", "--output", choices=["table", "wide", "progress", "yaml", "json"], default="table"
    )
    p.add_argument("--dir", help="state folder (default: $KUBETUNE_LOCAL_DIR or ./.kubetune)")
    p.set_defaults(func=cmd_status)

    p = local_sub.add_parser(
        "traffic", help="send chat requests to a ModelDeployment's local endpoint"
    )
    p.add_argument("name", help="the ModelDeployment")
    p.add_argument("--rps", type=float, default=16.0, help="requests per second (default 16)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    p.add_argument("--model", help="model name to send (default: the ModelDeployment's name)")
    p.add_argument(
        "--prompts",
        help='JSONL of {"prompt", "answer"} (default: the demo task\'s held-out prompts)',
    )
    p.add_argument("--dir", help="state folder (default: $KUBETUNE_LOCAL_DIR or ./.kubetune)")
    p.set_defaults(func=cmd_traffic)

    p = local_sub.add_parser(
        "annotate",
        help="set (key=value) or remove (key-) annotations, e.g. kubetune.io/promote=true",
    )
    p.add_argument("kind", choices=sorted(KIND_ALIASES))
    p.add_argument("name")
    p.add_argument("annotations", nargs="+", metavar="KEY=VALUE|KEY-")
    p.add_argument("--dir", help="state folder (default: $KUBETUNE_LOCAL_DIR or ./.kubetune)")
    p.set_defaults(func=cmd_annotate)

    p = local_sub.add_parser("delete", help="delete local objects and stop their processes")
    p.add_argument("kind", nargs="?", choices=sorted(KIND_ALIASES))
    p.add_argument("names", nargs="*")
    p.add_argument("-f", "--file", help="delete what this manifest file or folder defines")
    p.add_argument("--all", action="store_true", help="delete everything and stop the controller")
    p.add_argument("--dir", help="state folder (default: $KUBETUNE_LOCAL_DIR or ./.kubetune)")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser(
        "demo", help="the whole story locally: fine-tune, deploy, canary, rollback (~5 min)"
    )
    p.add_argument("--dir", help="work folder (default: ./.kubetune/demo)")
    p.add_argument("--fast", action="store_true", help="lighter settings (what the e2e tests run)")
    p.add_argument(
        "--keep-serving", action="store_true", help="keep the final deployment up until Ctrl-C"
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="only build the base model and dataset and write the manifests (examples/local uses /tmp/kubetune-local)",
    )
    p.set_defaults(func=cmd_demo)
