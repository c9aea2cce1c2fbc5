"""retrain_adapter: when domain examples accumulate, train a LoRA adapter, gate it against the champion, promote.

Runs on settings.retrain_schedule and whenever the domain data's asset is updated. Each task calls one
function of components.training.pipeline (the same code `tandem train` runs); nothing heavy is imported here.
The `data` Param only supplies training examples: the gate asks the alias's held-out set, fixed at its first
training (a new version only through `tandem train --new-heldout`, an admin action, never from this DAG).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from components.settings import get_settings

_settings = get_settings()
ALIAS = _settings.default_alias
DOMAIN_DATA = Asset(f"tandem://data/domain/{ALIAS}")
PROMOTED = Asset(f"tandem://adapters/{ALIAS}/promoted")
_PRESETS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *"}


def _conf() -> dict[str, Any]:
    params = get_current_context()["params"]
    return {"alias": params["alias"], "data": params["data"] or None}


@task.short_circuit
def check_new_data() -> dict[str, Any]:
    """Stops the run (downstream skipped) unless enough new examples exist or `force` is set."""
    from components.training.pipeline import check_new_data as check

    params = get_current_context()["params"]
    result = check(get_settings(), force=bool(params["force"]), **_conf())
    print(result["reason"])
    return result if result["should_train"] else {}


@task
def plan_sweep(check: dict[str, Any]) -> list[dict[str, Any]]:
    from components.training.pipeline import sweep_points

    params = get_current_context()["params"]
    points = sweep_points(params["sweep_learning_rates"], params["sweep_ranks"])
    return [{**p, "max_steps": params["max_steps"]} if params["max_steps"] else p for p in points]


@task(max_active_tis_per_dagrun=1)  # two trainings on the same cores only slow each other down
def train(overrides: dict[str, Any]) -> dict[str, Any]:
    from components.training.pipeline import train_candidate

    return train_candidate(get_settings(), overrides=overrides, progress=lambda e: print(e), **_conf())


@task
def pick_best(results: list[dict[str, Any]]) -> dict[str, Any]:
    from components.training.pipeline import pick_best as best_of
    from components.training.pipeline import register_candidate

    return register_candidate(get_settings(), best_of(list(results)))


@task
def evaluate_gate(candidate: dict[str, Any]) -> dict[str, Any]:
    from components.training.pipeline import evaluate_gate as gate

    result = gate(get_settings(), candidate["alias"], candidate["version"], _conf()["data"])
    return {**candidate, "gate": result}


@task.short_circuit
def promote_or_reject(gated: dict[str, Any]) -> dict[str, Any]:
    """Promotes a candidate that passed; a rejected one ends the run here (recorded in the registry)."""
    from components.training.pipeline import promote_or_reject as decide

    outcome = decide(get_settings(), gated["alias"], gated["version"], gated["gate"])
    print(outcome)
    return outcome if outcome["promoted"] else {}


@task(outlets=[PROMOTED])
def announce_promotion(outcome: dict[str, Any], **context: Any) -> None:
    """Updates the promoted-adapter asset, which the evaluation DAG listens to."""
    context["outlet_events"][PROMOTED].extra = {k: outcome[k] for k in ("alias", "version", "served_name")}


@dag(
    dag_id="retrain_adapter",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(
            _PRESETS.get(_settings.retrain_schedule, _settings.retrain_schedule), timezone="UTC"
        ),
        assets=DOMAIN_DATA,
    ),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    params={
        "alias": Param(ALIAS, type="string", pattern="^[a-z0-9][a-z0-9_-]{0,62}$"),
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
    check = check_new_data()
    runs = train.expand(overrides=plan_sweep(check))
    announce_promotion(promote_or_reject(evaluate_gate(pick_best(runs))))


retrain_adapter()
