"""The retraining pipeline as plain functions: the DAG's tasks, the Kubeflow steps and `tandem train` run these.

check_new_data -> train_candidate (once, or once per sweep point) -> pick_best -> register_candidate
-> evaluate_gate -> promote_or_reject. Each step returns a typed record (``components.training.results``) whose
``to_dict`` is what crosses a task boundary. The gate asks the alias's fixed held-out set (``heldout``), never
questions drawn from the run's ``data``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

from components import adapter_rules, registry
from components.db import connect
from components.errors import ConfigError, ServiceError
from components.settings import Settings
from components.training import artifacts, heldout
from components.training.answer_cache import AnswerCache, model_identity
from components.training.data import Dataset, Example, load_dataset, split_dataset
from components.training.gate import (
    GENERAL,
    GateResult,
    Question,
    accuracy,
    answer_all,
    build_question_sets,
    decide,
    make_retriever,
    outcomes,
    regressions,
)
from components.training.lora import ProgressFn, TrainConfig, train_adapter
from components.training.promotion import promote, stage
from components.training.results import (
    DataCheck,
    Decision,
    RegisteredCandidate,
    RetrainResult,
    TrainedCandidate,
)
from components.training.vllm_client import VllmClient

log = logging.getLogger(__name__)


def _load(settings: Settings, alias: str, data: str | None) -> Dataset:
    """``data`` when given (a file, folder or URL, read as is); else the alias's approved snapshot from the intake
    store, its landing files imported first (``components.training.landing``)."""
    if data:
        return load_dataset(data)
    from components.training.landing import alias_dataset

    return alias_dataset(settings, alias)


def _snapshot(ds: Dataset) -> dict[str, Any] | None:
    """The intake snapshot a dataset is (alias, version, hash, size), for the lineage; None for a path's data."""
    snap = getattr(ds, "snapshot", None)
    return snap.lineage() if snap is not None else None


def check_new_data(settings: Settings, alias: str, data: str | None = None, force: bool = False) -> DataCheck:
    """How many examples are new beyond the champion's dataset, and whether that is enough to train."""
    ds = _load(settings, alias, data)
    with connect(settings) as conn:
        champion = registry.get_champion(conn, alias)
    if champion is None:
        new = len(ds.examples)
    else:
        manifest = artifacts.read_manifest(champion.artifact_uri)
        if manifest is not None:
            new = len(ds.digests - set(manifest.get("digests", [])))
        else:  # an adapter registered without a manifest: only its dataset version is known
            new = 0 if champion.dataset_version == ds.version else len(ds.examples)
    enough = new >= settings.min_new_examples
    if force:
        reason = f"forced ({new} new examples)"
    elif enough:
        reason = f"{new} new examples (at least {settings.min_new_examples} needed)"
    else:
        reason = f"only {new} new examples beyond the champion's dataset; {settings.min_new_examples} needed"
    return DataCheck(
        alias=alias,
        data=ds.location,
        dataset_version=ds.version,
        snapshot=_snapshot(ds),
        examples=len(ds.examples),
        duplicates=ds.duplicates,
        bad_lines=len(ds.problems),
        problems=ds.problems[:20],
        new_examples=new,
        champion_version=champion.version if champion else None,
        should_train=force or enough,
        reason=reason,
    )


def sweep_points(learning_rates: list[float] | None = None, ranks: list[int] | None = None) -> list[dict[str, Any]]:
    """The training overrides of a sweep: every combination of the given learning rates and ranks."""
    lrs: list[float | None] = list(learning_rates or []) or [None]
    rs: list[int | None] = list(ranks or []) or [None]
    points = []
    for lr, r in itertools.product(lrs, rs):
        point: dict[str, Any] = {}
        if lr is not None:
            point["learning_rate"] = float(lr)
        if r is not None:
            point["r"] = int(r)
            point["alpha"] = 2 * int(r)
        points.append(point)
    return points


def run_dir(settings: Settings, alias: str, run_id: str) -> Path:
    return settings.state_dir / "training" / alias / run_id


