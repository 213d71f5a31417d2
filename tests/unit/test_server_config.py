"""Server settings from the pod environment (docs/contracts.md, "Server pod environment").

Aspects covered: defaults, KUBETUNE_SERVER_CONFIG parsed with the API's ServerSpec (camelCase),
served names (default, extra adapters, ``-base``), and every bad value rejected with the
variable (and field) named.
"""

from __future__ import annotations

import json

import pytest

from kubetune_server.config import ConfigError, from_env


def test_defaults_from_a_minimal_environment():
    s = from_env({"KUBETUNE_MODEL_URI": "s3://bucket/runs/r1/model"})
    assert s.model_name == "model"
    assert s.base_name == "model"
    assert s.port == 8000
    assert s.server.max_batch_size == 8
    assert s.fault_error_rate == 0.0


def test_server_config_and_port_and_faults():
    s = from_env(
        {
            "KUBETUNE_MODEL_URI": "file:///m",
            "KUBETUNE_ADAPTER_URI": "s3://b/a",
            "KUBETUNE_MODEL_NAME": "tuned",
            "KUBETUNE_SERVER_CONFIG": json.dumps(
                {"maxBatchSize": 4, "batchWaitMs": 5, "port": 9000}
            ),
            "KUBETUNE_PORT": "8123",
            "KUBETUNE_FAULT_ERROR_RATE": "0.25",
            "KUBETUNE_FAULT_LATENCY_MS": "100",
            "KUBETUNE_ADAPTERS": json.dumps({"other": "file:///o"}),
        }
    )
    assert (s.server.max_batch_size, s.server.batch_wait_ms) == (4, 5)
    assert s.port == 8123  # KUBETUNE_PORT wins over server.port
    assert s.base_name == "tuned-base"
    assert s.adapters == {"other": "file:///o"}
    assert (s.fault_error_rate, s.fault_latency_ms) == (0.25, 100.0)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "KUBETUNE_MODEL_URI is required"),
        ({"KUBETUNE_MODEL_URI": "gs://b/m"}, "KUBETUNE_MODEL_URI"),
        ({"KUBETUNE_ADAPTER_URI": "relative/path"}, "KUBETUNE_ADAPTER_URI"),
        ({"KUBETUNE_ADAPTERS": "[1]"}, "KUBETUNE_ADAPTERS"),
        ({"KUBETUNE_ADAPTERS": '{"x": "ftp://a"}'}, "KUBETUNE_ADAPTERS.x"),
        ({"KUBETUNE_SERVER_CONFIG": "{"}, "KUBETUNE_SERVER_CONFIG: not valid JSON"),
        ({"KUBETUNE_SERVER_CONFIG": '{"maxQueue": 0}'}, "KUBETUNE_SERVER_CONFIG.maxQueue"),
        ({"KUBETUNE_SERVER_CONFIG": '{"dtype": "int3"}'}, "KUBETUNE_SERVER_CONFIG.dtype"),
        (
            {
                "KUBETUNE_SERVER_CONFIG": '{"mergeAdapter": true}',
                "KUBETUNE_ADAPTERS": '{"x": "file:///x"}',
            },
            "mergeAdapter",
        ),
        ({"KUBETUNE_PORT": "http"}, "KUBETUNE_PORT"),
        ({"KUBETUNE_FAULT_ERROR_RATE": "1.5"}, "KUBETUNE_FAULT_ERROR_RATE"),
        ({"KUBETUNE_FAULT_LATENCY_MS": "slow"}, "KUBETUNE_FAULT_LATENCY_MS"),
    ],
)
def test_bad_values_name_the_variable(env, needle):
    full = {"KUBETUNE_MODEL_URI": "file:///m", **env} if env != {} else {}
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        from_env(full)


def test_reads_the_server_config_the_rollout_builder_writes():
    from kubetune.api.modeldeployment import ServerSpec

    spec = ServerSpec.model_validate(
        {
            "maxBatchSize": 3,
            "mergeAdapter": True,
            "env": [{"name": "KUBETUNE_FAULT_ERROR_RATE", "value": "0.5"}],
        }
    )
    # The builder sets json.dumps(spec.server.dump(), sort_keys=True).
    s = from_env(
        {
            "KUBETUNE_MODEL_URI": "file:///m",
            "KUBETUNE_SERVER_CONFIG": json.dumps(spec.dump(), sort_keys=True),
        }
    )
    assert s.server == spec


def test_api_key_is_read_and_kept_out_of_the_settings_repr():
    settings = from_env({"KUBETUNE_MODEL_URI": "file:///m", "KUBETUNE_API_KEY": " s3cr3t-key\n"})
    assert settings.api_key == "s3cr3t-key"
    assert "s3cr3t" not in repr(settings)
    assert from_env({"KUBETUNE_MODEL_URI": "file:///m"}).api_key is None
    with pytest.raises(ConfigError, match="KUBETUNE_API_KEY is set but empty"):
        from_env({"KUBETUNE_MODEL_URI": "file:///m", "KUBETUNE_API_KEY": ""})
