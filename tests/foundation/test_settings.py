"""Settings come from TANDEM_ environment variables (and .env), with loopback defaults."""

from pathlib import Path

import pytest

from components.settings import Settings


def test_defaults_are_loopback_and_documented_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GATEWAY_PORT", "VLLM_PORT", "AIRFLOW_PORT", "PROMETHEUS_PORT", "STATE_DIR"):
        monkeypatch.delenv(f"TANDEM_{name}", raising=False)
    s = Settings(_env_file=None)
    assert s.host == "127.0.0.1"
    assert (s.gateway_port, s.vllm_port, s.airflow_port, s.prometheus_port) == (8000, 8100, 8080, 9090)
    assert s.state_dir == Path(".tandem").resolve()
    assert s.vllm_endpoints == ["http://127.0.0.1:8100"]


def test_env_overrides_and_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_STATE_DIR", str(tmp_path / "st"))
    monkeypatch.setenv("TANDEM_VLLM_URLS", "http://a:1/, http://b:2")
    monkeypatch.setenv("TANDEM_API_KEYS", "k1,k2")
    monkeypatch.setenv("TANDEM_MAX_LORA_RANK", "32")
    s = Settings(_env_file=None)
    assert s.state_dir == tmp_path / "st"
    assert s.models_dir == tmp_path / "st" / "models"
    assert s.vllm_endpoints == ["http://a:1", "http://b:2"]
    assert not s.manages_vllm
    assert s.api_keys == ["k1", "k2"]
    assert s.max_lora_rank == 32


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TANDEM_GATEWAY_PORT", raising=False)
    env = tmp_path / ".env"
    env.write_text("TANDEM_GATEWAY_PORT=8555\n")
    assert Settings(_env_file=env).gateway_port == 8555


def test_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_VLLM_PORT", "not-a-port")
    with pytest.raises(ValueError, match="vllm_port"):
        Settings(_env_file=None)
