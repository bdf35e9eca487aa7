from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.errors import ConfigError
from sentinel.settings import load_settings


def test_defaults_file_env_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("api:\n  host: 127.0.0.2\n  port: 1234\nalerting:\n  resend_delay: 2m\n")
    s = load_settings(cfg)
    assert (s.api.host, s.api.port, s.alerting.resend_delay) == ("127.0.0.2", 1234, 120.0)
    monkeypatch.setenv("SENTINEL_API__PORT", "9999")
    assert load_settings(cfg).api.port == 9999  # environment beats the file
    s = load_settings(cfg, {"api": {"port": 5}})
    assert (s.api.port, s.api.host) == (5, "127.0.0.2")  # an override keeps sibling fields


@pytest.mark.parametrize(("text", "expected"), [
    ("api:\n  port: 70000\n", "s.yaml:2: api.port: Input should be less than or equal to 65535"),
    ("alerting:\n  receivers:\n    - name: x\n      url: ftp://x\n", "s.yaml:4: alerting.receivers.0.url"),
    ("replicas:\n  admin_token: changeme\n", "s.yaml:2: replicas.admin_token: Value error, refusing a placeholder"),
    ("remediaton: {}\n", "s.yaml:1: remediaton: Extra inputs are not permitted"),
    ("- a\n", "expected a mapping"),
    ("api: [\n", "YAML syntax error"),
])
def test_invalid_settings_name_file_line_field(tmp_path: Path, text: str, expected: str) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert expected in str(info.value)


def test_secrets_never_print(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("api:\n  token: s3cr3t-value-0123456789\n")
    s = load_settings(cfg)
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in s.model_dump_json()
    assert s.api.token is not None and s.api.token.get_secret_value() == "s3cr3t-value-0123456789"


def test_replica_engine_args_reach_the_server_command_line_as_a_list(tmp_path: Path) -> None:
    from sentinel.supervisor import ReplicaSpec

    cfg = tmp_path / "s.yaml"
    cfg.write_text("replicas:\n  engine_args: ['--memory-utilization', '0.2', '--quantization', 'int8']\n")
    s = load_settings(cfg)
    spec = ReplicaSpec("replica-0", 8000, tmp_path, tmp_path, engine_args=tuple(s.replicas.engine_args))
    assert spec.argv()[-4:] == ["--memory-utilization", "0.2", "--quantization", "int8"]
