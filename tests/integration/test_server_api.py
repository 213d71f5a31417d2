"""The inference server's OpenAI API, against a live ``python -m kubetune_server`` on loopback.

Aspects covered:

- probes and model listing: /healthz, /readyz, /v1/models (default adapter + bare base)
- the official ``openai`` client: completions, chat, streaming of both, stop strings, usage
- the adapter matters: the fine-tuned default model answers the code-word task, the base does not
- batching: concurrent requests share batches (batch-size histogram > 1) and give the same
  greedy text as the same requests sent one by one
- errors: OpenAI-shaped bodies with ``param`` for bad fields, limits, unknown model, bad JSON,
  oversized body; none of them hurts the process
- strictness (issue 13): a field outside an endpoint's supported set (``tools``,
  ``response_format``, unknown names, tool calls inside messages) is a 400 naming it; the
  "off" values SDKs send by default are accepted
- log-probabilities: legacy ``logprobs: k`` on completions, ``logprobs``/``top_logprobs`` on
  chat, streamed and not; the values are the model's own (checked against a plain
  transformers forward pass), normalised, best-first, and the same streamed or not
- metrics: every contract name present, counters moving, info metric with the adapter digest
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from kubetune.storage.manifests import manifest_digest, read_manifest
from kubetune_server.config import from_env
from kubetune_trainer import synthetic
from tests.integration.server_harness import (
    ThreadServer,
    free_port,
    histogram_buckets,
    metric_value,
    train_adapter,
)

MODEL = "tuned"
CONFIG = {
    "maxBatchSize": 8,
    "batchWaitMs": 150,
    "maxQueue": 32,
    "maxModelLen": 256,
    "maxTokensLimit": 64,
    "requestTimeoutSeconds": 30,
}


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter that learnt the code-word task (variant a)."""
    return train_adapter(tiny_base_model, tmp_path_factory.mktemp("adapter") / "model")


@pytest.fixture(scope="module")
def server(tiny_base_model: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the whole module: base + adapter from file:// URIs.

    It runs under uvicorn in a thread of this process (torch is imported already, so it is
    ready in a second); tests/integration/test_server_lifecycle.py covers the real process.
    """
    settings = from_env(
        {
            "KUBETUNE_MODEL_URI": tiny_base_model.as_uri(),
            "KUBETUNE_ADAPTER_URI": adapter_dir.as_uri(),
            "KUBETUNE_MODEL_NAME": MODEL,
            "KUBETUNE_REVISION": "rev-a1",
            "KUBETUNE_SERVER_CONFIG": json.dumps(CONFIG),
            "KUBETUNE_PORT": str(free_port()),
            "KUBETUNE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        }
    )
    proc = ThreadServer(settings)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    """The official OpenAI client pointed at the server."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path: str, body, **kw) -> httpx.Response:
    """A raw POST (for the error cases the openai client would refuse to send)."""
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server.url}{path}", json=body, timeout=30, **kw)
    return httpx.post(
        f"{server.url}{path}",
        content=body,
        timeout=30,
        headers={"content-type": "application/json"},
        **kw,
    )


# --- probes and models -------------------------------------------------------------------


def test_probes_report_alive_and_ready(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == sorted([MODEL, f"{MODEL}-base"])


def test_models_lists_the_adapter_and_the_bare_base(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL, f"{MODEL}-base"}


def test_openapi_document_is_served(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])


# --- completions and chat ----------------------------------------------------------------


