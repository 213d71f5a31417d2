"""``kubetune demo``: the whole story of the project on one machine, in a few minutes on 2 CPUs.

1. Set-up: a tiny base model (random init, so it knows nothing) and a synthetic dataset of the
   code-word task (``kubetune_trainer.synthetic``).
2. FineTuneJob ``assistant-v1``: validate the data, fine-tune with LoRA; eval accuracy rises on
   the progress bar.
3. ModelDeployment ``assistant`` serves it: the first revision goes straight to stable.
   Meanwhile FineTuneJob ``assistant-v2`` trains longer (the next run of the same task).
4. Generated traffic starts (held-out prompts of the task, through the local router) and the
   ModelDeployment is pointed at v2: a canary whose traffic steps up while analysis compares
   canary and stable; then it is promoted.
5. A deliberately broken revision (the server's fault injection: half its answers are 500s)
   becomes the next canary; analysis fails and it is rolled back automatically, weight 0.
6. A closing summary table: metrics, revisions, weights, time.

Everything goes through the same manifests a cluster would get (written to
``<dir>/manifests/`` so they can be inspected and re-applied with ``kubetune local apply``),
the same store and the same controller as ``kubetune local apply``. Re-running the demo
reuses the base model, the dataset and every FineTuneJob whose spec did not change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune.local.progress import ProgressPrinter, progress_lines
from kubetune.local.runtime import LocalRuntime, build_runtime, install_signal_handlers
from kubetune.local.store import Store
from kubetune.local.traffic import Traffic

MDEP = "assistant"
FAULT_ERROR_RATE = "0.5"


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the story: the full demo and the lighter one the e2e tests run."""

    train_examples: int = 480
    v1_steps: int = 80
    v2_steps: int = 200
    eval_every: int = 10
    batch_size: int = 16
    learning_rate: float = 3e-3
    analysis_interval: str = "5s"
    min_samples: int = 10
    weights: tuple[int, ...] = (20, 50)
    analysis_intervals: int = 2
    requests_per_second: float = 16.0
    concurrency: int = 4
    phase_timeout: float = 300.0

    @classmethod
    def fast(cls) -> DemoSettings:
        """What ``--fast`` and the e2e tests use: fewer steps, one analysis interval per step."""
        return cls(
            train_examples=320,
            v1_steps=30,
            v2_steps=90,
            eval_every=15,
            analysis_interval="3s",
            min_samples=6,
            weights=(30,),
            analysis_intervals=1,
            requests_per_second=14.0,
        )


# --- set-up: model, data, manifests ---------------------------------------------------------------


