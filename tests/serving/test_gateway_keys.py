"""Keys that fail closed and have names: the real gateway, the real vLLM, the real key file and registry."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

Gateway = Any  # the `gateway` fixture (tests/serving/conftest.py)


def _champion(alias: str) -> Any:
    from components import registry
    from components.db import connect

    with connect() as conn:
        return registry.get_champion(conn, alias)


# ---- parsing and the key file (no services) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("a-secret-without-a-name-0123456789", "expected 'name:secret'"),
        ("ops:change-me-admin-key", "placeholder"),
        ("ops:short", "at least 16"),
        ("ops:", "empty"),
        ("bad name:" + "x1y2z3" * 4, "expected 1-64"),
    ],
)
def test_bad_key_entries_are_refused_in_one_line(entry: str, expected: str) -> None:
    from components.keys import KeyConfigError, parse_keys

    with pytest.raises(KeyConfigError) as err:
        parse_keys([entry])
    message = str(err.value)
    assert expected in message and "\n" not in message
    secret = entry.partition(":")[2]
    assert not secret or secret not in message  # the error names the key, never its secret


def test_names_are_unique_and_secrets_kept_hashed() -> None:
    from components.keys import KeyConfigError, parse_keys

    secret = secrets.token_urlsafe(24)
    keys = parse_keys([f"alice:{secret}", f"bob:{secrets.token_urlsafe(24)}"])
    assert [k.name for k in keys] == ["alice", "bob"]
    assert keys[0].matches(secret) and not keys[1].matches(secret)
    assert secret.encode() not in repr(keys).encode()
    with pytest.raises(KeyConfigError, match="configured twice"):
        parse_keys([f"alice:{secret}", f"alice:{secrets.token_urlsafe(24)}"])


def test_key_file_is_made_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    from components.keys import KeyConfigError, admin_secret, client_secret, ensure_key_file, read_key_file
    from components.settings import Settings

    settings = Settings(state_dir=tmp_path / "state", _env_file=None)
    assert client_secret(settings) is None and admin_secret(settings) is None  # nothing yet: clients send none
    path, created = ensure_key_file(settings)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    keys = read_key_file(settings)
    assert keys is not None and keys.client.startswith("local-client:") and keys.admin.startswith("local-admin:")
    assert client_secret(settings) == keys.client.partition(":")[2] != admin_secret(settings)
    again, created_again = ensure_key_file(settings)
    assert (again, created_again) == (path, False) and path.read_bytes() == first
    assert not list(path.parent.glob(".keys.json.*"))  # no temporary file left behind
    path.chmod(0o644)
    with pytest.raises(KeyConfigError, match="readable by others"):
        ensure_key_file(settings)
    assert path.read_bytes() == first  # refused, not replaced


def test_configured_keys_win_over_the_key_file(tmp_path: Path) -> None:
    from components.keys import client_secret, ensure_key_file, gateway_keys
    from components.settings import Settings

    secret = secrets.token_urlsafe(24)
    settings = Settings(state_dir=tmp_path, api_keys=[f"webapp:{secret}"], _env_file=None)
    ensure_key_file(settings)
    client, admin = gateway_keys(settings)
    assert [k.name for k in client] == ["webapp"] and [k.name for k in admin] == ["local-admin"]
    assert client_secret(settings) == secret


# ---- the gateway -------------------------------------------------------------------------------------------


def test_placeholder_key_stops_the_gateway_at_start_up(tmp_path: Path) -> None:
    """The real `uvicorn serving.app:create_app --factory` start, as `tandem up` runs it."""
    env = {**os.environ, "TANDEM_STATE_DIR": str(tmp_path), "TANDEM_ADMIN_API_KEYS": "ops:change-me-admin-key"}
    env["TANDEM_GATEWAY_PORT"] = "1"  # never reached: start-up stops first
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "serving.app:create_app", "--factory", "--port", "1"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tandem gateway: API key 'ops'") and "placeholder" in last
    assert "change-me-admin-key" not in result.stderr  # the secret itself is never printed


@pytest.fixture
def client_only_gateway(vllm_server: str, pg_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A second real gateway on the session's database and vLLM with client keys only and no key file: the
    admin API must be closed. Yields (url, client secret)."""
    import socket

    import uvicorn

    from components.db.gateway_role import gateway_database_url
    from components.keys import vllm_secret
    from components.settings import get_settings
    from serving.app import create_app

    session = get_settings()
    secret = secrets.token_urlsafe(24)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings = session.model_copy(
        update={
            "state_dir": tmp_path,  # no key file here
            "database_url": pg_url,
            "gateway_database_url": gateway_database_url(session),  # the session's server, as the gateway role
            "gateway_port": port,
            "api_keys": [f"webapp:{secret}"],
            "admin_api_keys": [],
            "vllm_api_key": vllm_secret(session) or "",
        }
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway-client-only", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", secret
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.vllm
def test_admin_api_is_closed_without_admin_keys(gateway: Gateway, client_only_gateway: tuple[str, str]) -> None:
    url, secret = client_only_gateway
    before = _champion(gateway.alias)
    other = gateway.versions["v2"] if before.version != gateway.versions["v2"] else gateway.versions["v1"]
    body = {"alias": gateway.alias, "version": other, "force": True}
    for headers in ({}, {"Authorization": f"Bearer {secret}"}, {"Authorization": "Bearer anything-at-all-123"}):
        for path, payload in (("/promote", body), ("/rollback", {"alias": gateway.alias}), ("/stage", body)):
            r = httpx.post(f"{url}/v1/admin/adapters{path}", json=payload, headers=headers, timeout=30)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", r.text
        assert httpx.get(f"{url}/v1/admin/adapters", headers=headers, timeout=30).status_code == 403
    after = _champion(gateway.alias)
    assert (after.version, after.promoted_at, after.changed_by) == (
        before.version,
        before.promoted_at,
        before.changed_by,
    )
    # the client key still works where it should
    ok = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert ok.status_code == 200


def test_client_endpoints_refuse_everything_without_any_key(tmp_path: Path) -> None:
    """No key configured and no key file: /v1 and the admin API answer 403 (the app's routes, no lifespan)."""
    from fastapi.testclient import TestClient

    from components.settings import get_settings
    from serving.app import create_app

    settings = get_settings().model_copy(update={"state_dir": tmp_path, "api_keys": [], "admin_api_keys": []})
    client = TestClient(create_app(settings))  # no `with`: the lifespan (vLLM, database) is not needed here
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/retrieve"), ("POST", "/v1/chat/completions")):
        r = client.request(method, path, json={}, headers={"Authorization": "Bearer some-guess-123456789"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "no_keys_configured", r.text
    assert client.get("/v1/admin/adapters").json()["error"]["code"] == "admin_disabled"


@pytest.mark.vllm
def test_client_key_cannot_use_the_admin_api(gateway: Gateway) -> None:
    before = _champion(gateway.alias)
    body = {"alias": gateway.alias, "version": gateway.versions["v2"], "force": True}
    with gateway.client() as client:
        r = client.post("/v1/admin/adapters/promote", json=body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    with gateway.client("not-a-key-at-all-0123") as client:
        assert client.post("/v1/admin/adapters/promote", json=body).status_code == 401
    after = _champion(gateway.alias)
    assert (after.version, after.promoted_at) == (before.version, before.promoted_at)


@pytest.mark.vllm
def test_promotion_records_the_admin_key_name(gateway: Gateway) -> None:
    v1, v2 = gateway.versions["v1"], gateway.versions["v2"]
    start = _champion(gateway.alias).version
    target = v2 if start != v2 else v1
    try:
        with gateway.admin() as client:
            r = client.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": target})
            assert r.status_code == 200, r.text
        champ = _champion(gateway.alias)
        assert champ.version == target
        assert champ.promoted_by == champ.changed_by == f"key:{gateway.admin_key_name}"
        entry = next(a for a in gateway.snapshot()["aliases"] if a["alias"] == gateway.alias)
        assert entry["promoted_by"] == f"key:{gateway.admin_key_name}"
    finally:
        with gateway.admin() as client:  # leave v1 champion for the other tests of this package
            client.post("/v1/admin/adapters/promote", json={"alias": gateway.alias, "version": v1})


def test_cli_actor_is_the_os_user() -> None:
    import getpass

    from components.training.promotion import local_actor

    assert local_actor() == f"cli:{getpass.getuser()}"


# ---- vLLM behind its key ------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_vllm_refuses_requests_without_its_key(vllm_server: str) -> None:
    """vLLM started by `tandem up` (the session's): every route but health and metrics needs the key, including
    the SageMaker routes vLLM itself leaves open (/invocations generates text, /adapters loads LoRA files)."""
    from components.keys import bearer, vllm_secret
    from components.settings import get_settings

    key = vllm_secret(get_settings())
    assert key
    chat = {"model": get_settings().served_model_name, "messages": [{"role": "user", "content": "hi"}]}
    guarded = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {**chat, "max_tokens": 1}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
        ("POST", "/invocations", {**chat, "max_tokens": 1}),
        ("POST", "/adapters", {"name": "x", "src": "/tmp"}),
        ("POST", "/tokenize", {"prompt": "hi"}),
    ]
    with httpx.Client(base_url=vllm_server, timeout=60) as http:
        for method, path, body in guarded:
            for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}):
                r = http.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, r.status_code, r.text[:200])
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        assert http.get("/v1/models", headers=bearer(key)).status_code == 200
