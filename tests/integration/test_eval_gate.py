"""The eval gate's one I/O path (kubetune.k8s.scraping.run_eval_gate), against real servers.

Both runtimes call ``run_eval_gate``: the operator with its pods' IPs, the local runtime with
its replicas' ports. Aspects covered, each against a real completions server on loopback:

- the prompts of an ``s3://`` ``promptsUri`` (a real S3 protocol server, moto) are sent and
  scored: the operator reads the file, it no longer refuses it;
- a bad prompts file is an error naming the field path, the file and the line, and no prompt
  is sent; an unreadable one names the field path and the URI;
- the first prompt goes alone, the rest concurrently (a server that answers only once two
  requests are in flight together still answers them all);
- stable is scored too when ``maxScoreDrop`` asks for it; a revision with no ready pod is an
  error naming it; a key the runtime could not find is the gate's error, after the prompts;
- the real operator (KopfRunner against kmock) gates a canary on a ``promptsUri`` file: wrong
  answers roll it back before it gets traffic, and a bad file shows in status.message with the
  field path, the file and the line while the canary waits at weight 0.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from kubetune.k8s import scraping
from kubetune.storage import open_store
from tests.integration import test_operator_rollout as rollout
from tests.integration.test_operator_rollout import (
    API,
    NS,
    TIMEOUT,
    manifest,
    play_deployment,
    revision,
    wait_phase,
)
from tests.plugins.kube import wait_for_object

servers = rollout.servers  # the fake model servers fixture of the operator's rollout tests


class Completions:
    """A /v1/completions server that answers from a table (or holds requests in pairs)."""

    def __init__(self, answers: dict[str, str], pairs: bool = False) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.pairs = pairs
        self._waiting: list[asyncio.Future] = []

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.asked.append(body["prompt"])
        if self.pairs and len(self.asked) > 1:
            # After the first prompt, answer only once a second request is in flight with it.
            future = asyncio.get_running_loop().create_future()
            self._waiting.append(future)
            if len(self._waiting) % 2 == 0:
                for f in self._waiting[-2:]:
                    f.set_result(None)
            await future
        return web.json_response({"choices": [{"text": self.answers.get(body["prompt"], "?")}]})

    async def start(self) -> str:
        app = web.Application()
        app.add_routes([web.post("/v1/completions", self.complete)])
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


def mdep(gate: dict, storage: dict | None = None) -> dict:
    spec = {
        "model": {"baseModel": {"uri": "s3://models/base"}, "name": "chat-model"},
        "rollout": {"evalGate": gate},
    }
    if storage:
        spec["storage"] = storage
    return {
        "metadata": {"name": "chat"},
        "spec": spec,
        "status": {"stable": {"name": "old"}, "canary": {"name": "new"}},
    }


def jsonl(pairs: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"prompt": p, "expected": e}) + "\n" for p, e in pairs)


@pytest.fixture()
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def test_the_prompts_of_an_s3_prompts_uri_are_sent_and_scored(session, s3_bucket, s3_storage):
    open_store(f"s3://{s3_bucket}/gates", s3_storage).write_text(
        "golden.jsonl", jsonl([("France?", "Paris"), ("Peru?", "Lima")])
    )
    server = Completions({"France?": "Paris", "Peru?": "no idea"})
    url = await server.start()
    try:
        md = mdep(
            {"promptsUri": f"s3://{s3_bucket}/gates/golden.jsonl", "match": "exact"},
            {"endpoint": s3_storage.endpoint, "region": s3_storage.region},
        )
        got = await scraping.run_eval_gate(session, md, ("new", False), lambda rev: [url])
    finally:
        await server.runner.cleanup()
    assert (got.revision, got.canary_score, got.error, got.prompts) == ("new", 0.5, None, 2)
    assert sorted(server.asked) == ["France?", "Peru?"]


async def test_a_bad_prompts_file_names_field_file_and_line_and_sends_nothing(session, tmp_path):
    bad = tmp_path / "golden.jsonl"
    bad.write_text(jsonl([("France?", "Paris")]) + '{"prompt": "Peru?"}\n')
    server = Completions({})
    url = await server.start()
    try:
        got = await scraping.run_eval_gate(
            session, mdep({"promptsUri": bad.as_uri()}), ("new", False), lambda rev: [url]
        )
        missing = await scraping.run_eval_gate(
            session,
            mdep({"promptsUri": (tmp_path / "nope.jsonl").as_uri()}),
            ("new", False),
            lambda rev: [url],
        )
    finally:
        await server.runner.cleanup()
    assert got.canary_score is None and got.error == (
        f"spec.rollout.evalGate.promptsUri: {bad.as_uri()} line 2: expected: Field required"
    )
    assert missing.canary_score is None
    assert missing.error.startswith(
        f"spec.rollout.evalGate.promptsUri: {(tmp_path / 'nope.jsonl').as_uri()}: "
    )
    assert server.asked == []


async def test_after_the_first_prompt_the_rest_go_concurrently(session):
    prompts = [{"prompt": f"q{i}", "expected": f"a{i}"} for i in range(5)]
    server = Completions({f"q{i}": f"a{i}" for i in range(5)}, pairs=True)
    url = await server.start()
    try:
        # One after another, the second prompt would wait for ever for a partner (deadlock).
        got = await asyncio.wait_for(
            scraping.run_eval_gate(
                session, mdep({"prompts": prompts}), ("new", False), lambda rev: [url]
            ),
            timeout=30,
        )
    finally:
        await server.runner.cleanup()
    assert server.asked[0] == "q0"
    assert (got.canary_score, got.prompts) == (1.0, 5)


async def test_stable_is_scored_for_max_score_drop_and_missing_pods_are_named(session):
    gate = {"prompts": [{"prompt": "France?", "expected": "Paris"}], "maxScoreDrop": 0.1}
    canary, stable = Completions({"France?": "Rome"}), Completions({"France?": "Paris"})
    urls = {"new": await canary.start(), "old": await stable.start()}
    try:
        got = await scraping.run_eval_gate(
            session, mdep(gate), ("new", True), lambda rev: [urls[rev]]
        )
        no_pods = await scraping.run_eval_gate(session, mdep(gate), ("new", True), lambda rev: [])
        no_key = await scraping.run_eval_gate(
            session,
            mdep(gate),
            ("new", True),
            lambda rev: [urls[rev]],
            key_error="spec.server.apiKeySecret: Secret 'keys' key 'apiKey': not found",
        )
    finally:
        await canary.runner.cleanup()
        await stable.runner.cleanup()
    assert (got.canary_score, got.stable_score) == (0.0, 1.0)
    assert no_pods.error == "no ready pod of revision new to run the golden prompts against"
    assert no_key.canary_score is None and no_key.error.startswith("spec.server.apiKeySecret")


# --- the real operator ----------------------------------------------------------------------


async def test_the_operator_gates_a_canary_on_a_prompts_uri_file(kube, operator, servers, tmp_path):
    golden = tmp_path / "golden.jsonl"
    golden.write_text(jsonl([("What is the code word?", "zebra")]))
    gate = {"promptsUri": golden.as_uri(), "minScore": 1.0}
    md_a = manifest("s3://models/a", gate=gate)
    await kube.create(md_a)
    await play_deployment(kube, f"chat-{revision(md_a)}", await servers())
    await wait_phase(kube, "Healthy")
    # A canary answering wrong: rolled back by the gate before any traffic.
    md_b = manifest("s3://models/b", gate=gate)
    wrong = await servers()
    wrong.answer = "I do not know"
    await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_b["spec"]})
    await play_deployment(kube, f"chat-{revision(md_b)}", wrong)
    obj = await wait_phase(kube, "RolledBack")
    assert obj["status"]["rejectedRevisions"][0]["reason"].startswith("EvalGateFailed")
    assert obj["status"]["evalGateScore"] == 0.0 and wrong.requests == 0
    # A bad prompts file: the canary waits at weight 0, status names field, file and line.
    golden.write_text('{"prompt": "What is the code word?"}\n')
    md_c = manifest("s3://models/c", gate=gate)
    await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_c["spec"]})
    await play_deployment(kube, f"chat-{revision(md_c)}", await servers())
    needle = f"spec.rollout.evalGate.promptsUri: {golden.as_uri()} line 1: expected: Field required"
    obj = await wait_for_object(
        kube,
        API,
        "ModelDeployment",
        NS,
        "chat",
        lambda o: needle in ((o.get("status") or {}).get("message") or ""),
        timeout=TIMEOUT,
    )
    assert obj["status"]["weights"]["canary"] == 0 and "evalGateScore" not in obj["status"]
