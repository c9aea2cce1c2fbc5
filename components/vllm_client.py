"""The one client of vLLM's runtime LoRA API: list, load, warm and unload adapters, ask for an answer, and read
which adapters have requests running or waiting (``vllm:lora_requests_info`` on ``/metrics``).

The training gate uses it directly; the gateway (serving/reconciler.py, serving/lifecycle.py) uses it from worker
threads with one shared HTTP client that carries vLLM's key. Every call sends the key vLLM was started with.
"""

from __future__ import annotations

import socket
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from components.errors import ConfigError, ServiceError
from components.settings import Settings

_LORA_INFO = "vllm:lora_requests_info"
_WARM_MESSAGES = [{"role": "user", "content": "Hi"}]


class VllmError(ServiceError):
    """A vLLM call failed. ``kind``: connect (refused or no connection: the process is gone), timeout, transport,
    or status (vLLM answered ``status_code`` >= 400)."""

    def __init__(self, message: str, kind: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status_code = status_code


def detail(response: httpx.Response) -> str:
    """vLLM's error message, on one line."""
    try:
        body = response.json()
        error = body.get("error")
        msg = error.get("message") if isinstance(error, dict) else body.get("message")
        text = str(msg or body)
    except (ValueError, AttributeError):
        text = response.text
    return " ".join(text.split())[:300] or f"HTTP {response.status_code}"


def first_vllm_url(settings: Settings) -> str:
    """The first vLLM server of ``settings`` as a plain URL: a ``dns+http://NAME:PORT`` entry (the gateway's
    discovery form, parsed by serving.discovery) becomes its name's first address, for callers that need one
    server (the gate, benches)."""
    from serving.discovery import parse_entry

    entry = parse_entry(settings.vllm_endpoints[0])
    if not entry.dns:
        return entry.raw
    try:
        infos = socket.getaddrinfo(entry.host, entry.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"TANDEM_VLLM_URLS entry {entry.raw!r}: {entry.host} does not resolve ({exc})") from exc
    return entry.url(str(infos[0][4][0]))


class VllmClient:
    """A thin client for one vLLM server (OpenAI-compatible API with runtime LoRA updating enabled)."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        http: httpx.Client | None = None,
        list_timeout_s: float | None = None,
    ) -> None:
        """``api_key``: the key vLLM was started with (``components.keys.vllm_secret``), or None for none.
        ``http``: a shared client (it carries the key; this one does not close it)."""
        self.base_url = base_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 3.0))
        self.list_timeout = httpx.Timeout(list_timeout_s, connect=2.0) if list_timeout_s else self.timeout
        self._own = http is None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http if http is not None else httpx.Client(timeout=self.timeout, headers=headers)

    @classmethod
    def for_settings(cls, settings: Settings, timeout_s: float = 600.0) -> VllmClient:
        """A client for the first vLLM server of ``settings`` (``first_vllm_url``), with the key it was started with."""
        from components.keys import vllm_secret

        return cls(first_vllm_url(settings), timeout_s, api_key=vllm_secret(settings))

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None, list_call: bool = False
    ) -> httpx.Response:
        timeout = self.list_timeout if list_call else self.timeout
        try:
            response = self.http.request(method, f"{self.base_url}{path}", json=body, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise VllmError(
                f"vLLM at {self.base_url} is not reachable ({exc}); start it with `tandem up`", "connect"
            ) from exc
        except httpx.TimeoutException as exc:
            # A busy CPU server queues requests: a timeout means overloaded, not down.
            raise VllmError(
                f"vLLM at {self.base_url} did not answer {path} within {timeout.read} s; "
                "lower TANDEM_GATE_CONCURRENCY or retry when the server is less busy",
                "timeout",
            ) from exc
        except httpx.HTTPError as exc:
            raise VllmError(
                f"vLLM at {self.base_url} failed on {path}: {type(exc).__name__}: {exc}", "transport"
            ) from exc
        if response.status_code == 401:
            raise VllmError(
                f"vLLM at {self.base_url} refused our key (401): "
                "set TANDEM_VLLM_API_KEY to the key it was started with",
                "status",
                401,
            )
        return response

    def models(self) -> set[str]:
        """Every model name the server answers to: the base model and each loaded adapter."""
        resp = self._send("GET", "/v1/models", list_call=True)
        if resp.status_code >= 400:
            raise VllmError(
                f"vLLM at {self.base_url} answered {resp.status_code} to /v1/models", "status", resp.status_code
            )
        try:
            return {str(m["id"]) for m in resp.json().get("data", [])}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VllmError(f"vLLM at {self.base_url} sent a model list that is not JSON: {exc}", "transport") from exc

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under ``name``; one already loaded under that name counts as loaded."""
        resp = self._send("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if resp.status_code >= 400 and "already" not in resp.text.lower():
            raise VllmError(
                f"vLLM at {self.base_url} refused adapter {name} from {path} ({resp.status_code}): {detail(resp)}",
                "status",
                resp.status_code,
            )

    def unload_adapter(self, name: str) -> None:
        """Unload ``name``; one vLLM does not hold (404) counts as unloaded."""
        resp = self._send("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if resp.status_code >= 400 and resp.status_code != 404:
            raise VllmError(
                f"vLLM at {self.base_url} could not unload adapter {name} ({resp.status_code}): {detail(resp)}",
                "status",
                resp.status_code,
            )

    def warm(self, model: str) -> None:
        """One token from ``model``, so its first real request finds it ready (raises if it cannot answer)."""
        resp = self._send("POST", "/v1/chat/completions", {"model": model, "messages": _WARM_MESSAGES, "max_tokens": 1})
        if resp.status_code >= 400:
            raise VllmError(
                f"adapter {model} loaded on {self.base_url} but failed to answer: {detail(resp)}",
                "status",
                resp.status_code,
            )

    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int, **sampling: Any) -> str:
        """A deterministic answer (temperature 0 unless ``sampling`` says otherwise)."""
        body = {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens, **sampling}
        resp = self._send("POST", "/v1/chat/completions", body)
        if resp.status_code >= 400:
            raise VllmError(
                f"vLLM answered {resp.status_code} for model {model}: {resp.text[:300]}", "status", resp.status_code
            )
        return str(resp.json()["choices"][0]["message"]["content"] or "")

    def busy_adapters(self) -> set[str]:
        """Adapters with requests running or waiting on this server, as its scheduler last reported them.

        vLLM sets one ``vllm:lora_requests_info`` series per (running, waiting) combination to the time it saw
        it; the newest is the current state. Raises VllmError when the metric cannot be read, so a caller that
        must not unload under a request keeps the adapter.
        """
        resp = self._send("GET", "/metrics", list_call=True)
        if resp.status_code >= 400:
            raise VllmError(
                f"vLLM at {self.base_url} answered {resp.status_code} to /metrics", "status", resp.status_code
            )
        return busy_from_metrics(resp.text)


def busy_from_metrics(text: str) -> set[str]:
    """The running and waiting adapters of the newest ``vllm:lora_requests_info`` sample in a /metrics page."""
    newest: tuple[float, set[str]] | None = None
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise VllmError(f"vLLM /metrics is not Prometheus text: {exc}", "transport") from exc
    for family in families:
        if family.name != _LORA_INFO:
            continue
        for sample in family.samples:
            names = {
                n
                for key in ("running_lora_adapters", "waiting_lora_adapters")
                for n in sample.labels.get(key, "").split(",")
                if n
            }
            if newest is None or sample.value > newest[0]:
                newest = (sample.value, names)
            elif sample.value == newest[0]:
                newest[1].update(names)
    return newest[1] if newest else set()
