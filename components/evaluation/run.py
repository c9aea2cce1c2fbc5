"""Run the four arms and retrieval alone through the real serving path (the gateway), score, report, store.

Arms run one after another, each with a bounded number of requests in flight and one warm-up request that is
not counted, so no arm's latency is inflated by another's load or by a first-request adapter load.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from components.errors import ConfigError, ServiceError
from components.evaluation.qa import QAItem, load_qa, qa_fingerprint
from components.evaluation.results import (
    ARMS,
    Answer,
    Arm,
    EvalReport,
    IndexState,
    RetrievalScores,
    not_run_arm,
    recommend,
    summarise_arm,
)
from components.evaluation.scoring import answer_matches, percentile, recall_at_k, reciprocal_rank, source_matches
from components.keys import bearer, client_secret
from components.prompting import cited_numbers
from components.settings import Settings, find_repo_path

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
WARMUP_QUESTION = "Reply with the single word: ready."


def _headers(settings: Settings) -> dict[str, str]:
    return bearer(client_secret(settings))


def check_gateway(settings: Settings) -> None:
    """Fail early, in one line, when the gateway is not there or refuses our key."""
    url = settings.gateway_url + "/v1/models"
    try:
        resp = httpx.get(url, headers=_headers(settings), timeout=10)
    except httpx.HTTPError as exc:
        raise ServiceError(
            f"gateway not reachable at {settings.gateway_url} ({exc}); start it with `tandem up`"
        ) from exc
    if resp.status_code in (401, 403):
        raise ServiceError(
            f"gateway at {settings.gateway_url} refused the API key ({resp.status_code}): set TANDEM_API_KEYS to a "
            "valid name:secret key, or use the key file `tandem up` writes"
        )
    if resp.status_code != 200:
        raise ServiceError(f"gateway at {settings.gateway_url} answered GET /v1/models with HTTP {resp.status_code}")


def _answer_from(item: QAItem, arm: Arm, resp: Any, latency: float) -> Answer:
    text = (resp.choices[0].message.content or "") if resp.choices else ""
    extra = resp.model_extra or {}
    citations = extra.get("citations") or []
    tandem = extra.get("tandem") or {}
    # What the answer cites: the gateway lists the sources whose [n] the answer carries; the markers are read
    # here too, for a gateway that lists every retrieved source (one from before `retrieved` was split off).
    numbers = [int(c["index"]) for c in citations if isinstance(c, dict) and isinstance(c.get("index"), int)]
    marked = set(cited_numbers(text, max(numbers, default=0)))
    cited = [str(c.get("document_path") or "") for c in citations if isinstance(c, dict) and c.get("index") in marked]
    attributed = [str(c.get("document_path") or "") for c in extra.get("attributions") or [] if isinstance(c, dict)]
    usage = resp.usage
    return Answer(
        qa_id=item.id,
        text=text.strip(),
        correct=answer_matches(text, item.answer),
        latency_s=latency,
        prompt_tokens=int(usage.prompt_tokens) if usage else 0,
        completion_tokens=int(usage.completion_tokens) if usage else 0,
        cited_sources=cited,
        source_hit=any(source_matches(c, item.source) for c in cited) if arm.rag else None,
        source_attributed=any(source_matches(c, item.source) for c in attributed) if arm.rag else None,
        served_model=tandem.get("served_model") or resp.model,
        adapter_version=tandem.get("adapter_version"),
        fallback=bool(tandem.get("fallback")),
        gateway_cited=0 in (tandem.get("gateway_cited") or []),
    )


async def _run_arm(
    client: Any, arm: Arm, model: str, items: list[QAItem], settings: Settings, decoding: dict[str, Any] | None = None
) -> list[Answer]:
    """One arm's answers. Arms without retrieval ask at temperature 0 for eval_max_tokens; arms with retrieval
    get the gateway's RAG decoding defaults, as any client would, unless ``decoding`` sets fields itself."""
    import openai

    sem = asyncio.Semaphore(max(1, settings.eval_concurrency))
    extra: dict[str, Any] = {"rag": arm.rag}
    sampling: dict[str, Any] = {}
    if arm.rag:
        extra["top_k"] = settings.rag_top_k
        sampling = dict(decoding or {})
    else:
        sampling = {"temperature": 0, "max_tokens": settings.eval_max_tokens}
    openai_fields = {k: sampling.pop(k) for k in ("temperature", "max_tokens", "stop") if k in sampling}
    extra.update(sampling)

    async def ask(question: str) -> Any:
        return await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            extra_body=extra,
            **openai_fields,
        )

    async def one(item: QAItem) -> Answer:
        async with sem:
            started = time.perf_counter()
            try:
                resp = await ask(item.question)
            except openai.APIStatusError as exc:
                msg = f"HTTP {exc.status_code}: {exc.message}"[:300]
                return Answer(item.id, "", False, time.perf_counter() - started, error=msg)
            except openai.APIError as exc:
                return Answer(item.id, "", False, time.perf_counter() - started, error=str(exc)[:300])
            return _answer_from(item, arm, resp, time.perf_counter() - started)

    try:
        await ask(WARMUP_QUESTION)
    except openai.APIError as exc:
        log.warning("warm-up of arm %s failed: %s", arm.key, exc)
    return list(await asyncio.gather(*(one(item) for item in items)))


