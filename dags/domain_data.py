"""Domain data intake and review: two DAGs over components.training (intake, landing); nothing heavy imported.

`domain_data_intake` (settings.intake_schedule) imports each known alias's new landing files (one mapped task per
alias, each file once, by content hash) and, where examples were approved, updates the domain-data asset with the
alias in the event's extra: retrain_adapter listens to it.

`review_domain_data` (same schedule, one run at a time) shows each pending example to a person as a human-in-the-loop
task (Airflow's Required Actions: question, answer given, correction, cited sources; Approve or Reject, an optional
note), records each decision with the Airflow user who answered, and announces every alias that got approved data.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Asset, Param, dag, get_current_context, task

from components.settings import get_settings

DOMAIN_DATA = Asset("tandem://data/domain")  # extra: {"alias": ..., ...}
APPROVE, REJECT = "Approve", "Reject"
_settings = get_settings()


@task
def known_aliases() -> list[str]:
    from components.db import connect, migrate
    from components.training.intake import known_aliases as known

    migrate()
    with connect(get_settings()) as conn:
        return known(conn, get_settings())


@task(outlets=[DOMAIN_DATA], map_index_template="{{ alias }}")
def import_landing(alias: str, outlet_events: Any = None) -> dict[str, Any]:
    """New landing files of one alias; skipped (no event) when nothing was approved, failed when every new file
    was refused (the refusal, file:line, is the error)."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from components.db import connect
    from components.training.landing import import_landing as run_import

    with connect(get_settings()) as conn:
        report = run_import(conn, get_settings(), alias, by="dag:domain_data_intake")
    for refused in report.refused:
        print(f"refused: {refused}")
    if report.refused and not report.imported:
        raise AirflowFailException(report.refused[0])
    if not report.approved:
        raise AirflowSkipException(f"{alias}: {report.added} new examples, none approved")
    outlet_events[DOMAIN_DATA].extra = {"alias": alias, "source": "landing", "approved": report.approved}
    return report.to_dict()


@dag(
    dag_id="domain_data_intake",
    schedule=_settings.intake_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
    tags=["tandem", "training"],
    doc_md=__doc__,
)
def domain_data_intake() -> None:
    import_landing.expand(alias=known_aliases())


domain_data_intake()


@task
def collect_pending() -> list[dict[str, Any]]:
    """The pending examples this run shows (settings.review_batch at most): id, subject and body of each."""
    from components.db import connect
    from components.training.intake import describe, pending

    alias = get_current_context()["params"]["alias"] or None
    with connect(get_settings()) as conn:
        todo = pending(conn, alias, get_settings().review_batch)
    return [{"id": ex.id, "subject": f"{ex.alias} #{ex.id}: {ex.question[:80]}", "body": describe(ex)} for ex in todo]


def _prompt(item: dict[str, Any]) -> dict[str, Any]:
    """One review task's arguments: what the person reads."""
    return {"subject": item["subject"], "body": item["body"]}


@task(trigger_rule="all_done")
def apply_decisions(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each answered review: approve or reject its example, as the Airflow user who answered (unanswered: left
    pending for the next run). Returns one announcement per alias that got approved examples."""
    from components.db import connect
    from components.training.intake import review

    ti = get_current_context()["ti"]
    done: dict[str, list[int]] = {}
    with connect(get_settings()) as conn:
        for index, example_id in enumerate(item["id"] for item in items):
            answer = ti.xcom_pull(task_ids="review", map_indexes=index, default=None)
            if not answer or not answer.get("chosen_options"):
                print(f"#{example_id}: no answer, stays pending")
                continue
            user = answer.get("responded_by_user") or {}
            by = f"airflow:{user.get('name') or user.get('id') or 'unknown'}"
            note = (answer.get("params_input") or {}).get("note") or None
            decision = "approve" if answer["chosen_options"][0] == APPROVE else "reject"
            report = review(conn, [example_id], decision, by, note)
            print(f"#{example_id}: {decision} by {by}" + (f" (skipped: {report.skipped[0]})" if report.skipped else ""))
            if decision == "approve":
                for alias, changed in report.changed.items():
                    done.setdefault(alias, []).extend(changed)
    return [{"alias": alias, "approved": len(ids)} for alias, ids in sorted(done.items())]


@task(outlets=[DOMAIN_DATA], map_index_template="{{ alias }}")
def announce(alias: str, approved: int, outlet_events: Any = None) -> None:
    """The alias's domain-data asset event: retrain_adapter for this alias follows."""
    outlet_events[DOMAIN_DATA].extra = {"alias": alias, "source": "review", "approved": approved}


@dag(
    dag_id="review_domain_data",
    schedule=_settings.intake_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={"alias": Param("", type="string", description="only this alias's pending examples; empty: every alias")},
    tags=["tandem", "training"],
    doc_md=__doc__,
)
def review_domain_data() -> None:
    pending = collect_pending()
    reviews = HITLOperator.partial(
        task_id="review",
        options=[APPROVE, REJECT],
        response_timeout=timedelta(hours=_settings.review_timeout_h),  # then apply what was answered
        params={"note": Param("", type="string", description="why (recorded with the decision)")},
    ).expand_kwargs(pending.map(_prompt))
    decisions = apply_decisions(pending)
    reviews >> decisions
    announce.expand_kwargs(decisions)


review_domain_data()
