"""evaluate_hybrid: RAG vs fine-tune vs hybrid on the held-out QA set, nightly and after each promotion.

Only wiring: the work is components.evaluation.run_evaluation, the same function `tandem eval` runs.
The retraining DAG updates Asset("tandem://adapters/promoted") with the alias and version it promoted; this DAG
runs on that asset or on TANDEM_EVAL_SCHEDULE (empty: only on promotions), whichever comes first. A run
evaluates each alias its triggering events name, one after another, else the `alias` Param (manual, cron);
each evaluation updates Asset("tandem://adapters/evaluated") with its alias.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from components.airflow_api import EVALUATED_URI, PROMOTED_URI, event_aliases
from components.settings import get_settings

_settings = get_settings()
PROMOTED = Asset(PROMOTED_URI)
EVALUATED = Asset(EVALUATED_URI)
_CRON = _settings.eval_schedule.strip()


@dag(
    dag_id="evaluate_hybrid",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(_CRON, timezone="UTC"), assets=PROMOTED)
    if _CRON
    else PROMOTED,
    catchup=False,
    max_active_runs=1,
    tags=["tandem", "evaluation"],
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    params={
        "alias": Param(
            _settings.default_alias,
            type="string",
            description="adapter alias whose champion the adapter arms use (a promotion event names its own)",
        ),
        "limit": Param(None, type=["null", "integer"], minimum=1, description="only the first N questions"),
        "qa": Param(None, type=["null", "string"], description="QA set (JSONL); default: TANDEM_QA_SET"),
    },
    doc_md=__doc__,
)
def evaluate_hybrid() -> None:
    @task
    def resolve_aliases(params: dict[str, Any] | None = None, **context: Any) -> list[str]:
        """The aliases of this run: those its promotion events name, else the `alias` Param."""
        extras = [dict(e.extra or {}) for e in context["triggering_asset_events"].get(PROMOTED, [])]
        param = (params or {}).get("alias") or get_settings().default_alias
        if not extras:
            return [param]
        aliases, skipped = event_aliases(extras, get_settings().default_alias)
        for line in skipped:
            print(f"left out: {line}")
        if not aliases:
            raise ValueError(f"no event of this run names a valid alias ({len(skipped)} left out: {skipped[0]})")
        return aliases

    @task
    def preflight(params: dict[str, Any] | None = None) -> int:
        """Fail fast, before any model work: the QA set must load and the gateway must answer."""
        from components.evaluation.qa import load_qa
        from components.evaluation.run import check_gateway, resolve_qa_path

        settings = get_settings()
        items = load_qa(resolve_qa_path(settings, (params or {}).get("qa")), limit=(params or {}).get("limit"))
        check_gateway(settings)
        return len(items)

    @task(outlets=[EVALUATED], max_active_tis_per_dagrun=1)  # evaluations share the gateway and vLLM
    def evaluate(
        alias: str, questions: int, params: dict[str, Any] | None = None, dag_run: Any = None, **context: Any
    ) -> dict[str, Any]:
        """The four arms and retrieval alone for one alias; the report is written and the scores stored."""
        from components.evaluation.run import run_evaluation

        p = params or {}
        run_type = getattr(dag_run, "run_type", None) or "manual"
        run_type = getattr(run_type, "value", run_type)  # DagRunType enum -> "scheduled", "asset_triggered", ...
        report = run_evaluation(
            get_settings(), qa_path=p.get("qa"), alias=alias, limit=p.get("limit"), trigger=f"dag:{run_type}"
        )
        context["outlet_events"][EVALUATED].extra = {
            "alias": alias,
            "adapter_version": report.adapter_version,
            "run_id": report.run_id,
        }
        return {
            "alias": alias,
            "run_id": report.run_id,
            "out_dir": report.out_dir,
            "questions": questions,
            "accuracy": {a.arm: a.accuracy for a in report.arms},
            "recommendation": report.recommendation,
        }

    evaluate.partial(questions=preflight()).expand(alias=resolve_aliases())


evaluate_hybrid()