def train_candidate(
    settings: Settings,
    alias: str,
    data: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    callbacks: tuple[Any, ...] = (),
) -> TrainedCandidate:
    """Train one adapter; its run folder is named by the rendered data and config, so a rerun resumes it."""
    from components.models import base_model_path

    ds = _load(settings, alias, data)
    with connect(settings) as conn:
        held = heldout.ensure(conn, settings, alias, data)
    kept, contaminated = heldout.drop_contaminated(settings, ds.examples, held)
    for problem in contaminated[:20]:
        log.warning("dropped from training, the gate asks it: %s", problem)
    if contaminated and progress is not None:
        progress({"message": f"dropped {len(contaminated)} examples the gate asks (first: {contaminated[0]})"})
    # the run's own test split is never trained on either: it is the reserve a `--new-heldout` is drawn from
    split = split_dataset(kept, settings.train_heldout_fraction)
    config = TrainConfig.from_settings(settings, **(overrides or {}))
    replay = load_replay(settings, exclude=ds.digests)
    if replay is not None:
        replay.examples, _ = heldout.drop_contaminated(settings, replay.examples, held)
    train, validation, rendering = training_conversations(settings, split.train, split.validation)
    if progress is not None and rendering["with_sources"]:
        progress(
            {"message": f"rendered {rendering['summary']} from index generation {rendering['index']['generation']}"}
        )
    rendered_hash = hashlib.sha256(json.dumps([train, validation], sort_keys=True).encode()).hexdigest()[:6]
    run_id = f"{ds.version}-{config.fingerprint()}-p{rendered_hash}" + (f"-r{replay.version[:6]}" if replay else "")
    folder = run_dir(settings, alias, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    result = train_adapter(
        base_model_path(settings),
        [*train, *(e.as_messages() for e in (replay.examples if replay else []))],
        validation,
        config,
        folder,
        progress=progress,
        callbacks=callbacks,
    )
    manifest = {
        "dataset_version": ds.version,
        "location": ds.location,
        "snapshot": _snapshot(ds),
        "digests": sorted(ds.digests),
        "test_digests": sorted(e.digest for e in held.examples),
        "heldout": held.lineage(),
        "contaminated": contaminated,
        "rendering": rendering,
    }
    Path(result.adapter_dir, artifacts.MANIFEST).write_text(json.dumps(manifest))
    return TrainedCandidate(
        run_id=run_id,
        alias=alias,
        data=ds.location,
        dataset_version=ds.version,
        dataset_size=len(ds.examples),
        snapshot=_snapshot(ds),
        n_test=len(held.examples),
        heldout=held.lineage(),
        contaminated=contaminated,
        rendering={k: v for k, v in rendering.items() if k != "grounding"},  # the manifest keeps the examples
        replay={"data": replay.location, "version": replay.version, "examples": len(replay.examples)}
        if replay
        else None,
        run=result,
    )


def training_conversations(
    settings: Settings, train: list[Example], validation: list[Example]
) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]], dict[str, Any]]:
    """The train and validation conversations, rendered into the gateway's RAG prompt from the live index
    (``components.training.raft``), or as written when that is off or there is no index. The third value is the
    lineage: index state, what was rendered, which lines were left out."""
    from components.prompting import system_prompt
    from components.retrieval import document_chunks, index_snapshot, serving_retriever
    from components.training.raft import RenderReport, render_examples

    plain: dict[str, Any] = {"with_sources": False, "index": None, "summary": {}, "left_out": []}
    if not settings.train_with_sources:
        return [e.as_messages() for e in train], [e.as_messages() for e in validation], plain
    with connect(settings) as conn:
        index = index_snapshot(conn)
        conn.commit()
        if not index["chunks"]:
            log.warning("no document index yet: the adapter is trained on the examples as written, without sources")
            return [e.as_messages() for e in train], [e.as_messages() for e in validation], {**plain, "index": index}
        retrieve = serving_retriever(conn, settings)

        def render(examples: list[Example]) -> RenderReport:
            return render_examples(
                examples,
                retrieve,
                settings.assistant_org,
                settings.rag_top_k,
                unanswerable_share=settings.train_unanswerable_share,
                document_chunks=lambda path: document_chunks(conn, path),
            )

        rendered_train, rendered_val = render(train), render(validation)
        documents = grounding_documents(conn, rendered_train.grounding)
    left_out = [*rendered_train.problems, *rendered_val.problems]
    for problem in left_out[:20]:
        log.warning("left out of training: %s", problem)
    if not rendered_train.conversations:
        raise ConfigError(
            f"no training example could be grounded in the index ({len(left_out)} left out, first: {left_out[:1]}); "
            'ingest the documents that hold the answers, name each example\'s "source", or mark plain ones '
            '"rag": false'
        )
    summary = dict(rendered_train.kinds + rendered_val.kinds)
    lineage = {
        "with_sources": True,
        "index": index,
        "top_k": settings.rag_top_k,
        "prompt": hashlib.sha256(system_prompt([], settings.assistant_org).encode()).hexdigest()[:12],
        "summary": summary,
        "left_out": left_out,
        "documents": documents,  # what the grounded examples' documents held at training: source, path, hash
        "grounding": rendered_train.grounding,  # kept in the artifact's manifest only (see train_candidate)
    }
    return rendered_train.conversations, rendered_val.conversations, lineage


