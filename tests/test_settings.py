"""`tsjax serve` settings: the shipped file parses, precedence is file < environment < flags,
and bad values are refused with the setting's name before anything loads."""

from __future__ import annotations

import argparse

import pytest

from serve.settings import DEFAULT_CONFIG, FIELDS, add_serve_args, load_settings, settings_from_args


def test_shipped_config_names_every_setting():
    text = DEFAULT_CONFIG.read_text()
    missing = [f for f in FIELDS if f not in text]
    assert not missing, f"configs/server.toml does not mention {missing}"
    load_settings(DEFAULT_CONFIG, environ={})


def test_file_then_environment_then_flags(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[server]\nrows = 4\nport = 6000\nquant = "int8"\n')
    env = {"TSJAX_PORT": "7000", "TSJAX_TEMPERATURE": "0.2"}
    s = load_settings(cfg, environ=env)
    assert (s.rows, s.port, s.temperature, s.quant) == (4, 7000, 0.2, "int8")
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--config", str(cfg), "--port", "8000", "--max-len", "512"])
    s = settings_from_args(args)
    assert (s.rows, s.port, s.max_len, s.quant) == (4, 8000, 512, "int8")


def test_weight_format_defaults_to_auto():
    """The default weight format is chosen per platform and file ("auto"); "f32" asks for the
    exact float weights."""
    assert load_settings(None, environ={}).quant == "auto"
    assert load_settings(None, environ={"TSJAX_QUANT": "f32"}).quant == "f32"


@pytest.mark.parametrize(
    "env,name",
    [
        ({"TSJAX_QUANT": "int4"}, "quant"),
        ({"TSJAX_ROWS": "0"}, "rows"),
        ({"TSJAX_MESH": "xx=2"}, "mesh"),
    ],
)
def test_bad_values_name_the_setting(env, name):
    with pytest.raises(ValueError, match=name):
        load_settings(None, environ=env)


def test_access_settings_from_file_environment_and_flags(tmp_path):
    """API keys and CORS origins: a list in the file (one string is accepted), comma-separated
    in the environment, repeatable flags; keys with spaces around them are refused."""
    cfg = tmp_path / "s.toml"
    cfg.write_text('[server]\napi_key = "k1"\ncors_origins = ["https://a.example"]\n')
    s = load_settings(cfg, environ={})
    assert (s.api_key, s.cors_origins, s.metrics_auth) == (["k1"], ["https://a.example"], False)
    s = load_settings(cfg, environ={"TSJAX_API_KEY": "k2, k3", "TSJAX_METRICS_AUTH": "true"})
    assert (s.api_key, s.metrics_auth) == (["k2", "k3"], True)
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--config", str(cfg), "--api-key", "a", "--api-key", "b",
                              "--cors-origin", "*", "--metrics-auth"])  # fmt: skip
    s = settings_from_args(args)
    assert (s.api_key, s.cors_origins, s.metrics_auth) == (["a", "b"], ["*"], True)
    assert load_settings(None, environ={}).api_key == []
    cfg.write_text('[server]\napi_key = [" padded"]\n')
    with pytest.raises(ValueError, match="api_key"):
        load_settings(cfg, environ={})
