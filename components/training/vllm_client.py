"""The few vLLM calls training needs: list, load and unload LoRA adapters at run time, and ask for an answer."""

from __future__ import annotations

from typing import Any

import httpx

from components.errors import ServiceError
from components.settings import Settings


class VllmClient:
    """A thin client for one vLLM server (OpenAI-compatible API with runtime LoRA updating enabled)."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, api_key: str | None = None) -> None:
        """``api_key``: the key vLLM was started with (``components.keys.vllm_secret``), or None for none."""
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers)

    @classmethod
    def for_settings(cls, settings: Settings, timeout_s: float = 600.0) -> VllmClient:
        """A client for the first vLLM server of ``settings``, sending the key it was started with."""
        from components.keys import vllm_secret

        return cls(settings.vllm_endpoints[0], timeout_s, api_key=vllm_secret(settings))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self.http.post(path, json=body)
        except httpx.TimeoutException as exc:
            # A busy CPU server queues requests: a timeout means overloaded, not down.
            raise ServiceError(
                f"vLLM at {self.base_url} did not answer {path} within {self.http.timeout.read} s; "
                "lower TANDEM_GATE_CONCURRENCY or retry when the server is less busy"
            ) from exc
        except httpx.HTTPError as exc:
            raise ServiceError(f"vLLM at {self.base_url} is not reachable ({exc}); start it with `tandem up`") from exc

    def models(self) -> set[str]:
        try:
            resp = self.http.get("/v1/models")
            if resp.status_code == 401:
                raise ServiceError(
                    f"vLLM at {self.base_url} refused our key (401): set TANDEM_VLLM_API_KEY to the key it was "
                    "started with"
                )
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            raise ServiceError(f"vLLM at {self.base_url} is not reachable ({exc}); start it with `tandem up`") from exc
        return {m["id"] for m in resp.json().get("data", [])}

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under ``name`` unless it is already there."""
        if name in self.models():
            return
        resp = self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if resp.status_code >= 400:
            raise ServiceError(f"vLLM refused adapter {name} from {path}: {resp.status_code} {resp.text[:300]}")

    def unload_adapter(self, name: str) -> None:
        if name not in self.models():
            return
        resp = self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if resp.status_code >= 400:
            raise ServiceError(f"vLLM could not unload adapter {name}: {resp.status_code} {resp.text[:300]}")

    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int, **sampling: Any) -> str:
        """A deterministic answer (temperature 0 unless ``sampling`` says otherwise)."""
        body = {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens, **sampling}
        resp = self._post("/v1/chat/completions", body)
        if resp.status_code >= 400:
            raise ServiceError(f"vLLM answered {resp.status_code} for model {model}: {resp.text[:300]}")
        return str(resp.json()["choices"][0]["message"]["content"] or "")