def grounding_documents(conn: Any, grounding: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The content hash of each document a grounded training example took its answer from."""
    keys = sorted({(g["source"], g["document"]) for g in grounding})
    if not keys:
        return []
    rows = conn.execute(
        """SELECT d.source, d.path, d.content_hash FROM documents d
             JOIN unnest(%s::text[], %s::text[]) AS k(source, path) ON d.source = k.source AND d.path = k.path
            ORDER BY d.source, d.path""",
        ([k[0] for k in keys], [k[1] for k in keys]),
    ).fetchall()
    conn.commit()
    return [{"source": r[0], "path": r[1], "content_hash": r[2]} for r in rows]


def load_replay(settings: Settings, exclude: Iterable[str] = ()) -> Dataset | None:
    """The general examples mixed into training (settings.train_replay_data), minus any also in ``exclude``."""
    location = settings.train_replay_data.strip()
    if not location:
        return None
    if Path(location).resolve() == Path(settings.general_set).resolve():
        raise ConfigError(
            f"train_replay_data is the gate's general-knowledge set ({location}); expected a different file, "
            "or the gate would score questions the adapter was trained on"
        )
    replay = load_dataset(location)
    if replay.problems:
        raise ConfigError(f"train_replay_data {location}: {replay.problems[0]}")
    skip = set(exclude)
    replay.examples = [e for e in replay.examples if e.digest not in skip]
    return replay


def pick_best(results: list[TrainedCandidate]) -> TrainedCandidate:
    """The sweep point with the lowest validation loss (the first one when none has a validation loss)."""
    if not results:
        raise ConfigError("no training run finished: nothing to pick from")

    def key(r: TrainedCandidate) -> float:
        loss = r.run.best_val_loss
        return math.inf if loss is None or math.isnan(loss) else float(loss)

    sweep = [{"config": r.run.config, "best_val_loss": r.run.best_val_loss, "run_id": r.run_id} for r in results]
    return replace(sorted(results, key=key)[0], sweep=sweep)


def register_candidate(settings: Settings, trained: TrainedCandidate) -> RegisteredCandidate:
    """Publish the adapter to the store and record it as a candidate; returns its version and location."""
    from components.models import base_model_path

    alias, run = trained.alias, trained.run
    uri = artifacts.artifact_uri(settings, alias, trained.run_id)
    artifacts.publish(Path(run.adapter_dir), uri)
    metrics: dict[str, dict[str, Any]] = {
        "training": {
            k: getattr(run, k)
            for k in (
                "best_val_loss",
                "val_losses",
                "train_loss",
                "global_step",
                "epochs_done",
                "stopped_early",
                "train_tokens",
                "tokens_per_s",
                "seconds",
                "device",
                "n_train",
                "n_validation",
                "truncated",
            )
        }
    }
    metrics["training"]["n_test"] = trained.n_test
    metrics["training"]["n_contaminated"] = len(trained.contaminated)
    hyper = {
        **run.config,
        "sweep": trained.sweep,
        "replay": trained.replay,
        "rendering": trained.rendering,
        "heldout": trained.heldout,
        "contaminated": trained.contaminated[:50],
        "data": {"location": trained.data, "snapshot": trained.snapshot},
    }
    with connect(settings) as conn:
        version = registry.register_candidate(
            conn,
            alias=alias,
            base_model=settings.base_model or base_model_path(settings),
            dataset_version=trained.dataset_version,
            dataset_size=trained.dataset_size,
            hyperparameters=hyper,
            metrics=metrics,
            artifact_uri=uri,
            lora_rank=run.lora_rank,
        )
    return RegisteredCandidate(alias=alias, version=version.version, served_name=version.served_name, artifact_uri=uri)


def gate_question_sets(
    conn: Any, settings: Settings, alias: str, data: str | None = None
) -> tuple[heldout.HeldoutSet, dict[str, list[Question]], list[str]]:
    """The alias's held-out set and the prompts the gate asks both models (with the live index's sources)."""
    held = heldout.ensure(conn, settings, alias, data)
    retriever = make_retriever(settings, conn) if settings.train_with_sources else None
    sets, notes = build_question_sets(settings, held.examples, retriever)
    return held, sets, notes


def evaluate_gate(settings: Settings, alias: str, version: int, data: str | None = None) -> GateResult:
    """Ask the candidate and the champion (or base model) the same questions through vLLM and decide on the
    paired outcomes (``components.training.gate``).

    The domain questions are the alias's fixed held-out set (``heldout``), the QA set and the general set;
    ``data`` is read only to draw the held-out set when the alias has none yet and no data of its own. The rank
    is checked first: a too-large adapter is rejected without being sent to vLLM. A candidate that is not
    passed, its scoring failed included, is unloaded again; the verdict, the held-out version it was judged on,
    both score sheets and every comparison go into the registry.
    """
    started = time.monotonic()
    with connect(settings) as conn:
        cand = registry.get_version(conn, alias, version)
        champion = registry.get_champion(conn, alias)
        too_big = adapter_rules.rank_problem(cand.served_name, cand.lora_rank, settings.max_lora_rank)
        if too_big:
            result = GateResult(False, [too_big])
            _record(conn, alias, version, result)
            return result
        held, sets, notes = gate_question_sets(conn, settings, alias, data)
    with VllmClient.for_settings(settings) as client:
        passed = False
        try:
            client.load_adapter(cand.served_name, artifacts.local_path(settings, cand.artifact_uri))
            result = _score(settings, client, cand, champion, sets, notes)
            result.heldout = held.lineage()
            result.seconds = round(time.monotonic() - started, 1)
            passed = result.promote
        finally:  # rejected, or scoring failed: the candidate does not stay loaded in vLLM
            if not passed and (champion is None or champion.version != version):
                _unload(client, cand.served_name)
    with connect(settings) as conn:
        _record(conn, alias, version, result)
    if passed:
        result.staged = _stage(settings, alias, version)
    return result


def _score(
    settings: Settings,
    client: VllmClient,
    cand: registry.AdapterVersion,
    champion: registry.AdapterVersion | None,
    sets: dict[str, list[Question]],
    notes: list[str],
) -> GateResult:
    """Both models' answers to every set, and the verdict on them. Answers a model already gave to the same
    prompt in an earlier gate are reused (``answer_cache``)."""
    from components.models import base_model_path

    base_id = model_identity(settings, settings.served_model_name, base_model_path(settings))
    if champion is not None and champion.version != cand.version:
        champion_dir = artifacts.local_path(settings, champion.artifact_uri)
        client.load_adapter(champion.served_name, champion_dir)
        baseline_model = champion.served_name
        baseline_id = model_identity(settings, champion.served_name, champion_dir)
    else:
        baseline_model, baseline_id = settings.served_model_name, base_id
    cache = AnswerCache(settings) if settings.gate_answer_cache else None
    if cache:
        cache.prune()
    cand_id = model_identity(settings, cand.served_name, artifacts.local_path(settings, cand.artifact_uri))
    cand_answers = answer_all(client, cand.served_name, sets, settings, cache, cand_id)
    base_answers = answer_all(client, baseline_model, sets, settings, cache, baseline_id)
    cand_hits, base_hits = outcomes(sets, cand_answers), outcomes(sets, base_answers)
    against_base = baseline_model == settings.served_model_name
    base_general = None
    if not against_base and GENERAL in sets:  # the base model anchors general knowledge
        general_only = {GENERAL: sets[GENERAL]}
        base_general = outcomes(
            general_only, answer_all(client, settings.served_model_name, general_only, settings, cache, base_id)
        )
    if cache:
        notes.append(f"{cache.found} of {cache.looked_up} answers reused from earlier gates (same model and prompt)")
    against = "the base model" if against_base else "the champion"
    ok, reasons, comparisons = decide(
        cand_hits, base_hits, settings.gate_alpha, against, base_general[GENERAL] if base_general else None
    )
    return GateResult(
        ok,
        reasons,
        accuracy(cand_hits),
        accuracy(base_hits),
        baseline_model,
        accuracy(base_general)[GENERAL] if base_general else None,
        {k: len(v) for k, v in sets.items()},
        notes,
        regressions(sets, cand_answers, base_answers),
        [asdict(c) for c in comparisons],
    )


def _unload(client: VllmClient, name: str) -> None:
    """Unload a candidate; a failure is logged, so it never hides the error that ended the scoring."""
    try:
        client.unload_adapter(name)
    except ServiceError as exc:
        log.error("could not unload candidate %s from vLLM after the gate: %s", name, exc)


def _stage(settings: Settings, alias: str, version: int) -> bool:
    """Have the gateway load and warm a passing candidate on every replica now, so promoting it is a switch."""
    try:
        return stage(settings, alias, version) is not None
    except (ServiceError, httpx.HTTPError) as exc:  # the promotion loads it itself; staging only moves it earlier
        log.warning("could not stage %s v%d ahead of its promotion: %s", alias, version, exc)
        return False


def _record(conn: Any, alias: str, version: int, result: GateResult) -> None:
    verdict = result.to_dict()
    verdict.pop("staged")  # recorded before staging, which only a passing candidate gets: not known yet
    metrics = {"gate": verdict}
    if result.promote:
        registry.set_status(conn, alias, version, "candidate", reason="passed the gate", metrics=metrics)
    else:
        registry.set_status(conn, alias, version, "rejected", reason="; ".join(result.reasons), metrics=metrics)
    conn.commit()


def promote_or_reject(settings: Settings, alias: str, version: int, gate: GateResult) -> Decision:
    """Promote a candidate that passed the gate (through the gateway when it is up); report either way."""
    reason = "; ".join(gate.reasons)
    if not gate.promote:
        return Decision(alias=alias, version=version, promoted=False, reason=reason)
    done = promote(settings, alias, version, reason=reason)
    return Decision(alias=alias, version=version, promoted=True, reason=reason, promotion=done)


def retrain(
    settings: Settings,
    alias: str,
    data: str | None = None,
    force: bool = False,
    sweep: list[dict[str, Any]] | None = None,
    progress: ProgressFn | None = None,
    new_heldout_by: str | None = None,
) -> RetrainResult:
    """The whole pipeline in one process (what `tandem train` runs); same functions as the DAG's tasks.

    ``new_heldout_by`` (the admin action `tandem train --new-heldout`, with who asked) first draws a new version
    of the alias's held-out set from the test split of ``data``; nothing else ever changes what the gate asks.
    """
    renewed = None
    if new_heldout_by:
        with connect(settings) as conn:
            renewed = heldout.renew(conn, settings, alias, data, new_heldout_by).lineage()
        if progress is not None:
            progress({"message": f"held-out set of {alias}: v{renewed['version']} ({renewed['size']} questions)"})
    check = check_new_data(settings, alias, data, force)
    check.heldout = renewed
    if not check.should_train:
        return RetrainResult(check=check, trained=False)
    runs = [train_candidate(settings, alias, data, point, progress) for point in (sweep or [{}])]
    best = pick_best(runs)
    candidate = register_candidate(settings, best)
    if progress is not None:
        progress({"message": f"{alias} v{candidate.version} registered; gate: scoring it and the champion"})
    gate = evaluate_gate(settings, alias, candidate.version, data)
    if progress is not None:
        progress({"message": f"gate: {'promote' if gate.promote else 'reject'}"})
    decision = promote_or_reject(settings, alias, candidate.version, gate)
    return RetrainResult(check=check, trained=True, training=best, candidate=candidate, gate=gate, decision=decision)