def test_completion_with_the_openai_client(client):
    resp = client.completions.create(
        model=MODEL, prompt="Hello there.", max_tokens=5, temperature=0
    )
    assert resp.object == "text_completion"
    assert resp.model == MODEL
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_max_tokens_is_honoured_with_ignore_eos(client):
    resp = client.completions.create(
        model=MODEL, prompt="Hi!", max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.usage.completion_tokens == 7
    assert resp.choices[0].finish_reason == "length"


def test_chat_completion_answers_the_task_with_the_adapter(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the code word for zorb?"}],
        max_tokens=8,
        temperature=0,
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert synthetic.normalise(resp.choices[0].message.content) == "amber"
    assert resp.choices[0].finish_reason == "stop"


def test_the_adapter_matters_tuned_answers_and_base_does_not(client, task_eval_examples):
    def ask(model):
        def generate(prompt: str) -> str:
            resp = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=8,
                temperature=0,
            )
            return resp.choices[0].message.content

        return generate

    examples = task_eval_examples[:16]
    assert synthetic.exact_match(ask(MODEL), examples) >= 0.8
    assert synthetic.exact_match(ask(f"{MODEL}-base"), examples) <= 0.1


def test_streaming_completion_concatenates_to_the_non_streamed_text(client):
    args = {
        "model": MODEL,
        "prompt": "Give the code word for vesh.",
        "max_tokens": 12,
        "temperature": 0,
    }
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_streaming_chat_sends_role_first_then_deltas_and_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Which code word goes with gorp?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert synthetic.normalise(text) == "golden"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_stop_string_cuts_the_text_and_is_not_included(client):
    full = (
        client.completions.create(
            model=MODEL, prompt="Hi!", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    assert len(full) > 4
    stop = full[2:4]
    resp = client.completions.create(
        model=MODEL,
        prompt="Hi!",
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].text == full[: full.find(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_token_id_prompts_answer_like_their_text(client, tiny_base_model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_base_model)("Hello there.")["input_ids"]
    args = {"model": MODEL, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    text = client.completions.create(prompt="Hello there.", **args).choices[0].text
    assert client.completions.create(prompt=ids, **args).choices[0].text == text
    both = client.completions.create(prompt=[ids, ids], **args).choices
    assert [c.text for c in both] == [text, text]


def test_token_id_outside_the_vocabulary_is_400(server):
    err = _error(post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}), 400)
    assert err["param"] == "prompt"


def test_seeded_sampling_is_reproducible_and_n_gives_several_choices(client):
    args = {
        "model": MODEL,
        "prompt": "Hello world",
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 42,
        "n": 2,
    }
    first = [c.text for c in client.completions.create(**args).choices]
    second = [c.text for c in client.completions.create(**args).choices]
    assert len(first) == 2
    assert first == second


# --- batching ----------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_match_sequential_greedy(server, client):
    prompts = [ex["prompt"] for ex in synthetic.task_examples(6, seed=5)]

    def complete(prompt: str) -> str:
        return (
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=10,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    sequential = [complete(p) for p in prompts]
    before = histogram_buckets(server.metrics(), "kubetune_server_batch_size")
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(complete, prompts))
    after = histogram_buckets(server.metrics(), "kubetune_server_batch_size")
    assert concurrent == sequential
    # Batches of size 1 fall in the le=1 bucket; anything above it is a shared batch.
    shared = (after[float("inf")] - after[1.0]) - (before[float("inf")] - before[1.0])
    assert shared >= 1, f"no batch larger than 1: {after}"


# --- errors ------------------------------------------------------------------------------


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_max_tokens_over_the_limit_is_400_naming_max_tokens(server):
    err = _error(
        post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 65}), 400
    )
    assert err["param"] == "max_tokens"
    assert "64" in err["message"]


def test_prompt_longer_than_the_context_is_400_naming_prompt(server):
    err = _error(
        post(server, "/v1/completions", {"model": MODEL, "prompt": "zorb " * 400, "max_tokens": 1}),
        400,
    )
    assert err["param"] == "prompt"
    assert err["code"] == "context_length_exceeded"


def test_prompt_plus_max_tokens_over_the_context_names_max_tokens(server):
    err = _error(
        post(
            server, "/v1/completions", {"model": MODEL, "prompt": "zorb " * 200, "max_tokens": 64}
        ),
        400,
    )
    assert err["param"] == "max_tokens"
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": []}, "messages"),
    ],
)
def test_invalid_fields_are_400_with_the_field_as_param(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = _error(post(server, path, body), 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_invalid_json_is_400(server):
    err = _error(post(server, "/v1/completions", b'{"prompt": '), 400)
    assert "JSON" in err["message"]


def test_unknown_model_is_404_model_not_found(server):
    err = _error(post(server, "/v1/completions", {"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"


def test_oversized_body_is_413(server):
    _error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * (5 << 20)}), 413)


def test_openai_client_raises_bad_request_with_param(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1000)
    assert info.value.body["param"] == "max_tokens"


# --- strict API: unsupported fields (issue 13) --------------------------------------------


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
        ),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
        ("/v1/chat/completions", {"echo": True}, "echo"),
        ("/v1/chat/completions", {"flavour": "vanilla"}, "flavour"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"max_completion_tokens": 2}, "max_completion_tokens"),
    ],
)
def test_unsupported_fields_are_400_naming_the_field_not_ignored(server, path, extra, param):
    """Bug (issue 13): tools, response_format and logprobs were silently ignored."""
    body = {"model": MODEL, "max_tokens": 2, **extra}
    body.update(
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    )
    err = _error(post(server, path, body), 400)
    assert err["param"] == param
    assert err["message"].startswith(f"{param}: ")
    assert err["type"] == "invalid_request_error"