async def _run_retrieval(items: list[QAItem], settings: Settings) -> RetrievalScores:
    k = settings.rag_top_k
    sem = asyncio.Semaphore(max(1, settings.eval_concurrency))
    ranks: dict[str, int | None] = {}
    latencies: list[float] = []
    recalls: list[float] = []
    rrs: list[float] = []
    errors = 0
    async with httpx.AsyncClient(
        base_url=settings.gateway_url, headers=_headers(settings), timeout=settings.eval_request_timeout_s
    ) as http:

        async def one(item: QAItem) -> None:
            nonlocal errors
            async with sem:
                started = time.perf_counter()
                try:
                    resp = await http.post("/v1/retrieve", json={"query": item.question, "top_k": k})
                    resp.raise_for_status()
                except httpx.HTTPError as exc:
                    log.warning("retrieve failed for %s: %s", item.id, exc)
                    errors += 1
                    recalls.append(0.0)
                    rrs.append(0.0)
                    ranks[item.id] = None
                    return
                latencies.append(time.perf_counter() - started)
            paths = [str(c.get("document_path") or "") for c in resp.json().get("chunks", [])]
            # Rank on chunks, as the prompt sees them; a chunk of the expected document counts as a hit.
            ranked = [item.source if source_matches(p, item.source) else p for p in paths]
            recalls.append(recall_at_k(ranked, item.source, k))
            rr = reciprocal_rank(ranked, item.source)
            rrs.append(rr)
            ranks[item.id] = round(1 / rr) if rr else None

        await asyncio.gather(*(one(item) for item in items))
    return RetrievalScores(
        k=k,
        questions=len(items),
        recall_at_k=sum(recalls) / len(items),
        mrr=sum(rrs) / len(items),
        latency_p50_s=percentile(latencies, 50) if latencies else None,
        latency_p95_s=percentile(latencies, 95) if latencies else None,
        errors=errors,
        ranks={item.id: ranks.get(item.id) for item in items},
    )


