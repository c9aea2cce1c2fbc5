"""POST /v1/chat/completions: retrieve, build the numbered-sources prompt, generate, answer with citations."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from components.prompting import (
    attributed_sources,
    build_rag_messages,
    citations_for,
    cited_sources,
    decoding_defaults,
    missing_citation,
    query_text,
)
from serving import answer_log
from serving import metrics as m
from serving.adapters import Route
from serving.deps import Gateway, GatewayDep
from serving.errors import ApiError, error_body
from serving.limits import check_filters, check_messages, get_limits, release_after, subject_of
from serving.schemas import ChatCompletionRequest
from serving.security import require_api_key
from serving.upstream import Upstream, open_chat

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["chat"])
FALLBACK_HEADER = "x-tandem-fallback"
_TANDEM_FIELDS = {"rag", "top_k", "filters"}


def check_limits(req: ChatCompletionRequest, gw: Gateway) -> None:
    s = gw.settings
    if len(req.messages) > s.max_messages:
        raise ApiError(400, f"messages: at most {s.max_messages} messages (got {len(req.messages)})", param="messages")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value > s.max_tokens_limit:
            raise ApiError(400, f"{name}: at most {s.max_tokens_limit} (got {value})", param=name)
    if req.top_k is not None and req.top_k > s.max_top_k:
        raise ApiError(400, f"top_k: at most {s.max_top_k} (got {req.top_k})", param="top_k")
    if req.choices() > s.max_n:
        raise ApiError(400, f"n: at most {s.max_n} (got {req.n})", param="n")
    check_messages(req.messages, s)
    check_filters(req.filters, s)


def reserved_tokens(req: ChatCompletionRequest, gw: Gateway) -> int:
    """Completion tokens a request may generate (max_tokens, or the default it will get, times n): what the
    per-key token limit charges before generation."""
    s = gw.settings
    explicit = [v for v in (req.max_tokens, req.max_completion_tokens) if v is not None]
    if explicit:
        per_choice = max(explicit)
    else:
        default = s.default_max_tokens
        if req.rag:
            rag = decoding_defaults(s, adapter=req.model != s.served_model_name)
            default = max(default, int(rag.get("max_tokens", default)))
        per_choice = min(default, s.max_tokens_limit)
    return per_choice * req.choices()


Citer = Callable[[str], str]


def _citer(gw: Gateway, route: Route, retrieved: list[dict[str, Any]], chunks: list[Any]) -> Citer:
    """For one grounded answer's text: the markers the gateway appends to it ('' for none), with the answer
    counted by who cited its source."""
    alias = route.alias or route.served_model

    def cite(answer: str) -> str:
        if cited_sources(retrieved, answer):
            by, marker = "model", ""
        else:
            marker = missing_citation(retrieved, chunks, answer) if gw.settings.rag_cite_attributed else ""
            by = "gateway" if marker else "none"
        m.ANSWER_CITATIONS.labels(alias=alias, cited_by=by).inc()
        return marker

    return cite


def _cite_choices(choices: list[dict[str, Any]], cite: Citer) -> list[int]:
    """Append the gateway's markers to each non-streamed choice that cites nothing; the indexes of those that
    got some."""
    marked = []
    for choice in choices:
        message = choice.get("message") or {}
        text = str(message.get("content") or "")
        marker = cite(text)
        if marker:
            choice["message"] = {**message, "content": text.rstrip() + marker}
            marked.append(int(choice.get("index") or 0))
    return marked


def _cite_in_stream(
    choice: dict[str, Any], delta: str, said: list[str], held: dict[int, str], cite: Citer, cited: list[int]
) -> None:
    """One streamed chunk of a grounded choice, rewritten in place: trailing whitespace waits for the next text,
    and the last chunk carries the gateway's markers right after the text (as ``_cite_choices`` writes them), or
    the whitespace it held when there are none. ``said`` is what the choice said so far, this delta included."""
    index = int(choice.get("index") or 0)
    out = held.pop(index, "") + delta
    text = out.rstrip()
    if choice.get("finish_reason") is None:
        held[index] = out[len(text) :]
    else:
        marker = cite("".join(said))
        if marker:  # before its finish_reason reaches the client
            said[:] = ["".join(said).rstrip(), marker]
            cited.append(index)
        text = text + marker if marker else out
    if text != delta:
        choice["delta"] = {**(choice.get("delta") or {}), "content": text}


def _tandem_info(route: Route, rag: bool) -> dict[str, Any]:
    return {
        "alias": route.alias,
        "adapter_version": route.adapter_version,
        "served_model": route.served_model,
        "rag": rag,
        "fallback": route.fallback,
    }


def _record_usage(route: Route, usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    labels = {"alias": route.alias or "", "adapter_version": str(route.adapter_version or "")}
    m.PROMPT_TOKENS.labels(**labels).inc(int(usage.get("prompt_tokens") or 0))
    m.COMPLETION_TOKENS.labels(**labels).inc(int(usage.get("completion_tokens") or 0))


async def _relay_error(up: Upstream) -> Response:
    body = await up.response.aread()
    status = up.response.status_code
    await up.close()
    if status < 500:
        return Response(body, status_code=status, media_type="application/json")
    m.UPSTREAM_ERRORS.labels(replica=up.replica.url, kind="status").inc()
    detail = " ".join(body.decode(errors="replace").split())[:200]
    return JSONResponse(error_body(502, f"vLLM answered {status}: {detail}", code="upstream_error"), status_code=502)


async def grounded_messages(req: ChatCompletionRequest, gw: Gateway) -> tuple[list[dict[str, Any]], list[Any], bool]:
    """The messages the model is sent (the RAG prompt when retrieval is on), the chunks, and whether it was on.
    Training renders its examples with the same builder (components/training/raft.py)."""
    messages = [msg.model_dump(exclude_none=True) for msg in req.messages]
    query = query_text(messages) if req.rag else ""
    if not query:
        return messages, [], False
    chunks = await gw.retriever.search(query, req.top_k or gw.settings.rag_top_k, req.filters)
    return build_rag_messages(messages, chunks, gw.settings.assistant_org), chunks, True


@router.post("/v1/chat/prompt", summary="The messages a chat request would send to the model, without generating")
async def chat_prompt(req: ChatCompletionRequest, request: Request, gw: GatewayDep) -> dict[str, Any]:
    check_limits(req, gw)
    gw.adapters.resolve(req.model)
    await get_limits(request).rate.check(subject_of(request))
    messages, chunks, rag = await grounded_messages(req, gw)
    adapter = req.model != gw.settings.served_model_name
    return {
        "messages": messages,
        "retrieved": citations_for(chunks),
        "rag": rag,
        "decoding": decoding_defaults(gw.settings, adapter=adapter) if rag else {},
    }


@router.post("/v1/chat/completions", summary="OpenAI chat completions, grounded in retrieved documents")
async def chat_completions(req: ChatCompletionRequest, request: Request, gw: GatewayDep) -> Response:
    check_limits(req, gw)
    gw.adapters.resolve(req.model)  # unknown model: 404 before any retrieval work
    request.state.alias = req.model
    limits = get_limits(request)
    await limits.rate.check(subject_of(request), reserved_tokens(req, gw))  # 429 before any work
    messages, chunks, rag = await grounded_messages(req, gw)
    retrieved = citations_for(chunks)  # every source in the prompt; "citations" are those the answer cites

    body = req.model_dump(exclude=_TANDEM_FIELDS, exclude_none=True)
    body["messages"] = messages
    default_max = gw.settings.default_max_tokens
    if rag:  # grounded answers: the measured decoding defaults, where the caller set nothing
        defaults = decoding_defaults(gw.settings, adapter=req.model != gw.settings.served_model_name)
        default_max = int(defaults.pop("max_tokens", default_max))
        for key, value in defaults.items():
            body.setdefault(key, value)
    if req.max_tokens is None and req.max_completion_tokens is None:
        body["max_tokens"] = min(default_max, gw.settings.max_tokens_limit)
    wants_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        body["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}

    slot = await limits.upstream.acquire()  # 503 at once when this process has too many requests to vLLM
    started = time.perf_counter()
    try:
        up = await open_chat(gw.http, gw.pool, gw.adapters, req.model, body, stream=bool(req.stream))
    except BaseException:
        slot.release()
        raise
    route = up.route
    request.state.alias = route.alias or ""
    request.state.adapter_version = route.adapter_version
    headers = {FALLBACK_HEADER: "base-model"} if route.fallback else {}
    if up.response.status_code >= 400:
        try:
            return await _relay_error(up)
        finally:
            slot.release()
    info = _tandem_info(route, rag)
    cite = _citer(gw, route, retrieved, chunks) if rag else None  # grounded answers only
    labels = {"alias": route.alias or "", "adapter_version": str(route.adapter_version or "")}
    # The gateway's own id for this answer (the response's "id", on every chunk of a stream): feedback names it
    response_id = answer_log.new_response_id()
    remember = partial(answer_log.remember, request, response_id, route, [msg.model_dump() for msg in req.messages])
    if not req.stream:
        try:
            raw = await up.read()
        except httpx.HTTPError as exc:
            m.UPSTREAM_ERRORS.labels(replica=up.replica.url, kind="read").inc()
            raise ApiError(502, f"vLLM at {up.replica.url} broke off the answer", code="upstream_error") from exc
        finally:
            await up.close()
            slot.release()
        m.GENERATE_LATENCY.labels(**labels, stream="no").observe(time.perf_counter() - started)
        payload = json.loads(raw)
        payload["id"] = response_id
        _record_usage(route, payload.get("usage"))
        if cite is not None:  # the choices that cite nothing get the sources their sentences stand on
            info["gateway_cited"] = _cite_choices(payload.get("choices") or [], cite)
        said = [str((c.get("message") or {}).get("content") or "") for c in payload.get("choices") or []]
        text = "\n".join(said)
        payload["citations"] = cited_sources(retrieved, text)
        payload["attributions"] = attributed_sources(retrieved, chunks, text)
        payload["retrieved"] = retrieved
        payload["tandem"] = info
        remember(retrieved, said[0] if said else "", payload["citations"])
        return JSONResponse(payload, headers=headers)
    return StreamingResponse(
        release_after(
            _stream(up, retrieved, chunks, info, wants_usage, started, response_id, remember, cite),
            slot,
        ),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(
    up: Upstream,
    retrieved: list[dict[str, Any]],
    chunks: list[Any],
    info: dict[str, Any],
    wants_usage: bool,
    started: float,
    response_id: str,
    remember: Callable[[list[dict[str, Any]], str, list[dict[str, Any]]], None],
    cite: Citer | None = None,
) -> AsyncIterator[str]:
    """vLLM's chunks as they come (with the gateway's response id), then the citations event (the sources the
    answer cited, those its sentences stand on, and every one retrieved), then [DONE]. A grounded choice's last
    chunk carries the markers ``cite`` appends to it, if any. A stream that completes is handed to ``remember``."""
    route = up.route
    labels = {"alias": route.alias or "", "adapter_version": str(route.adapter_version or "")}
    first = True
    last: dict[str, Any] = {}
    said: dict[int, list[str]] = {}  # what each choice said, for the citations
    gateway_cited: list[int] = []  # the choices whose markers the gateway wrote
    held: dict[int, str] = {}  # a grounded choice's trailing whitespace, sent with its next text
    try:
        async for line in up.lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            chunk["id"] = response_id
            last = chunk
            for choice in chunk.get("choices") or []:
                delta = str((choice.get("delta") or {}).get("content") or "")
                index = int(choice.get("index") or 0)
                said.setdefault(index, []).append(delta)
                if cite is not None:
                    _cite_in_stream(choice, delta, said[index], held, cite, gateway_cited)
            data = json.dumps(chunk)
            if chunk.get("usage") and not chunk.get("choices"):
                _record_usage(route, chunk["usage"])
                if not wants_usage:
                    continue
            if first:
                m.TIME_TO_FIRST_TOKEN.labels(**labels).observe(time.perf_counter() - started)
                first = False
            yield f"data: {data}\n\n"
        text = "\n".join("".join(p) for p in said.values())
        final = {
            "id": response_id,
            "object": "tandem.citations",
            "created": last.get("created", int(time.time())),
            "model": last.get("model", route.served_model),
            "choices": [],
            "citations": cited_sources(retrieved, text),
            "attributions": attributed_sources(retrieved, chunks, text),
            "retrieved": retrieved,
            "tandem": {**info, "gateway_cited": gateway_cited} if cite is not None else info,
        }
        remember(retrieved, "".join(said.get(0, [])), final["citations"])  # queued before the client can reply
        yield f"data: {json.dumps(final)}\n\n"
    except (httpx.HTTPError, ValueError) as exc:
        m.UPSTREAM_ERRORS.labels(replica=up.replica.url, kind="stream").inc()
        yield f"data: {json.dumps(error_body(502, f'vLLM stream broke off: {type(exc).__name__}'))}\n\n"
    finally:
        await up.close()
        m.GENERATE_LATENCY.labels(**labels, stream="yes").observe(time.perf_counter() - started)
    yield "data: [DONE]\n\n"
