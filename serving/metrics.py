"""Every Prometheus metric of the gateway, in one place: namespaced ``tandem_``, labelled, explicit buckets.

They live in their own registry (not the process-global one), so two apps in one process (tests) and
libraries that register metrics of their own never collide with them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

NS = "tandem"

# Whole requests: seconds from the first byte in to the last byte out (streams included).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
# Stages in front of generation: query embedding and hybrid retrieval are milliseconds.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Adapter operations: load + warm-up, promotion end to end.
ADAPTER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
CHUNK_BUCKETS = (0, 1, 2, 3, 5, 8, 10, 15, 20)

REQUESTS = Counter(
    "requests",
    "HTTP requests answered by the gateway.",
    ["route", "method", "status", "alias", "adapter_version"],
    namespace=NS,
    subsystem="gateway",
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "request_duration_seconds",
    "Gateway request latency, by route, status, alias and adapter version.",
    ["route", "method", "status", "alias", "adapter_version"],
    namespace=NS,
    subsystem="gateway",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "in_flight_requests",
    "Requests being handled by the gateway now.",
    ["route"],
    namespace=NS,
    subsystem="gateway",
    registry=REGISTRY,
)
REJECTED = Counter(
    "rejected_requests",
    "Requests refused before any work: auth, body size, limits.",
    ["reason"],
    namespace=NS,
    subsystem="gateway",
    registry=REGISTRY,
)
# Limits (serving/limits.py): the per-process cap on requests to vLLM, and rate-limit checks Postgres missed.
UPSTREAM_IN_FLIGHT = Gauge(
    "upstream_in_flight",
    "Requests this gateway process has in flight to vLLM (capped by TANDEM_UPSTREAM_MAX_IN_FLIGHT).",
    namespace=NS,
    subsystem="gateway",
    registry=REGISTRY,
)
UPSTREAM_WAITING = Gauge(
    "upstream_waiting",
    "Requests waiting for a place among those in flight to vLLM (at most TANDEM_UPSTREAM_MAX_QUEUE).",
    namespace=NS,
    subsystem="gateway",
    registry=REGISTRY,
)
RATE_LIMIT_ERRORS = Counter(
    "rate_limit_errors",
    "Rate-limit checks Postgres did not answer within TANDEM_RATE_LIMIT_DB_TIMEOUT_S (the request went through).",
    namespace=NS,
    subsystem="gateway",
    registry=REGISTRY,
)

EMBED_LATENCY = Histogram(
    "embed_duration_seconds",
    "Time to embed the query.",
    namespace=NS,
    subsystem="rag",
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
QUERY_ENCODER = Gauge(
    "query_encoder_info",
    "1 for the runtime the gateway embeds queries with (onnx, or torch when ONNX Runtime is off or did not match).",
    ["runtime"],
    namespace=NS,
    subsystem="rag",
    registry=REGISTRY,
)
QUERY_ENCODER_MISMATCH = Gauge(
    "query_encoder_mismatch",
    "1 while the gateway's query encoder is not the active embedding generation's model: retrieval answers 503.",
    namespace=NS,
    registry=REGISTRY,
)
RETRIEVE_LATENCY = Histogram(
    "retrieve_duration_seconds",
    "Time of the hybrid (vector + full-text, RRF) search in Postgres.",
    ["filtered"],
    namespace=NS,
    subsystem="rag",
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
RETRIEVED_CHUNKS = Histogram(
    "retrieved_chunks",
    "Chunks retrieved per request.",
    namespace=NS,
    subsystem="rag",
    buckets=CHUNK_BUCKETS,
    registry=REGISTRY,
)
RETRIEVAL_ERRORS = Counter(
    "retrieval_errors",
    "Retrieval failures (embedding model or database unavailable).",
    ["stage"],
    namespace=NS,
    subsystem="rag",
    registry=REGISTRY,
)

GENERATE_LATENCY = Histogram(
    "generate_duration_seconds",
    "Time vLLM took to generate (whole answer), by alias, adapter version and streaming.",
    ["alias", "adapter_version", "stream"],
    namespace=NS,
    subsystem="llm",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "time_to_first_token_seconds",
    "Streaming: time from the upstream request to its first content chunk.",
    ["alias", "adapter_version"],
    namespace=NS,
    subsystem="llm",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
ANSWER_CITATIONS = Counter(
    "answer_citations",
    "Grounded answers by who cited their source: model (the answer carries its own [n]), gateway (it cited "
    "none; the gateway appended the sources its sentences stand on), none (no source holds its sentences, or "
    "the gateway's citing is off).",
    ["alias", "cited_by"],
    namespace=NS,
    subsystem="rag",
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "prompt_tokens",
    "Prompt tokens sent to vLLM.",
    ["alias", "adapter_version"],
    namespace=NS,
    subsystem="llm",
    registry=REGISTRY,
)
COMPLETION_TOKENS = Counter(
    "completion_tokens",
    "Completion tokens generated by vLLM.",
    ["alias", "adapter_version"],
    namespace=NS,
    subsystem="llm",
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "upstream_errors",
    "Failed calls to a vLLM replica, by kind (connect, timeout, status, stream).",
    ["replica", "kind"],
    namespace=NS,
    subsystem="llm",
    registry=REGISTRY,
)

ADAPTER_LOADS = Counter(
    "loads",
    "Adapter versions loaded into a vLLM replica.",
    ["alias", "replica"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
ADAPTER_UNLOADS = Counter(
    "unloads",
    "Adapter versions unloaded from a vLLM replica.",
    ["alias", "replica"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
ADAPTER_LOAD_FAILURES = Counter(
    "load_failures",
    "Adapter loads refused or failed (bad artifact, rank too high, vLLM error).",
    ["alias", "replica", "reason"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
ADAPTER_LOAD_LATENCY = Histogram(
    "load_duration_seconds",
    "Time to load (and warm) one adapter version on one replica.",
    ["alias"],
    namespace=NS,
    subsystem="adapter",
    buckets=ADAPTER_BUCKETS,
    registry=REGISTRY,
)
FALLBACK_REQUESTS = Counter(
    "fallback_requests",
    "Requests for an alias served by the base model because its adapter is not loaded.",
    ["alias"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
FALLBACK_ACTIVE = Gauge(
    "fallback_active",
    "1 while an alias is served by the base model because its champion failed to load.",
    ["alias"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
CHAMPION_VERSION = Gauge(
    "champion_version",
    "The adapter version each alias resolves to.",
    ["alias"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
CHAMPION_LOADED = Gauge(
    "champion_loaded",
    "1 when the replica holds the alias's champion adapter, 0 when it does not (the alert's input).",
    ["alias", "replica"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
ADAPTER_STAGES = Counter(
    "adapter_stages",
    "Adapter versions loaded and warmed ahead of their promotion (POST /v1/admin/adapters/stage).",
    ["alias"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
PROMOTIONS = Counter(
    "promotions",
    "Promotions (and rollbacks) through the gateway, by result.",
    ["alias", "result"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
PROMOTION_LATENCY = Histogram(
    "promotion_duration_seconds",
    "Promotion from request to serving: load on every replica, warm, switch.",
    ["alias"],
    namespace=NS,
    subsystem="adapter",
    buckets=ADAPTER_BUCKETS,
    registry=REGISTRY,
)
RECONCILE_RUNS = Counter(
    "reconcile_runs",
    "Reconciler rounds, by result (ok, error).",
    ["result"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)

# Fleet lifecycle (serving/lifecycle.py, serving/registry_listener.py, serving/reconciler.py)
REGISTRY_NOTIFICATIONS = Counter(
    "registry_notifications",
    "Registry switches this gateway heard on LISTEN tandem_registry, by event (promote, rollback, stage).",
    ["event"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
REGISTRY_LISTENER_UP = Gauge(
    "registry_listener_up",
    "1 while the LISTEN connection to Postgres is open, 0 while it reconnects (or TANDEM_REGISTRY_NOTIFY=false).",
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
REGISTRY_LISTENER_RECONNECTS = Counter(
    "registry_listener_reconnects",
    "LISTEN connections opened again after one was lost.",
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
ALIAS_LOCK_WAIT = Histogram(
    "alias_lock_wait_seconds",
    "Time a promotion, stage or rollback waited for its alias's fleet-wide advisory lock.",
    namespace=NS,
    subsystem="adapter",
    buckets=(*STAGE_BUCKETS, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
ALIAS_LOCK_BUSY = Counter(
    "alias_lock_busy",
    "Promotions, stages and rollbacks refused with 409 because another held the alias's lock past the wait.",
    ["alias"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
RECONCILE_REPLICA_SKIPPED = Counter(
    "reconcile_replica_skipped",
    "Reconcile rounds that only refreshed a replica's routes: another gateway held its reconcile lock.",
    ["replica"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)
DRAIN_DEFERRED = Counter(
    "drain_deferred",
    "Unloads of a retired version put off, by why (grace, running on vLLM, in flight here, alias locked).",
    ["reason"],
    namespace=NS,
    subsystem="adapter",
    registry=REGISTRY,
)

REPLICA_HEALTHY = Gauge(
    "healthy",
    "1 if the vLLM replica answered its last health check.",
    ["replica"],
    namespace=NS,
    subsystem="replica",
    registry=REGISTRY,
)
REPLICA_OUTSTANDING = Gauge(
    "outstanding_requests",
    "Requests the gateway has sent to the replica and not yet finished.",
    ["replica"],
    namespace=NS,
    subsystem="replica",
    registry=REGISTRY,
)
REPLICA_ADAPTERS = Gauge(
    "loaded_adapters",
    "Adapter versions loaded on the replica, as last seen.",
    ["replica"],
    namespace=NS,
    subsystem="replica",
    registry=REGISTRY,
)

# Feedback from answers (serving/answer_log.py, serving/routers/feedback.py).
ANSWERS_RECORDED = Counter(
    "answers_recorded",
    "Answers written to Postgres for feedback (TANDEM_RECORD_ANSWERS).",
    namespace=NS,
    subsystem="feedback",
    registry=REGISTRY,
)
ANSWERS_DROPPED = Counter(
    "answers_dropped",
    "Answers not recorded: the queue was full, or Postgres failed the write (the answer itself went out).",
    ["reason"],
    namespace=NS,
    subsystem="feedback",
    registry=REGISTRY,
)
ANSWERS_PURGED = Counter(
    "answers_purged",
    "Recorded answers deleted after TANDEM_ANSWER_RETENTION_DAYS.",
    namespace=NS,
    subsystem="feedback",
    registry=REGISTRY,
)
FEEDBACK = Counter(
    "ratings",
    "Feedback posted to /v1/feedback, by rating and whether it carried a correction.",
    ["rating", "correction"],
    namespace=NS,
    subsystem="feedback",
    registry=REGISTRY,
)

UPSTREAM_RETRIES = Counter(
    "retries",
    "Requests sent again to another replica after the first failed before any answer byte (failover).",
    ["replica", "reason"],
    namespace=NS,
    subsystem="replica",
    registry=REGISTRY,
)
DISCOVERY_ERRORS = Counter(
    "errors",
    "Discovery rounds in which a dns+ name did not resolve (its last known replicas were kept).",
    ["name"],
    namespace=NS,
    subsystem="discovery",
    registry=REGISTRY,
)
DISCOVERY_REPLICAS = Gauge(
    "replicas",
    "Replicas a dns+ name resolved to in the last round (or the last known set when it failed).",
    ["name"],
    namespace=NS,
    subsystem="discovery",
    registry=REGISTRY,
)
DISCOVERY_ADMITTED = Counter(
    "admitted",
    "Replicas found by discovery and put into rotation after they received the champions.",
    namespace=NS,
    subsystem="discovery",
    registry=REGISTRY,
)

# --- GPU exporter (serving/gpu_exporter.py), its own registry: it runs as its own process. -----------------
# Names map onto NVIDIA dcgm-exporter's (docs/gateway.md, "GPU exporter"), labels follow its gpu/UUID/modelName.
GPU_REGISTRY = CollectorRegistry(auto_describe=True)
_GPU_LABELS = ["gpu", "UUID", "modelName"]

GPU_COUNT = Gauge(
    "gpus", "GPUs visible to NVML (0 when there is no GPU or driver).", namespace=NS, registry=GPU_REGISTRY
)
GPU_UTILIZATION = Gauge(
    "gpu_utilization_percent",
    "GPU utilisation (DCGM_FI_DEV_GPU_UTIL).",
    _GPU_LABELS,
    namespace=NS,
    registry=GPU_REGISTRY,
)
GPU_MEMORY_UTILIZATION = Gauge(
    "gpu_memory_copy_utilization_percent",
    "Memory controller utilisation (DCGM_FI_DEV_MEM_COPY_UTIL).",
    _GPU_LABELS,
    namespace=NS,
    registry=GPU_REGISTRY,
)
GPU_MEMORY_USED = Gauge(
    "gpu_memory_used_bytes",
    "Framebuffer memory used (DCGM_FI_DEV_FB_USED x 2^20).",
    _GPU_LABELS,
    namespace=NS,
    registry=GPU_REGISTRY,
)
GPU_MEMORY_FREE = Gauge(
    "gpu_memory_free_bytes",
    "Framebuffer memory free (DCGM_FI_DEV_FB_FREE x 2^20).",
    _GPU_LABELS,
    namespace=NS,
    registry=GPU_REGISTRY,
)
GPU_MEMORY_TOTAL = Gauge(
    "gpu_memory_total_bytes",
    "Framebuffer memory total (DCGM_FI_DEV_FB_TOTAL x 2^20).",
    _GPU_LABELS,
    namespace=NS,
    registry=GPU_REGISTRY,
)
GPU_TEMPERATURE = Gauge(
    "gpu_temperature_celsius",
    "GPU temperature (DCGM_FI_DEV_GPU_TEMP).",
    _GPU_LABELS,
    namespace=NS,
    registry=GPU_REGISTRY,
)
GPU_POWER = Gauge(
    "gpu_power_usage_watts", "Power draw (DCGM_FI_DEV_POWER_USAGE).", _GPU_LABELS, namespace=NS, registry=GPU_REGISTRY
)
GPU_SCRAPE_ERRORS = Counter(
    "gpu_scrape_errors",
    "NVML reads that failed (a field left out of one scrape).",
    ["field"],
    namespace=NS,
    registry=GPU_REGISTRY,
)
GPU_PER_DEVICE = (
    GPU_UTILIZATION,
    GPU_MEMORY_UTILIZATION,
    GPU_MEMORY_USED,
    GPU_MEMORY_FREE,
    GPU_MEMORY_TOTAL,
    GPU_TEMPERATURE,
    GPU_POWER,
)
