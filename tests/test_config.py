"""Configuration layers and the CLI's answers to bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wirehub import config as config_module
from wirehub.config import Config, ConfigError


def test_defaults():
    cfg = config_module.load(environ={})
    assert (cfg.host, cfg.port, cfg.ws_path, cfg.max_payload_bytes) == ("127.0.0.1", 8080, "/ws", 1 << 20)
    assert cfg.max_subscriptions_per_connection == 128


def test_precedence_file_env_flags(tmp_path):
    path = tmp_path / "wirehub.toml"
    path.write_text('port = 9000\nhost = "0.0.0.0"\nmax_channel_length = 64\n')
    cfg = config_module.load(str(path), environ={"WIREHUB_PORT": "9100", "WIREHUB_ECHO": "true"},
                             overrides={"max_channel_length": "32"})
    assert (cfg.host, cfg.port, cfg.echo, cfg.max_channel_length) == ("0.0.0.0", 9100, True, 32)


@pytest.mark.parametrize("kwargs, message", [
    ({"environ": {"WIREHUB_PORT": "eighty"}},
     "invalid configuration: port (from environment variable WIREHUB_PORT): Expected `int`, got `str`"),
    ({"environ": {}, "overrides": {"port": "70000"}},
     "invalid configuration: port (from --port): Expected `int` <= 65535"),
    ({"environ": {}, "overrides": {"log_level": "loud"}},
     "invalid configuration: log_level (from --log-level): Invalid enum value 'loud' "
     "(choose from: debug, info, warning, error)"),
    ({"environ": {}, "overrides": {"max_payload_bytes": "8388608"}},
     "invalid configuration: high_water_bytes (4194304) must exceed max_payload_bytes (8388608)"),
])
def test_errors_name_the_key_and_source(kwargs, message):
    with pytest.raises(ConfigError) as exc:
        config_module.load(**kwargs)
    assert str(exc.value).startswith(message)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match=f"config file {path}: unknown key 'prot'"):
        config_module.load(str(path), environ={})


def test_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("port = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config_module.load(str(path), environ={})


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file /nonexistent.toml"):
        config_module.load("/nonexistent.toml", environ={})


def test_every_field_is_documented():
    assert set(config_module.HELP) == set(Config.__struct_fields__)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wirehub", *args], capture_output=True, text=True, timeout=30)


def test_serve_help_lists_every_option_with_defaults():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for name in Config.__struct_fields__:
        assert "--" + name.replace("_", "-") in result.stdout
    assert "(default: 8080; env WIREHUB_PORT)" in " ".join(result.stdout.split())
    assert "examples:" in result.stdout


def test_bad_config_exits_2_with_a_message():
    result = run_cli("serve", "--max-payload-bytes", "-5")
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "wirehub: invalid configuration: max_payload_bytes (from --max-payload-bytes): Expected `int` >= 1"


def test_port_in_use_is_reported(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = run_cli("serve", "--port", str(s.getsockname()[1]))
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr


def test_list_options_from_file_env_and_flags(tmp_path):
    path = tmp_path / "wirehub.toml"
    path.write_text('jwt_secret = "s"\ndefault_subscribe = ["public.*"]\n')
    assert config_module.load(str(path), environ={}).default_subscribe == ["public.*"]
    cfg = config_module.load(str(path), environ={"WIREHUB_JWT_ALGORITHMS": "HS256, HS512"})
    assert cfg.jwt_algorithms == ["HS256", "HS512"]
    from wirehub import cli

    args = cli.build_parser().parse_args(["serve", "--allowed-origins", "https://a.example,https://b.example",
                                          "--allowed-origins", "https://c.example", "--auth-timeout", "3"])
    assert config_module.split_list(args.allowed_origins) == [
        "https://a.example", "https://b.example", "https://c.example"]
    assert args.auth_timeout_s == "3"


@pytest.mark.parametrize("values, message", [
    ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
    ({"jwt_audience": "x"}, "jwt_audience needs a key"),
    ({"jwt_secret": "s", "default_publish": ["bad*"]}, "wildcard must be a whole segment"),
    ({"max_header_bytes": 20_000}, "max_header_bytes"),
])
def test_security_options_are_validated(values, message):
    with pytest.raises(ConfigError, match=message):
        config_module.load(environ={}, overrides=values)


# -- channel options ----------------------------------------------------------------

def test_channel_options_from_file_env_and_flags(tmp_path):
    path = tmp_path / "wirehub.toml"
    path.write_text('history_max_bytes = 1048576\n\n[[channels]]\npattern = "logs:**"\nhistory_size = 500\n\n'
                    '[[channels]]\npattern = "prices.*"\nslow_consumer = "conflate"\nmax_rate = 10\n')
    cfg = config_module.load(str(path), environ={})
    assert cfg.history_max_bytes == 1 << 20
    assert [(c.pattern, c.history_size, c.slow_consumer, c.max_rate) for c in cfg.channels] == [
        ("logs:**", 500, "disconnect", 0.0), ("prices.*", 0, "conflate", 10.0)]
    env = {"WIREHUB_CHANNELS": "a.*:history_size=3; b:**:max_queue_bytes=4096"}
    assert [(c.pattern, c.history_size, c.max_queue_bytes) for c in config_module.load(environ=env).channels] == [
        ("a.*", 3, 1 << 20), ("b:**", 0, 4096)]
    from wirehub import cli

    args = cli.build_parser().parse_args(["serve", "--channel", "x.*:history_size=1,history_ttl_s=2.5",
                                          "--channel", "y:slow_consumer=drop_oldest"])
    cfg = config_module.load(environ={}, overrides={"channels": args.channels})
    assert [(c.pattern, c.history_size, c.history_ttl_s, c.slow_consumer) for c in cfg.channels] == [
        ("x.*", 1, 2.5, "disconnect"), ("y", 0, 0.0, "drop_oldest")]


@pytest.mark.parametrize("flag, message", [
    ("prices.*:history_size=-1",
     "invalid configuration: channels[0].history_size (from --channel): Expected `int` >= 0"),
    ("prices.*:slow_consumer=maybe", "invalid configuration: channels[0].slow_consumer (from --channel): "
     "Invalid enum value 'maybe' (choose from: disconnect, drop_oldest, conflate)"),
    ("pri*ces:history_size=1", "invalid configuration: channels[0] (from --channel): channel pattern: "
     "pattern 'pri*ces': a wildcard must be a whole segment"),
    ("prices.*:histroy_size=1",
     "invalid configuration: channels[0] (from --channel): Object contains unknown field `histroy_size`"),
    ("prices.*", "invalid configuration: channels: 'prices.*' is not PATTERN:key=value,..."),
    ("prices.*:history_size=1,oops", "invalid configuration: channels: 'oops' in "
     "'prices.*:history_size=1,oops' is not key=value"),
])
def test_a_bad_channel_option_exits_2_naming_it(flag, message):
    result = run_cli("serve", "--channel", flag)
    assert result.returncode == 2
    assert result.stderr.strip() == f"wirehub: {message}"