def prepare(work: Path, settings: DemoSettings, say: Any = print) -> dict[str, Path]:
    """Build the base model and the datasets under ``work`` unless they are already there."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    from kubetune_trainer import synthetic

    hf_logging.disable_progress_bar()

    paths = {
        "base": work / "models" / "base",
        "train": work / "data" / "train.jsonl",
        "golden": work / "data" / "golden.jsonl",
    }
    stamp = work / "models" / "base.stamp"
    recipe = json.dumps({"seed": 0, "hidden": 64, "layers": 2})
    if (
        stamp.exists()
        and stamp.read_text() == recipe
        and (paths["base"] / "model.safetensors").exists()
    ):
        say(f"base model: reusing {paths['base']}")
    else:
        started = time.monotonic()
        synthetic.build_base_model(paths["base"], seed=0)
        stamp.write_text(recipe)
        say(
            f"base model: built a tiny random-init Llama (2 layers, hidden 64) in {time.monotonic() - started:.1f}s"
        )
    data_stamp = work / "data" / "train.stamp"
    data_recipe = json.dumps({"n": settings.train_examples, "seed": 1, "variant": "a"})
    if data_stamp.exists() and data_stamp.read_text() == data_recipe and paths["train"].exists():
        say(f"dataset: reusing {paths['train']}")
    else:
        synthetic.write_task_dataset(
            paths["train"], n=settings.train_examples, seed=1, format="chat", variant="a"
        )
        golden = synthetic.task_examples(48, seed=999, variant="a")
        paths["golden"].write_text("".join(json.dumps(g) + "\n" for g in golden))
        data_stamp.write_text(data_recipe)
        say(
            f"dataset: {settings.train_examples} examples of the code-word task (chance accuracy ~4%)"
        )
    if not paths["golden"].exists():
        golden = synthetic.task_examples(48, seed=999, variant="a")
        paths["golden"].write_text("".join(json.dumps(g) + "\n" for g in golden))
    return paths


def finetunejob(
    name: str, work: Path, paths: dict[str, Path], steps: int, settings: DemoSettings, seed: int
) -> dict[str, Any]:
    """A CPU-sized LoRA FineTuneJob of the demo."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": paths["base"].resolve().as_uri()},
            "dataset": {
                "train": paths["train"].resolve().as_uri(),
                "format": "chat",
                "validationSplit": 0.1,
                "maxSeqLength": 64,
            },
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
            "hyperparameters": {
                "maxSteps": steps,
                "learningRate": settings.learning_rate,
                "batchSize": settings.batch_size,
                "scheduler": "constant",
                "warmupRatio": 0.0,
                "precision": "fp32",
                "seed": seed,
            },
            # About eight evaluations per run: enough to watch the accuracy rise, cheap on CPU.
            "evaluation": {"everySteps": max(settings.eval_every, steps // 8)},
            "checkpoint": {"everySteps": max(settings.eval_every, steps // 8) * 2, "keepLast": 1},
            "output": {"uri": (work / "artifacts" / name).resolve().as_uri()},
            "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
            "retry": {"maxRestarts": 1, "backoffSeconds": 1},
        },
    }


def modeldeployment(ftj: str, settings: DemoSettings, fault: bool = False) -> dict[str, Any]:
    """The demo's ModelDeployment, serving ``ftj``'s artifact; ``fault`` breaks the server."""
    steps: list[dict[str, Any]] = []
    for weight in settings.weights:
        steps.append({"setWeight": weight})
        steps.append({"analysis": {"intervals": settings.analysis_intervals}})
    server: dict[str, Any] = {
        "maxBatchSize": 8,
        "batchWaitMs": 5,
        "maxTokensLimit": 16,
        "requestTimeoutSeconds": 30,
    }
    if fault:
        server["env"] = [{"name": "KUBETUNE_FAULT_ERROR_RATE", "value": FAULT_ERROR_RATE}]
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": MDEP},
        "spec": {
            "model": {"fineTuneJobRef": {"name": ftj}, "name": MDEP},
            "replicas": 1,
            "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
            "server": server,
            "rollout": {
                "steps": steps,
                "analysis": {
                    "interval": settings.analysis_interval,
                    "minSamples": settings.min_samples,
                    "failureLimit": 1,
                    "thresholds": {"maxErrorRate": 0.05, "maxLatencyRatio": 4.0},
                },
                "progressDeadlineSeconds": 240,
                "scaleDownDelaySeconds": 2,
            },
        },
    }


def write_manifest(work: Path, filename: str, manifest: dict[str, Any]) -> Path:
    """Keep a manifest the demo applies, so a user can read and re-apply it."""
    path = work / "manifests" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


# --- examples/local -------------------------------------------------------------------------------

# Where ``kubetune demo --prepare-only`` puts the model and data the examples/local manifests
# name (file:// URIs must be absolute, so the examples fix one folder).
EXAMPLES_WORK = Path("/tmp/kubetune-local")
EXAMPLES_HEADER = (
    "# Local runtime example (docs/local.md). Build the tiny base model and the dataset it names first:\n"
    "#   kubetune demo --prepare-only --dir /tmp/kubetune-local\n"
)


def example_manifests(
    work: Path = EXAMPLES_WORK, settings: DemoSettings | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The files of examples/local/, rendered from the demo's own manifests (one source)."""
    s = settings or DemoSettings()
    paths = {"base": work / "models" / "base", "train": work / "data" / "train.jsonl"}
    return {
        "finetunejobs.yaml": [
            finetunejob("assistant-v1", work, paths, s.v1_steps, s, seed=1),
            finetunejob("assistant-v2", work, paths, s.v2_steps, s, seed=2),
        ],
        "modeldeployment.yaml": [modeldeployment("assistant-v1", s)],
        "steps/canary.yaml": [modeldeployment("assistant-v2", s)],
        "steps/broken.yaml": [modeldeployment("assistant-v2", s, fault=True)],
    }


def render_examples(work: Path = EXAMPLES_WORK) -> dict[str, str]:
    """File name -> YAML text of examples/local/."""
    return {
        name: EXAMPLES_HEADER + "---\n".join(yaml.safe_dump(m, sort_keys=False) for m in docs)
        for name, docs in example_manifests(work).items()
    }


# --- the story -------------------------------------------------------------------------------


@dataclass
class Summary:
    """What the demo (and the e2e test) reports at the end."""

    accuracy_history: dict[str, list[float]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    revisions_seen: dict[str, str] = field(default_factory=dict)
    final_status: dict[str, Any] = field(default_factory=dict)
    traffic: dict[str, Any] = field(default_factory=dict)
    phases: list[tuple[str, float]] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    ok: bool = False
    interrupted: bool = False


class Story:
    """Drives one demo run against a LocalRuntime (in this process)."""

    def __init__(
        self,
        work: Path,
        settings: DemoSettings,
        printer: ProgressPrinter | None = None,
        keep_serving: bool = False,
    ) -> None:
        self.keep_serving = keep_serving
        self.work = work
        self.settings = settings
        self.printer = printer or ProgressPrinter()
        self.store = Store(work / "state")
        self.summary = Summary()
        self.runtime: LocalRuntime | None = None
        self.traffic: Traffic | None = None
        self.started = time.monotonic()
        self.revision_roles: dict[str, str] = {}
        self.traffic_stopped = False
        # Requests the router still sent to a rolled-back revision after its rollback (must be 0).
        self.requests_after_rollback: dict[str, int] = {}

    def say(self, text: str) -> None:
        """A line that stays above the progress bars."""
        self.printer.message(text)

    def _event(self, kind: str, name: str, type_: str, reason: str, message: str) -> None:
        marker = "!" if type_ == "Warning" else "-"
        self.say(f"  {marker} {kind.lower()}/{name}: {reason}: {message}")

    # --- helpers --------------------------------------------------------------------------

    def apply(self, filename: str, manifest: dict[str, Any]) -> str:
        """Write the manifest to <dir>/manifests and apply it to the store, as `kubetune local apply`."""
        write_manifest(self.work, filename, manifest)
        obj, outcome = self.store.apply(manifest)
        self.say(
            f"$ kubetune local apply -f manifests/{filename}   # {obj['kind'].lower()}/{obj['metadata']['name']} {outcome}"
        )
        return outcome

    def _tick(self) -> None:
        for ftj in self.store.list("FineTuneJob"):
            acc = ((ftj.get("status") or {}).get("metrics") or {}).get("evalAccuracy")
            history = self.summary.accuracy_history.setdefault(ftj["metadata"]["name"], [])
            if acc is not None and (not history or history[-1] != acc):
                history.append(acc)
        self._remember_revisions()
        self.printer.update(progress_lines(self.store))

    async def wait(self, phase: str, until: Any) -> None:
        """Reconcile until ``until()`` holds; raise on Ctrl-C or timeout."""
        assert self.runtime is not None
        started = time.monotonic()
        done = await self.runtime.run(
            until=until, timeout=self.settings.phase_timeout, on_tick=self._tick
        )
        self.summary.phases.append((phase, time.monotonic() - started))
        if not done:
            if self.runtime.stopping:
                raise KeyboardInterrupt
            raise TimeoutError(
                f"{phase}: not done after {self.settings.phase_timeout:.0f}s (see {self.store.root}/run/*/log.txt)"
            )

    def ftj_phase(self, name: str) -> str | None:
        """Phase of a FineTuneJob."""
        obj = self.store.get("FineTuneJob", name)
        return ((obj or {}).get("status") or {}).get("phase")

    def mdep_status(self) -> dict[str, Any]:
        """Status of the demo's ModelDeployment."""
        obj = self.store.get("ModelDeployment", MDEP) or {}
        return obj.get("status") or {}

    def router_url(self) -> str | None:
        """The local router's base URL (the ModelDeployment's endpoint)."""
        try:
            return json.loads((self.store.root / "endpoints.json").read_text()).get(MDEP)
        except (OSError, ValueError):
            return None

    def train(self, name: str, steps: int, seed: int) -> dict[str, Any]:
        """Apply a FineTuneJob; report whether its artifact is reused."""
        paths = self._paths
        manifest = finetunejob(name, self.work, paths, steps, self.settings, seed)
        before = self.store.get("FineTuneJob", name)
        outcome = self.apply(f"{name}.yaml", manifest)
        if (
            outcome == "unchanged"
            and ((before or {}).get("status") or {}).get("phase") == "Succeeded"
        ):
            self.summary.reused.append(name)
            self.say(f"  {name}: spec unchanged and already Succeeded: reusing its artifact")
            # The accuracy it climbed through when it trained (the previous run's summary).
            try:
                earlier = json.loads((self.work / "summary.json").read_text())["accuracy_history"]
            except (OSError, ValueError, KeyError, TypeError):
                earlier = {}
            if earlier.get(name):
                self.summary.accuracy_history[name] = list(earlier[name])
        return manifest

    def _job_succeeded(self, name: str) -> Any:
        def check() -> bool:
            phase = self.ftj_phase(name)
            if phase == "Failed":
                obj = self.store.get("FineTuneJob", name) or {}
                raise RuntimeError(
                    f"FineTuneJob {name} failed: {(obj.get('status') or {}).get('message')}"
                )
            return phase == "Succeeded"

        return check

    def _stable_is(self, ftj: str) -> Any:
        def check() -> bool:
            status = self.mdep_status()
            stable = status.get("stable") or {}
            return (
                status.get("phase") == "Healthy"
                and stable.get("fineTuneJob") == ftj
                and not status.get("canary")
                and int(stable.get("readyReplicas") or 0) >= 1
            )

        return check

    def _rolled_back(self) -> bool:
        status = self.mdep_status()
        return (
            bool(status.get("rejectedRevisions"))
            and not status.get("canary")
            and status.get("phase") in ("RolledBack", "Healthy", "Degraded")
        )

    # --- the story --------------------------------------------------------------------------

    async def run(self) -> Summary:
        """The whole story; returns the summary (also on Ctrl-C, with ``interrupted``)."""
        s = self.settings
        self.say("== 1. set-up: tiny base model and synthetic dataset")
        self._paths = await asyncio.to_thread(prepare, self.work, s, self.say)
        golden = [
            json.loads(line)
            for line in self._paths["golden"].read_text().splitlines()
            if line.strip()
        ]

        # A demo run tells one story: an old ModelDeployment of a previous run is removed first
        # (its FineTuneJobs stay, and are reused when their spec did not change).
        self.store.delete("ModelDeployment", MDEP)
        self.runtime = build_runtime(self.store, on_event=self._event)
        await self.runtime.start()
        uninstall = install_signal_handlers(self.runtime)
        self.traffic = Traffic(self.router_url, golden, s, MDEP)
        try:
            self.say(
                "== 2. fine-tune revision 1 (LoRA on CPU; eval accuracy is exact match on held-out prompts)"
            )
            self.train("assistant-v1", s.v1_steps, seed=1)
            await self.wait("fine-tune v1", self._job_succeeded("assistant-v1"))

            self.say("== 3. deploy it (the first revision goes straight to stable);")
            self.say(
                "   meanwhile revision 2 fine-tunes longer, as a data scientist's next run would"
            )
            self.apply("assistant.yaml", modeldeployment("assistant-v1", s))
            self.train("assistant-v2", s.v2_steps, seed=2)
            await self.wait("deploy stable", self._stable_is("assistant-v1"))
            self._remember_revisions()
            self.say(f"   serving at {self.router_url()}/v1 (OpenAI-compatible)")

            self.say("== 4. once revision 2 is trained, roll it out as a canary")
            await self.wait("fine-tune v2", self._job_succeeded("assistant-v2"))
            # Traffic starts now, not earlier: on 2 cores the trainer needs them more than a
            # stable revision nobody compares anything with yet.
            self.say(
                f"   generating traffic: {s.requests_per_second:.0f} requests/s of held-out prompts"
            )
            await self.traffic.start()
            self.apply("assistant.yaml", modeldeployment("assistant-v2", s))
            await self.wait("canary v2 -> promoted", self._stable_is("assistant-v2"))

            fault = f"{float(FAULT_ERROR_RATE):.0%}"
            self.say(
                f"== 5. a broken revision: its server fails {fault} of requests (fault injection)"
            )
            self.apply("assistant.yaml", modeldeployment("assistant-v2", s, fault=True))
            await self.wait("broken canary -> rolled back", self._rolled_back)
            # Requests already in flight when the weight went to 0 may still land; count from
            # a moment later (a request takes well under a second here).
            await self.runtime.run(timeout=1.0, on_tick=self._tick)
            at_rollback = {rev: sum(c.values()) for rev, c in self.traffic.stats.codes.items()}
            # Let the rolled-back revision drain and go (scaleDownDelaySeconds).
            await self.runtime.run(until=self.runtime.settled, timeout=30, on_tick=self._tick)
            for rejected in self.mdep_status().get("rejectedRevisions") or []:
                name = rejected["name"]
                seen = sum(self.traffic.stats.codes.get(name, {}).values())
                self.requests_after_rollback[name] = seen - at_rollback.get(name, 0)
            self.summary.ok = True
            if self.keep_serving:
                await self.traffic.stop()
                self.traffic_stopped = True
                self._collect()
                self.say(f"serving {MDEP} at {self.router_url()}/v1 until Ctrl-C")
                await self.runtime.run(on_tick=self._tick)
        except KeyboardInterrupt:
            self.summary.interrupted = True
        finally:
            if self.traffic is not None and not self.traffic_stopped:
                with contextlib.suppress(Exception):
                    await self.traffic.stop()
            self._collect()
            await self.runtime.stop()
            uninstall()
        return self.summary

    def _remember_revisions(self) -> None:
        """Note each revision's source the first time it shows up as stable or canary."""
        obj = self.store.get("ModelDeployment", MDEP) or {}
        status = obj.get("status") or {}
        for role in ("stable", "canary"):
            rev = status.get(role) or {}
            if rev.get("name") and rev["name"] not in self.summary.revisions_seen:
                source = rev.get("fineTuneJob") or rev.get("adapterUri") or "-"
                env = (obj.get("spec", {}).get("server") or {}).get("env") or []
                if role == "canary" and env:
                    source += " + " + ",".join(f"{e['name']}={e['value']}" for e in env)
                self.summary.revisions_seen[rev["name"]] = source

    def _collect(self) -> None:
        """Fill the summary from the store and the traffic counters."""
        for ftj in self.store.list("FineTuneJob"):
            status = ftj.get("status") or {}
            self.summary.jobs[ftj["metadata"]["name"]] = {
                "phase": status.get("phase"),
                "steps": (status.get("progress") or {}).get("step"),
                "metrics": status.get("metrics") or {},
                "artifact": (status.get("artifact") or {}).get("uri"),
                "start": status.get("startTime"),
                "end": status.get("completionTime"),
            }
        status = self.mdep_status()
        self.summary.final_status = status
        if self.traffic is not None:
            self.summary.traffic = {
                rev: {
                    "codes": dict(codes),
                    "correct": self.traffic.stats.correct[rev],
                    "answered": self.traffic.stats.answered[rev],
                }
                for rev, codes in self.traffic.stats.codes.items()
            }


# --- the closing table ---------------------------------------------------------------------------


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_summary(summary: Summary, total_seconds: float) -> str:
    """The closing summary table."""
    out = ["", "== summary"]
    rows = [
        [
            "FineTuneJob",
            "phase",
            "steps",
            "train loss",
            "eval loss",
            "eval accuracy (over the run)",
            "reused",
        ]
    ]
    for name, job in sorted(summary.jobs.items()):
        m = job["metrics"]
        history = summary.accuracy_history.get(name) or []
        acc = (
            " -> ".join(f"{a:.0%}" for a in _sparse(history))
            if history
            else (f"{m['evalAccuracy']:.0%}" if m.get("evalAccuracy") is not None else "-")
        )
        rows.append(
            [
                name,
                str(job["phase"]),
                str(job["steps"] or "-"),
                f"{m['trainLoss']:.3f}" if m.get("trainLoss") is not None else "-",
                f"{m['evalLoss']:.3f}" if m.get("evalLoss") is not None else "-",
                acc,
                "yes" if name in summary.reused else "no",
            ]
        )
    out.append(_table(rows))
    status = summary.final_status
    stable = (status.get("stable") or {}).get("name")
    rejected = {r["name"]: r.get("reason", "") for r in status.get("rejectedRevisions") or []}
    weights = status.get("weights") or {}
    rows = [
        ["revision", "source", "outcome", "weight now", "requests (2xx/5xx)", "answers correct"]
    ]
    for rev in [*summary.revisions_seen, *summary.traffic, *rejected]:
        if rev in ("none",) or any(r[0] == rev for r in rows):
            continue
        traffic = summary.traffic.get(rev, {"codes": {}, "correct": 0, "answered": 0})
        codes = traffic["codes"]
        ok = sum(v for k, v in codes.items() if 200 <= int(k) < 300)
        bad = sum(v for k, v in codes.items() if int(k) >= 500)
        outcome = "stable" if rev == stable else ("rolled back" if rev in rejected else "replaced")
        weight = f"{weights.get('stable', 100)}%" if rev == stable else "0%"
        correct = f"{traffic['correct'] / traffic['answered']:.0%}" if traffic["answered"] else "-"
        source = summary.revisions_seen.get(rev) or _source_of(status, rev)
        rows.append([rev, source, outcome, weight, f"{ok}/{bad}", correct])
    out.append("")
    out.append(_table(rows))
    for rev, reason in rejected.items():
        out.append(f"  {rev} rolled back: {reason}")
    out.append("")
    out.append(
        "time: "
        + ", ".join(f"{p} {s:.0f}s" for p, s in summary.phases)
        + f"; total {total_seconds:.0f}s"
    )
    return "\n".join(out)


def _sparse(values: list[float], keep: int = 6) -> list[float]:
    """At most ``keep`` values, always the first and the last, evenly spaced in between."""
    if len(values) <= keep:
        return values
    picks = {round(i * (len(values) - 1) / (keep - 1)) for i in range(keep)}
    return [values[i] for i in sorted(picks)]


def _source_of(status: dict[str, Any], rev: str) -> str:
    for role in ("stable", "canary"):
        r = status.get(role) or {}
        if r.get("name") == rev:
            return r.get("fineTuneJob") or r.get("adapterUri") or "-"
    return "-"


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``kubetune demo``."""
    work = Path(args.dir or ".kubetune/demo").resolve()
    settings = DemoSettings.fast() if args.fast else DemoSettings()
    if getattr(args, "prepare_only", False):
        prepare(work, settings)
        for name, text in render_examples(work).items():
            path = work / "manifests" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        print(f"manifests in {work / 'manifests'}; run them with:")
        print(
            f"  kubetune local apply -f {work / 'manifests'}          # fine-tune v1 and v2, deploy v1"
        )
        print(
            f"  kubetune local apply -f {work / 'manifests' / 'steps' / 'canary.yaml'}  # canary v2 (another terminal)"
        )
        return 0
    started = time.monotonic()
    story = Story(work, settings, keep_serving=args.keep_serving)
    print(f"kubetune demo: working in {work} (state, artifacts, logs); Ctrl-C stops everything")
    try:
        summary = asyncio.run(story.run())
    except (TimeoutError, RuntimeError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        print(f"logs of every process: {story.store.root / 'run'}/*/log.txt", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before the controller started (while building the model): nothing runs yet.
        print("\ninterrupted")
        return 130
    total = time.monotonic() - started
    print(render_summary(summary, total))
    (work / "summary.json").write_text(json.dumps(summary.__dict__, indent=2, default=str))
    if summary.interrupted:
        print(
            "interrupted: every process was stopped; re-run `make demo` to continue (finished work is reused)"
        )
        return 130
    return 0 if summary.ok else 1