async def run_arms(
    settings: Settings,
    items: list[QAItem],
    alias: str,
    has_adapter: bool,
    on_progress: Progress | None = None,
    arm_keys: Sequence[str] | None = None,
    decoding: dict[str, Any] | None = None,
) -> tuple[list[Any], RetrievalScores]:
    """Every arm in turn (or those in ``arm_keys``), then retrieval alone; adapter arms are reported as not run
    when there is no adapter."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=settings.gateway_url + "/v1",
        api_key=client_secret(settings) or "no-key-configured",
        timeout=settings.eval_request_timeout_s,
        max_retries=0,  # a retry would hide errors and skew latency; failures are counted instead
    )
    arms = []
    try:
        for arm in ARMS:
            if arm_keys is not None and arm.key not in arm_keys:
                continue
            model = alias if arm.uses_adapter else settings.served_model_name
            if arm.uses_adapter and not has_adapter:
                arms.append(not_run_arm(arm, model))
                continue
            if on_progress:
                on_progress(f"{arm.label}: {len(items)} questions through {model} (rag {arm.rag})")
            answers = await _run_arm(client, arm, model, items, settings, decoding)
            arms.append(summarise_arm(arm, model, answers))
    finally:
        await client.close()
    if on_progress:
        on_progress(f"retrieval alone: {len(items)} queries to /v1/retrieve")
    return arms, await _run_retrieval(items, settings)


def default_out_dir(settings: Settings, started: datetime) -> Path:
    return settings.state_dir / "eval" / started.strftime("%Y%m%dT%H%M%SZ")


def resolve_qa_path(settings: Settings, qa_path: str | Path | None) -> Path:
    """The QA file to read: ``qa_path`` or settings.qa_set, looked up in the checkout when only there."""
    return find_repo_path(qa_path or settings.qa_set)


def run_evaluation(
    settings: Settings,
    qa_path: str | Path | None = None,
    alias: str | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    *,
    trigger: str = "cli",
    store: bool = True,
    on_progress: Progress | None = None,
    arms: Sequence[str] | None = None,
    decoding: dict[str, Any] | None = None,
) -> EvalReport:
    """Measure the four arms on the held-out QA set through the gateway; write the report, store the scores.

    Needs the gateway (and behind it vLLM and Postgres) running. The adapter arms use ``alias``'s champion; with
    none, they are reported as "no adapter". ``arms`` keeps a subset (e.g. only the adapter arms after a
    promotion). Returns the report (``run_id`` and ``out_dir`` set).
    """
    from components.db import connect
    from components.evaluation.report import write_report
    from components.evaluation.store import index_state, save_report
    from components.registry import get_champion

    alias = alias or settings.default_alias
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of questions, got {limit}")
    unknown = sorted(set(arms or ()) - {a.key for a in ARMS})
    if unknown or (arms is not None and not arms):
        raise ConfigError(
            f"unknown arm(s) {', '.join(unknown) or '(none)'}; expected some of {', '.join(a.key for a in ARMS)}"
        )
    qa_file = resolve_qa_path(settings, qa_path)
    items = load_qa(qa_file, limit=limit)
    if out_dir is not None and (Path(out_dir) / "report.md").exists():
        raise ConfigError(f"{out_dir} already holds a report; pass another --out folder")
    check_gateway(settings)
    with connect(settings) as conn:
        champion = get_champion(conn, alias)
        index = index_state(conn)
        conn.commit()
    started = datetime.now(UTC)
    measured, retrieval = asyncio.run(
        run_arms(settings, items, alias, champion is not None, on_progress, arms, decoding)
    )
    finished = datetime.now(UTC)
    asked = [a for a in measured if a.status == "ok"]
    if asked and all(a.errors == a.questions for a in asked):
        first = next(x.error for x in asked[0].answers if x.error)
        raise ServiceError(f"every request to the gateway failed (first: {first}); check `tandem status`")
    report = EvalReport(
        started_at=started,
        finished_at=finished,
        qa_path=str(qa_path or settings.qa_set),
        qa_fingerprint=qa_fingerprint(items),
        questions=len(items),
        alias=alias,
        adapter_version=champion.version if champion else None,
        served_model=settings.served_model_name,
        gateway_url=settings.gateway_url,
        max_tokens=settings.eval_max_tokens,
        concurrency=settings.eval_concurrency,
        top_k=settings.rag_top_k,
        index=index if isinstance(index, IndexState) else IndexState(),
        arms=measured,
        retrieval=retrieval,
        trigger=trigger,
    )
    for scores in measured:
        if scores.arm.startswith("adapter") and scores.adapter_version is None and champion is not None:
            scores.adapter_version = champion.version
    report.recommendation = recommend(measured, alias)
    target = Path(out_dir) if out_dir else default_out_dir(settings, started)
    report.out_dir = str(target)
    if not store:
        write_report(report, target)
        return report
    # Scores and files together: the files are written inside the transaction that stores the scores (so the
    # report carries its run id), and a failure on either side leaves neither behind.
    written = False
    try:
        with connect(settings) as conn, conn.transaction():
            save_report(conn, report)
            write_report(report, target)
            written = True
    except BaseException:
        if written:  # the commit failed after the files were written
            shutil.rmtree(target, ignore_errors=True)
        report.run_id = None
        raise
    return report
