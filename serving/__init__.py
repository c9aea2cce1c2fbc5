"""Tandem's online path: the OpenAI-compatible RAG gateway over vLLM, its adapters, metrics and GPU exporter."""