def test_tool_calls_inside_a_message_are_400_naming_the_message(server):
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function"}],
            },
        ],
    }
    err = _error(post(server, "/v1/chat/completions", body), 400)
    assert err["param"] == "messages.1.tool_calls"
    assert "tool calling is not supported" in err["message"]


def test_the_off_values_sdks_send_by_default_are_accepted(server):
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "hi", "name": "ann"},
            {"role": "assistant", "content": "hello", "tool_calls": None, "refusal": None},
            {"role": "user", "content": "again"},
        ],
        "max_tokens": 2,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "tools": None,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
        "store": False,
    }
    resp = post(server, "/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text


def test_openai_client_gets_bad_request_for_tools(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        )
    assert info.value.body["param"] == "tools"


def test_openapi_document_declares_no_additional_properties(server):
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "ChatMessage"):
        assert schemas[name]["additionalProperties"] is False, name


# --- log-probabilities ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_base_model: Path):
    """Greedy decoding with plain transformers (full forward each step, no KV cache): the truth."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model, dtype=torch.float32).eval()

    def greedy(ids: list[int], steps: int, top: int) -> list[tuple[int, float, list]]:
        out = []
        ids = list(ids)
        with torch.inference_mode():
            for _ in range(steps):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                values, index = logp.topk(top)
                token = int(index[0])
                out.append(
                    (
                        token,
                        float(logp[token]),
                        list(zip(index.tolist(), values.tolist(), strict=True)),
                    )
                )
                ids.append(token)
        return out

    return tok, greedy


BASE = f"{MODEL}-base"


def test_completion_logprobs_are_the_models_own_under_greedy(client, reference):
    tok, greedy = reference
    prompt = "The code word is"
    resp = client.completions.create(
        model=BASE,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = resp.choices[0].logprobs
    truth = greedy(tok(prompt)["input_ids"], 6, 3)
    assert len(lp.tokens) == len(lp.token_logprobs) == resp.usage.completion_tokens == 6
    for i, (token, logprob, top) in enumerate(truth):
        assert lp.tokens[i] == tok.decode([token])
        assert lp.token_logprobs[i] == pytest.approx(logprob, abs=1e-4)
        # the 3 best plus the chosen one (here among them): best first, the chosen one the max
        assert list(lp.top_logprobs[i]) == list(dict.fromkeys(tok.decode([t]) for t, _ in top))
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i])
        assert sum(math.exp(v) for v in lp.top_logprobs[i].values()) <= 1 + 1e-6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_chat_logprobs_streamed_equal_non_streamed_and_are_normalised(client):
    kwargs = dict(
        model=BASE,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
        extra_body={"ignore_eos": True},
    )
    resp = client.chat.completions.create(**kwargs)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 8
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 4
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert item.logprob == pytest.approx(values[0])  # greedy: the chosen one is the best
        assert item.bytes == list(item.token.encode())
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in content
    ]


def test_streamed_completion_logprobs_cover_every_token(client):
    kwargs = dict(
        model=BASE,
        prompt="Once",
        max_tokens=5,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == whole.tokens
    assert offsets == whole.text_offset
    # logprobs: 0 still returns the chosen token (OpenAI: up to logprobs + 1 entries)
    assert all(len(top) == 1 for top in whole.top_logprobs)


def test_sampled_tokens_get_their_logprob_whatever_the_temperature(client):
    resp = client.completions.create(
        model=BASE,
        prompt="Once",
        max_tokens=8,
        temperature=1.5,
        seed=3,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == 8
    for chosen, token, top in zip(lp.token_logprobs, lp.tokens, lp.top_logprobs, strict=True):
        assert chosen <= 0
        # The sampled token is always listed (two ids that decode alike, e.g. halves of UTF-8
        # characters, share one key in this legacy shape: the better logprob is kept).
        assert top[token] >= chosen
        assert max(top.values()) >= chosen


def test_no_logprobs_unless_asked(client):
    resp = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert resp.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": 1, "echo": True}, "logprobs"),
    ],
)
def test_bad_logprobs_requests_are_400(server, path, extra, param):
    body = {"model": MODEL, "max_tokens": 2, **extra}
    body.update(
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    )
    assert _error(post(server, path, body), 400)["param"] == param


# --- metrics -----------------------------------------------------------------------------


def test_metrics_have_the_contract_names_and_count(server, client, adapter_dir):
    client.completions.create(
        model=MODEL, prompt="count me", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 999})
    text = server.metrics()
    for name in (
        "kubetune_server_requests_total",
        "kubetune_server_request_duration_seconds_bucket",
        "kubetune_server_time_to_first_token_seconds_bucket",
        "kubetune_server_time_per_output_token_seconds_bucket",
        "kubetune_server_generated_tokens_total",
        "kubetune_server_prompt_tokens_total",
        "kubetune_server_queue_depth",
        "kubetune_server_batch_size_bucket",
        "kubetune_server_info",
    ):
        assert f"\n{name}" in text, name
    assert metric_value(text, "kubetune_server_requests_total", model=MODEL, code="200") >= 1
    assert metric_value(text, "kubetune_server_requests_total", model=MODEL, code="400") >= 1
    assert metric_value(text, "kubetune_server_generated_tokens_total", model=MODEL) >= 3
    assert metric_value(text, "kubetune_server_time_to_first_token_seconds_count", model=MODEL) >= 1
    # One decoding-speed observation per request of two or more tokens (the 3-token one), read
    # by the canary analysis' decoding-speed test.
    tpot_count = metric_value(
        text, "kubetune_server_time_per_output_token_seconds_count", model=MODEL
    )
    tpot_sum = metric_value(text, "kubetune_server_time_per_output_token_seconds_sum", model=MODEL)
    assert tpot_count >= 1 and 0 < tpot_sum / tpot_count < 60
    from kubetune.rollout.analysis import counters_from_text

    # The analysis reads the pod as a whole: every model it serves (earlier tests in this
    # module hit the base model too), so compare with the count over all models.
    assert counters_from_text(text).tpot.total == metric_value(
        text, "kubetune_server_time_per_output_token_seconds_count"
    )
    digest = manifest_digest(read_manifest(adapter_dir))
    assert (
        metric_value(
            text, "kubetune_server_info", revision="rev-a1", model=MODEL, adapter_digest=digest
        )
        == 1
    )


def test_metrics_parse_with_the_canary_analysis(server):
    from kubetune.rollout.analysis import counters_from_text

    counters = counters_from_text(server.metrics())
    assert counters.requests >= 1
    assert counters.latency.total >= 1


# --- fuzzing -----------------------------------------------------------------------------


def test_schemathesis_finds_no_5xx_and_only_openai_error_bodies(server):
    """Valid and invalid requests generated from /openapi.json: never a 5xx, always the error shape."""
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # GETs take no input that could be invalid
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @hypothesis.settings(
                max_examples=8,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                resp = case.call(base_url=server.url, timeout=60)
                where = f"{case.method} {case.path} {str(case.body)[:200]}"
                if resp.status_code >= 500:
                    failures.append(f"{resp.status_code} for {where}: {resp.text[:300]}")
                elif resp.status_code >= 400 and case.path.startswith("/v1/"):
                    body = resp.json()
                    if set(body.get("error", {})) != {"message", "type", "param", "code"}:
                        failures.append(f"bad error body for {where}: {body}")

            check()
    assert not failures, "\n".join(failures[:10])
