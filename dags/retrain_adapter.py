"""retrain_adapter: when an alias gets new domain data, train a LoRA adapter for it, gate it, promote, announce.

Runs on settings.retrain_schedule (the default alias; an empty schedule: only on data) and on every event of
Asset("tandem://data/domain"), whose extra names the alias. One URI for all aliases, with the alias in the
extra, because a DAG's schedule is fixed when its file is parsed and the aliases are not known then. A run
trains each alias its triggering events name (several events, several aliases: trained one after another,
gated and promoted each on its own), else the `alias` Param. A promotion updates Asset("tandem://adapters/
promoted") with that alias and version, which starts dags/evaluate_hybrid.py for it.

Each task calls one function of components.training.pipeline (the same code `tandem train` runs) and hands the
next one its typed result as a dict (``to_dict``; the next task rebuilds it with ``from_dict``, which refuses a
field it does not know); nothing heavy is imported here. The `data` Param only supplies training examples: the
gate asks the alias's held-out set, fixed at its first training (a new version only through
`tandem train --new-heldout`, never from here).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from components.airflow_api import DOMAIN_DATA_URI, PROMOTED_URI, event_aliases
from components.settings import get_settings

_settings = get_settings()
DOMAIN_DATA = Asset(DOMAIN_DATA_URI)
PROMOTED = Asset(PROMOTED_URI)
_PRESETS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *"}
_CRON = _PRESETS.get(_settings.retrain_schedule, _settings.retrain_schedule).strip()


def _params() -> Any:
    return get_current_context()["params"]


@task
def resolve_aliases(**context: Any) -> list[str]:
    """The aliases of this run: those its domain-data events name, else the `alias` Param (manual, cron)."""
    extras = [dict(e.extra or {}) for e in context["triggering_asset_events"].get(DOMAIN_DATA, [])]
    param = _params()["alias"]
    if not extras:
        return [param]
    aliases, skipped = event_aliases(extras, get_settings().default_alias)
    for line in skipped:
        print(f"left out: {line}")
    if not aliases:
        raise ValueError(f"no event of this run names a valid alias ({len(skipped)} left out: {skipped[0]})")
    return aliases


@task.short_circuit
def check_new_data(aliases: list[str]) -> list[dict[str, Any]]:
    """The aliases with enough new examples (or `force`); none stops the run (downstream skipped)."""
    from components.training.pipeline import check_new_data as check

    params = _params()
    data = params["data"] or None
    due = []
    for alias in aliases:
        result = check(get_settings(), alias=alias, data=data, force=bool(params["force"]))
        print(f"{alias}: {result.reason}")
        if result.should_train:
            due.append(result.to_dict())
    return due


@task
def plan_sweep(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One training job per alias and sweep point."""
    from components.training.pipeline import sweep_points

    params = _params()
    points = sweep_points(params["sweep_learning_rates"], params["sweep_ranks"])
    points = [{**p, "max_steps": params["max_steps"]} if params["max_steps"] else p for p in points]
    return [{"alias": c["alias"], "overrides": p} for c in checks for p in points]


@task(max_active_tis_per_dagrun=1)  # two trainings on the same cores only slow each other down
def train(job: dict[str, Any]) -> dict[str, Any]:
    from components.training.pipeline import train_candidate

    data = _params()["data"] or None
    trained = train_candidate(
        get_settings(), alias=job["alias"], data=data, overrides=job["overrides"], progress=lambda e: print(e)
    )
    return trained.to_dict()


@task
def pick_best(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per alias, the sweep point with the lowest validation loss, registered as a candidate."""
    from components.training.pipeline import pick_best as best_of
    from components.training.pipeline import register_candidate
    from components.training.results import TrainedCandidate

    by_alias: dict[str, list[TrainedCandidate]] = {}
    for result in map(TrainedCandidate.from_dict, results):
        by_alias.setdefault(result.alias, []).append(result)
    return [register_candidate(get_settings(), best_of(runs)).to_dict() for runs in by_alias.values()]


@task(max_active_tis_per_dagrun=1)  # each gate loads its candidate and champion into the same vLLM
def evaluate_gate(candidate: dict[str, Any]) -> dict[str, Any]:
    from components.training.pipeline import evaluate_gate as gate
    from components.training.results import GatedCandidate, RegisteredCandidate

    registered = RegisteredCandidate.from_dict(candidate)
    result = gate(get_settings(), registered.alias, registered.version, _params()["data"] or None)
    return GatedCandidate(candidate=registered, gate=result).to_dict()


@task
def promote_or_reject(gated: dict[str, Any]) -> dict[str, Any]:
    """Promotes a candidate that passed; a rejection is recorded in the registry and reported."""
    from components.training.pipeline import promote_or_reject as decide
    from components.training.results import GatedCandidate

    handed = GatedCandidate.from_dict(gated)
    outcome = decide(get_settings(), handed.candidate.alias, handed.candidate.version, handed.gate)
    print(outcome)
    return outcome.to_dict()


@task(outlets=[PROMOTED])
def announce_promotion(outcome: dict[str, Any], **context: Any) -> None:
    """Updates the promoted-adapter asset with the alias and version promoted; skipped for a rejection."""
    from components.training.results import Decision

    decision = Decision.from_dict(outcome)
    if not decision.promoted or decision.promotion is None:
        raise AirflowSkipException(f"{decision.alias} v{decision.version} was not promoted: {decision.reason}")
    done = decision.promotion
    context["outlet_events"][PROMOTED].extra = {
        "alias": done.alias,
        "version": done.version,
        "served_name": done.served_name,
    }


@dag(
    dag_id="retrain_adapter",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(_CRON, timezone="UTC"), assets=DOMAIN_DATA)
    if _CRON
    else DOMAIN_DATA,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    params={
        "alias": Param(
            _settings.default_alias,
            type="string",
            pattern="^[a-z0-9][a-z0-9_-]{0,62}$",
            description="the alias to train on a manual or scheduled run; a data event names its own",
        ),
        "data": Param(
            "",
            type="string",
            description="training examples: JSONL file, folder or fsspec URL; empty: the alias's data. "
            "The gate's questions are the alias's fixed held-out set, never these",
        ),
        "force": Param(False, type="boolean", description="train even without enough new examples"),
        "sweep_learning_rates": Param([], type="array", description="e.g. [0.0001, 0.0002]: one run each"),
        "sweep_ranks": Param([], type="array", description="e.g. [8, 16]: one run each"),
        "max_steps": Param(0, type="integer", minimum=0, description="0: settings.train_max_steps"),
    },
    tags=["tandem", "training"],
)
def retrain_adapter() -> None:
    runs = train.expand(job=plan_sweep(check_new_data(resolve_aliases())))
    outcomes = promote_or_reject.expand(gated=evaluate_gate.expand(candidate=pick_best(runs)))
    announce_promotion.expand(outcome=outcomes)


retrain_adapter()
