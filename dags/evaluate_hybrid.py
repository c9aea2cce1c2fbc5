"""evaluate_hybrid: RAG vs fine-tune vs hybrid on the held-out QA set, nightly and after each promotion.

Only wiring: the work is components.evaluation.run_evaluation, the same function `tandem eval` runs.
The retraining DAG updates Asset("tandem://adapters/<alias>/promoted") when it promotes a version; this DAG
runs on that asset or on TANDEM_EVAL_SCHEDULE, whichever comes first.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from components.settings import get_settings

_settings = get_settings()
ALIAS = _settings.default_alias
PROMOTED = Asset(f"tandem://adapters/{ALIAS}/promoted")
EVALUATED = Asset(f"tandem://evaluations/{ALIAS}")


@dag(
    dag_id="evaluate_hybrid",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(_settings.eval_schedule, timezone="UTC"), assets=PROMOTED
    ),
    catchup=False,
    max_active_runs=1,
    tags=["tandem", "evaluation"],
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    params={
        "alias": Param(ALIAS, type="string", description="adapter alias whose champion the adapter arms use"),
        "limit": Param(None, type=["null", "integer"], minimum=1, description="only the first N questions"),
        "qa": Param(None, type=["null", "string"], description="QA set (JSONL); default: TANDEM_QA_SET"),
    },
    doc_md=__doc__,
)
def evaluate_hybrid() -> None:
    @task
    def preflight(params: dict[str, Any] | None = None) -> int:
        """Fail fast, before any model work: the QA set must load and the gateway must answer."""
        from components.evaluation.qa import load_qa
        from components.evaluation.run import check_gateway, resolve_qa_path

        settings = get_settings()
        items = load_qa(resolve_qa_path(settings, (params or {}).get("qa")), limit=(params or {}).get("limit"))
        check_gateway(settings)
        return len(items)

    @task(outlets=[EVALUATED])
    def evaluate(questions: int, params: dict[str, Any] | None = None, dag_run: Any = None) -> dict[str, Any]:
        """The four arms and retrieval alone; the report is written and the scores stored."""
        from components.evaluation.run import run_evaluation

        p = params or {}
        run_type = getattr(dag_run, "run_type", None) or "manual"
        run_type = getattr(run_type, "value", run_type)  # DagRunType enum -> "scheduled", "asset_triggered", ...
        report = run_evaluation(
            get_settings(), qa_path=p.get("qa"), alias=p.get("alias"), limit=p.get("limit"), trigger=f"dag:{run_type}"
        )
        return {
            "run_id": report.run_id,
            "out_dir": report.out_dir,
            "questions": questions,
            "accuracy": {a.arm: a.accuracy for a in report.arms},
            "recommendation": report.recommendation,
        }

    evaluate(preflight())


evaluate_hybrid()
