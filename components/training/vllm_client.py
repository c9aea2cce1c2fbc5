"""The vLLM client training uses: the one in ``components.vllm_client``, shared with the gateway."""

from components.vllm_client import VllmClient, VllmError

__all__ = ["VllmClient", "VllmError"]
