"""One settings class for all of Tandem.

Every value can be set by an environment variable with the ``TANDEM_`` prefix or in a ``.env`` file, e.g.
``TANDEM_STATE_DIR=/srv/tandem`` or ``TANDEM_VLLM_URLS=http://a:8100,http://b:8100``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_BASE_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"

# Data that belongs to Tandem and ships inside the package, so it is found from any working directory.
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
GENERAL_SET = PACKAGE_DATA / "general_knowledge.jsonl"
REPLAY_SET = PACKAGE_DATA / "replay.jsonl"
# The checkout the package runs from (site-packages when installed): the sample domain's data/ lies beside it.
REPO_ROOT = Path(__file__).resolve().parents[1]


def find_repo_path(value: str | Path) -> Path:
    """``value`` itself, or the checkout's file of that name when ``value`` is a relative path found only there.

    A relative path that exists from the working directory, an absolute path, a URL and a path found nowhere
    are returned unchanged, so ``data/sample/docs`` works from the checkout's root and from any other folder.
    """
    path = Path(value)
    if "://" in str(value) or path.is_absolute() or path.exists():
        return path
    shipped = REPO_ROOT / path
    return shipped if shipped.exists() else path


class DataLocation(TypedDict):
    path: str | None  # absolute for a local path; None when the setting is off (empty replay set)
    exists: bool | None  # None when not checked: a URL, or the setting is off


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Tandem's configuration; defaults run everything embedded on 127.0.0.1."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", env_file=".env", extra="ignore")

    # Where every file Tandem writes at run time goes.
    state_dir: Path = Path(".tandem")

    # Postgres: empty means the embedded server under state_dir/postgres.
    database_url: str = ""
    # The gateway's own connection, as role tandem_gateway (migration 0006; components/db/gateway_role.py):
    # empty with the embedded server, derived from it; empty with an external database_url, the gateway refuses
    # to start rather than connect as the schema owner
    gateway_database_url: str = ""

    # Models: empty means the offline defaults shipped by PyPI packages.
    base_model: str = ""
    served_model_name: str = "smollm2-135m"
    embedding_model: str = ""
    embedding_dim: int = 384
    # torch threads for the gateway's query embeddings: one short query gains nothing from more, and on a few
    # cores shared with vLLM more threads spin against it (measured 25 ms with 1 thread vs 250 ms with 2)
    query_embed_threads: int = Field(default=1, ge=1)
    # "onnx": the gateway runs query embeddings in ONNX Runtime (9 ms vs 22 ms per query here), after checking
    # its vectors match torch's; "torch": always the sentence-transformers model
    query_embed_runtime: Literal["onnx", "torch"] = "onnx"

    # Serving
    host: str = "127.0.0.1"
    gateway_port: int = 8000
    vllm_port: int = 8100
    airflow_port: int = 8080
    prometheus_port: int = 9090
    gpu_exporter_port: int = 9400
    # Monitoring (components/stack/alertmanager.py, serving/routers/dashboards.py): Alertmanager and the Postgres
    # exporter started by `tandem up`; the Prometheus the dashboards page reads (empty: the local one)
    alertmanager_port: int = 9093
    postgres_exporter_port: int = 9187
    prometheus_url: str = ""
    # vLLM replicas (serving/discovery.py): static URLs and/or `dns+http://NAME:PORT` entries, each A/AAAA address
    # of NAME one replica, resolved every discovery_interval_s off the event loop (a Kubernetes headless Service).
    # discovery_nameserver: HOST:PORT of the DNS server to ask instead of the system resolver (empty: the system's).
    vllm_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    discovery_interval_s: float = Field(default=5.0, gt=0)
    discovery_nameserver: str = ""
    # A fleet on one machine (`tandem up`): this many vLLM replicas and gateways, on consecutive ports from
    # vllm_port and gateway_port; every local gateway gets every local replica.
    vllm_replicas: int = Field(default=1, ge=1, le=16)
    gateway_replicas: int = Field(default=1, ge=1, le=16)
    vllm_max_model_len: int = 2048
    vllm_kv_cache_gib: int = 1
    vllm_extra_args: str = ""
    # "auto": bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32 (bf16 emulated on AVX2
    # was 2.6x slower per request here); or any dtype vLLM takes
    vllm_dtype: str = "auto"
    # Keys (components/keys.py): comma-separated "name:secret" entries; unset, the key file `tandem up` writes
    # under state_dir is used; with neither, /v1 and the admin API refuse every request (fail closed).
    # vllm_api_key: the key vLLM is started with and the gateway and training send to it.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    vllm_api_key: str = ""
    startup_timeout_s: float = 240.0

    # LoRA limits, shared by training (refuse before promotion) and vLLM (--max-lora-rank, --max-loras)
    max_lora_rank: int = 16
    max_loras: int = 2
    # adapters vLLM keeps in memory (--max-cpu-loras): champions, staged candidates and a draining old version
    # stay resident instead of being read from disk again in the middle of an engine step
    max_cpu_loras: int = 8

    # Airflow's REST API (components/airflow_api.py), where the CLI announces new domain data. Empty URL: the local
    # standalone on airflow_port. A token, or a user and password; an empty password with the local Airflow reads
    # the file its simple auth manager writes under airflow_home. With no credentials the call is refused.
    airflow_url: str = ""
    airflow_username: str = "admin"
    airflow_password: str = ""
    airflow_token: str = ""

    # Schedules (cron or Airflow presets)
    ingest_schedule: str = "@hourly"
    retrain_schedule: str = "@daily"
    eval_schedule: str = "@daily"

    # Ingestion (components/ingest): chunk size in embedding-model tokens, overlap, limits, embedding batch
    ingest_chunk_tokens: int = 240
    ingest_chunk_overlap: int = 32
    ingest_max_document_bytes: int = 5_000_000
    ingest_embed_batch: int = 32
    # documents to read (new or re-chunked) from which the reader parses them in its own process, so it shares
    # no GIL with the embedding model; 0 always, a very large number never
    ingest_reader_process_docs: int = 200
    # Ingestion safety (components/ingest): where sources may be (local folders, symlinks resolved, and URL
    # prefixes; TANDEM_DOCS_SOURCE is always allowed too), the share of a source's documents one run may delete
    # (deleting all of them is always refused) unless --allow-mass-delete, and each document's parse limits in
    # the reader process (seconds; MiB of address space above the idle reader); 0 turns a limit off, and with
    # both off documents are parsed in a thread below ingest_reader_process_docs, with no limit
    ingest_allowed_roots: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [str(REPO_ROOT / "data")])
    ingest_max_delete_share: float = Field(default=0.5, ge=0.0, le=1.0)
    ingest_document_timeout_s: float = Field(default=120.0, ge=0.0)
    ingest_document_memory_mb: int = Field(default=1024, ge=0)
    _split_ingest_roots = field_validator("ingest_allowed_roots", mode="before")(_split_csv)
    retrieval_ef_search: int = 64

    # Sample domain shipped with the repo; a relative path missing from the working directory is looked up in the
    # checkout (find_repo_path)
    docs_source: str = Field(default="data/sample/docs", validate_default=True)
    train_data: str = Field(default="data/sample/train", validate_default=True)
    qa_set: str = Field(default="data/sample/qa/heldout.jsonl", validate_default=True)
    default_alias: str = "harbour"

    # Gateway (serving/): prompt, limits, adapter reconciler, upstream timeouts
    assistant_org: str = "Marrowdene Harbour Authority"
    rag_top_k: int = 5
    rag_candidates: int = 40
    max_body_bytes: int = 1_048_576
    max_messages: int = 64
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_top_k: int = 20
    # Decoding of answers grounded in retrieved sources, used where the caller leaves a field unset; one set for
    # the base model, one for an alias's adapter (chosen with `tandem bench decoding`, docs/training.md). JSON in
    # the environment, e.g. TANDEM_RAG_DECODING_BASE='{"temperature": 0, "stop": ["\\n\\n"]}'. No repetition
    # penalty: vLLM applies it to the prompt's tokens too, and a grounded answer has to repeat its sources' words.
    rag_decoding_base: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0.0, "repetition_penalty": 1.0, "max_tokens": 96}
    )
    rag_decoding_adapter: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0.0, "repetition_penalty": 1.0, "max_tokens": 96}
    )
    # A grounded answer that cites no source gets the markers of the sources its sentences stand on appended
    # (" [1]", the gateway's attribution; docs/gateway.md "Citations the gateway writes"); off: the text is the model's
    rag_cite_attributed: bool = True
    reconcile_interval_s: float = 5.0
    # Fleet lifecycle (serving/lifecycle.py, docs/gateway.md "Fleet: promotion, drain, reconcile"): gateways LISTEN for
    # registry switches (off: only the reconcile round picks them up); a second promotion of one alias waits this
    # long for the alias's advisory lock, then 409; a retired version stays on a replica at least the grace
    # period after its switch, and until vLLM reports no running or waiting request on it
    registry_notify: bool = True
    promotion_lock_wait_s: float = Field(default=10.0, gt=0)
    adapter_drain_grace_s: float = Field(default=15.0, ge=0)
    upstream_timeout_s: float = 300.0
    db_pool_size: int = 4

    # Limits (serving/limits.py, docs/gateway.md "Limits"): request shape, rate limits per key name counted in Postgres
    # (every gateway shares them; 0 turns one off), a per-process cap on requests to vLLM with a short queue,
    # statement_timeout on every gateway query, and the time budgets of /metrics' snapshot and /ready
    max_n: int = Field(default=4, ge=1)
    max_message_chars: int = Field(default=32_768, ge=1)
    max_filters: int = Field(default=8, ge=0)
    max_filter_values: int = Field(default=32, ge=1)
    rate_limit_requests_per_minute: int = Field(default=600, ge=0)
    # completion tokens reserved per minute: max_tokens (or the default applied) x n, charged before generation
    rate_limit_tokens_per_minute: int = Field(default=200_000, ge=0)
    rate_limit_db_timeout_s: float = Field(default=1.0, gt=0)  # past it the limiter lets the request through
    upstream_max_in_flight: int = Field(default=32, ge=1)
    upstream_max_queue: int = Field(default=64, ge=0)
    upstream_queue_timeout_s: float = Field(default=1.5, ge=0)
    db_statement_timeout_ms: int = Field(default=5_000, ge=0)  # 0: no limit
    metrics_refresh_interval_s: float = Field(default=10.0, gt=0)
    metrics_db_budget_s: float = Field(default=2.0, gt=0)
    ready_db_budget_s: float = Field(default=1.0, gt=0)
    # Fault tolerance (issue 14): how long a gateway request waits for a pooled Postgres connection before its
    # DB step fails (retrieval then answers 503), so a chat with Postgres down answers in about 3 s, not 10 s
    db_pool_timeout_s: float = Field(default=2.0, gt=0)
    # Feedback from answers (serving/answer_log.py, routers/feedback.py, docs/gateway.md "Feedback from answers"):
    # record each answer (question, alias and version, retrieved chunk ids, answer, key name) so POST /v1/feedback
    # can rate it or correct it. On by default for local use; a deployment that handles personal data decides
    # (questions are stored as asked), and rows older than answer_retention_days are purged. The queue bounds
    # what waits for Postgres (beyond it answers are dropped and counted, never delayed).
    record_answers: bool = True
    answer_retention_days: int = Field(default=30, ge=1)
    answer_log_queue: int = Field(default=1000, ge=1)
    answer_purge_interval_s: float = Field(default=3600.0, gt=0)
    feedback_max_correction_chars: int = Field(default=4000, ge=1, le=32_768)

    # Evaluation (`tandem eval`, DAG evaluate_hybrid): RAG vs fine-tune vs hybrid through the gateway
    eval_max_tokens: int = 48
    eval_concurrency: int = 2
    eval_request_timeout_s: float = 180.0
    # Staleness after documents change (components/evaluation/staleness.py, DAG check_staleness): questions asked
    # per check about the champion's changed documents, and whether a stale champion is rolled back on its own
    staleness_max_questions: int = Field(default=20, ge=1)
    auto_rollback: bool = False

    # Training (components/training/): LoRA hyperparameters, when to retrain, the evaluation gate, artifacts
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_layers: int = Field(default=0, ge=0)  # LoRA in the last N decoder layers only (0: all); see TrainConfig
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    train_learning_rate: float = 2e-4
    train_epochs: int = 3
    train_max_steps: int = 0  # 0: no cap, epochs decide
    train_max_seq_len: int = 1536  # a RAG prompt with 5 sources of 240 tokens is up to ~1,300 here
    train_batch_size: int = 8
    train_micro_batch_size: int = 2  # examples per forward pass; gradient accumulation makes up train_batch_size
    train_early_stopping_patience: int = 2
    train_heldout_fraction: float = 0.1  # of each alias's examples, for validation loss and again for the gate
    # Train as you serve: examples rendered into the gateway's RAG prompt with chunks retrieved from the live
    # index (components/training/raft.py); off: the examples as written
    train_with_sources: bool = True
    # Share of examples whose sources lack the answer (target: "not in the sources"). Off by default: at 0.1 the
    # one-epoch adapter abstained on answerable questions; at 0 the gate's domain gain was largest (docs/training.md).
    train_unanswerable_share: float = Field(default=0.0, ge=0.0, lt=1.0)
    train_seed: int = 0
    domain_data_root: str = "data/domain"  # aliases other than default_alias read <root>/<alias>
    # Domain data intake (components/training/intake.py, docs/training.md "Domain data intake and review"): the aliases
    # examples may be added for (besides default_alias and every alias in the adapter registry); each alias's
    # landing location, any fsspec URL with "{alias}" in it or one subfolder per alias (empty: the data_location
    # above); whether files found there are approved as they are imported (feedback corrections never are); the
    # longest JSONL line read (a longer one is refused unread); the intake and review DAGs' schedule; how many
    # pending examples one review run shows, and how long it waits for a person (unanswered ones stay pending)
    aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    domain_data_url: str = ""
    intake_auto_approve: bool = True
    intake_max_line_bytes: int = Field(default=1_048_576, ge=1)
    intake_schedule: str = "*/2 * * * *"
    review_batch: int = Field(default=20, ge=1)
    review_timeout_h: float = Field(default=24.0, gt=0)
    min_new_examples: int = 20
    # The gate's general-knowledge questions; the default ships in the package (components/data/)
    general_set: str = str(GENERAL_SET)
    # General examples mixed into every training run (rehearsal), so the adapter keeps general knowledge; they
    # only ever go into the training split. Empty: none. It must not be the gate's general_set. The default
    # ships in the package (components/data/).
    train_replay_data: str = str(REPLAY_SET)
    # the gate rejects a candidate whose loss on any set has an exact McNemar p below this (paired questions)
    gate_alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    gate_max_questions: int = 60  # per evaluation set
    # The gate's own domain questions (JSONL like qa_set), kept apart from qa_set, the questions `tandem eval`
    # reports on, so that promotion and the reported figures never rest on the same questions. Empty: gate.jsonl
    # beside qa_set when there is one (data/sample/qa/gate.jsonl for the sample), else none.
    gate_qa_set: str = ""
    gate_max_tokens: int = 64
    gate_concurrency: int = 8
    # The gate reuses a model's earlier answer to the same prompt (components/training/answer_cache.py): a retrain
    # against an unchanged champion asks vLLM only for the candidate. Answers unused this many days are dropped.
    gate_answer_cache: bool = True
    gate_answer_cache_days: int = Field(default=30, ge=1)
    adapter_store: str = ""  # folder or fsspec URL; empty: state_dir/adapters

    _split_lists = field_validator("vllm_urls", "api_keys", "admin_api_keys", "lora_target_modules", mode="before")(
        _split_csv
    )
    _split_aliases = field_validator("aliases", mode="before")(_split_csv)

    @field_validator("state_dir", mode="after")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        # Resolved once, so Airflow tasks and subprocesses with another cwd find the same state.
        return value.expanduser().resolve()

    @field_validator("docs_source", "train_data", "qa_set", "gate_qa_set", mode="after")
    @classmethod
    def _sample_data_from_checkout(cls, value: str) -> str:
        if not value:
            return value
        found = find_repo_path(value)
        return value if found == Path(value) else str(found)

    def data_locations(self) -> dict[str, DataLocation]:
        """Where the data Tandem reads resolves to: docs, train (the default alias's), QA, the gate's QA, general,
        replay."""
        values = {
            "docs": self.docs_source,
            "train": self.train_data,
            "qa": self.qa_set,
            "gate": self.gate_questions or "",
            "general": self.general_set,
            "replay": self.train_replay_data.strip(),
        }
        out: dict[str, DataLocation] = {}
        for name, value in values.items():
            if not value:
                out[name] = {"path": None, "exists": None}
            elif "://" in value:
                out[name] = {"path": value, "exists": None}
            else:
                path = Path(value).expanduser().resolve()
                out[name] = {"path": str(path), "exists": path.exists()}
        return out

    @property
    def gate_questions(self) -> str | None:
        """The gate's QA file: gate_qa_set, else gate.jsonl beside a local qa_set when it exists, else None."""
        if self.gate_qa_set:
            return self.gate_qa_set
        if not self.qa_set or "://" in self.qa_set:
            return None
        beside = Path(self.qa_set).with_name("gate.jsonl")
        return str(beside) if beside.is_file() else None

    # Derived locations: all under state_dir, so two copies with different state dirs never touch.
    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def postgres_dir(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def run_dir(self) -> Path:
        """Pid files and logs of the processes `tandem up` starts."""
        return self.state_dir / "run"

    @property
    def adapters_dir(self) -> Path:
        return self.state_dir / "adapters"

    @property
    def adapter_store_url(self) -> str:
        """Where trained adapters are kept: TANDEM_ADAPTER_STORE (folder or fsspec URL) or state_dir/adapters."""
        return self.adapter_store.rstrip("/") or str(self.adapters_dir)

    @property
    def airflow_home(self) -> Path:
        return self.state_dir / "airflow"

    @property
    def local_vllm_url(self) -> str:
        return f"http://{self.host}:{self.vllm_port}"

    @property
    def airflow_api_url(self) -> str:
        """Airflow's API server: TANDEM_AIRFLOW_URL, or the local standalone `tandem up` starts."""
        return self.airflow_url.rstrip("/") or f"http://{self.host}:{self.airflow_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    @property
    def vllm_endpoints(self) -> list[str]:
        """The vLLM servers the gateway talks to: TANDEM_VLLM_URLS (`dns+` entries as written), or the local ones
        `tandem up` starts (vllm_replicas of them, on consecutive ports)."""
        local = [f"http://{self.host}:{self.vllm_port + i}" for i in range(self.vllm_replicas)]
        return [u.rstrip("/") for u in self.vllm_urls] or local

    @property
    def manages_vllm(self) -> bool:
        """True when Tandem starts vLLM itself (no external TANDEM_VLLM_URLS)."""
        return not self.vllm_urls


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; tests call ``get_settings.cache_clear()`` after changing env)."""
    return Settings()
