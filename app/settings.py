"""The one settings object. Every knob is read from the environment with the ``TRACELEARN_`` prefix
(or a ``.env`` file); nothing else in the code reads ``os.environ``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, computed_field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.learner.allocator import AllocatorChoice


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRACELEARN_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=Path(".tracelearn"),
        description="Where the embedded database, adapters, the bundled model and logs live.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL. Default: SQLite file `<data_dir>/tracelearn.db`. Production: "
        "`postgresql+psycopg://user:pass@host/db`.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker. Default: kombu's SQLAlchemy transport on "
        "`<data_dir>/broker.db` (no server). Production: `redis://host:6379/0`.",
    )
    task_always_eager: bool = Field(
        default=False,
        description="Run Celery tasks inline in the caller (tests and one-shot CLI runs only).",
    )
    environment: Literal["development", "production", "test"] = Field(
        default="development", description="Deployment flavour; `production` refuses the default "
        "session secret.",
    )

    # Ingest limits
    heldout_fraction: float = Field(
        default=0.2, ge=0.0, le=1.0,
        description="Share of traces assigned to the held-out split by a stable hash of "
        "(tenant, external_id).",
    )
    max_batch_items: int = Field(default=1000, ge=1, description="Max traces per ingest request.")
    max_body_bytes: int = Field(
        default=5_000_000, ge=1024, description="Max request body size in bytes (413 beyond)."
    )
    max_metadata_bytes: int = Field(
        default=16_384, ge=64, description="Max serialized size of a trace's metadata object."
    )
    max_message_chars: int = Field(
        default=200_000, ge=1, description="Max characters in one message or response."
    )
    max_json_depth: int = Field(default=32, ge=2, description="Max nesting depth of request JSON.")

    # Group commit (Postgres): concurrent single-trace POSTs share one INSERT and one commit
    group_commit: bool = Field(
        default=True,
        description="On Postgres, single-trace POSTs are written by one writer per process in "
        "groups: one multi-row INSERT and one commit for every trace that arrived within the "
        "window, each request answered only after the commit that holds its trace; a warm "
        "single trace is admitted from the process caches before the framework and checked "
        "against the cache counters in that commit (`docs/architecture.md`). Off: each request "
        "commits its own trace through the route. SQLite always writes directly.",
    )
    group_commit_window_ms: float = Field(
        default=2.0, ge=0.0, le=100.0,
        description="How long the writer holds a group open for more traces after its first "
        "(milliseconds), and only while other requests are preparing one: a lone request does "
        "not wait. A group also takes every trace queued while the previous commit ran. 0: no "
        "waiting, only those.",
    )
    group_commit_max_items: int = Field(
        default=256, ge=1, le=5000,
        description="Most traces in one group commit; a full group is written at once, before "
        "its window ends.",
    )

    # Large batches: admitted (validated, hashed, redacted) by helper processes beside the API's
    ingest_helper_processes: int | None = Field(
        default=None, ge=0, le=64,
        description="Helper processes per API process that admit parts of a large batch while "
        "the request's own thread admits the first part; spawned in the background when the "
        "server starts (each ~100 MiB). Unset: the usable cores shared out among the API "
        "processes (`api_processes`), less one for each API process and one for the "
        "database's share of the batch, at most 3 (so none on two cores, nor where there are "
        "as many API processes as cores, as `tracelearn api` starts by default). 0: every "
        "batch is admitted in the API process.",
    )
    api_processes: int = Field(
        default=1, ge=1, le=256,
        description="API processes serving on this machine; `tracelearn api` sets it for the "
        "processes it starts. Sizes the default `ingest_helper_processes`.",
    )
    ingest_parallel_min_items: int = Field(
        default=256, ge=2, le=100_000,
        description="Batches of at least this many traces are shared with the helper "
        "processes; smaller ones are admitted in the API process (handing a part over costs "
        "~10 µs a trace, and a helper's answer a few ms).",
    )

    # Security
    rate_limit_per_minute: int = Field(
        default=6000, ge=0, description="Requests per minute per API key (0 disables); 429 beyond."
    )
    session_secret: str = Field(
        default="dev-insecure-change-me",
        description="Secret that signs dashboard session cookies. Set it in production.",
    )
    pii_hash_secret: str | None = Field(
        default=None,
        description="Key of the HMAC behind `hash`-mode PII tokens (`[EMAIL:3fa2c1d4e5f6]`). "
        "Default: the session secret. Changing it changes every token from then on.",
    )
    session_max_age_s: int = Field(default=8 * 3600, ge=60, description="Dashboard session life.")
    retention_days: int | None = Field(
        default=None, ge=1, description="Delete traces older than this many days (None: keep)."
    )
    staging_retention_hours: float = Field(
        default=168.0, gt=0,
        description="Receiver pieces still waiting for their other half (a Langfuse observation "
        "without its input or output, OTLP log events whose span never came, a span stored "
        "without content kept for late events) are deleted this long after their last update.",
    )
    retention_interval_s: int = Field(
        default=3600, ge=60,
        description="How often beat runs the retention pass (expired traces, then stale "
        "receiver pieces); `tracelearn retention` runs one by hand.",
    )

    # Model and serving
    base_model_dir: Path | None = Field(
        default=None,
        description="Base model for new policies. Default: the bundled tiny model, copied on first "
        "use from the package to `<data_dir>/models/tiny` (built instead when the shipped copy "
        "does not match the build recipe).",
    )
    model_cache: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "tracelearn" / "models",
        description="Content-hashed cache of bundled-model builds, shared by every data dir "
        "(env TRACELEARN_MODEL_CACHE).",
    )
    inference_backend: Literal["local", "vllm_http", "vllm_engine"] = Field(
        default="local", description="Which inference backend rollout and eval workers use."
    )
    local_device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where the local transformers backend (rollouts, evaluation and serving "
        "when `inference_backend` is `local`) runs: `auto`, a GPU when torch sees one, else the "
        "CPU; `cpu`; `cuda` or `cuda:N`. A GPU asked for and absent fails the job that needs "
        "the model, with the reason.",
    )
    vllm_url: str = Field(
        default="http://127.0.0.1:8000", description="Base URL of the vLLM OpenAI server."
    )
    vllm_timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one vLLM call.")
    vllm_tool_call_parser: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]+$",
        description="The vLLM server's tool-call parser, e.g. `hermes`; the server must run with "
        "`--enable-auto-tool-choice --tool-call-parser` set to it (`VllmServer` adds both). The "
        "proxy then passes `tool_choice` on and the server splits calls off; unset, the proxy "
        "sends `tool_choice: none` and splits the calls off the text itself.",
    )

    learner_allocator: AllocatorChoice = Field(
        default="auto",
        description="malloc of the learner processes (the train worker and a data-parallel "
        "round's ranks, set at their start): `jemalloc` with decay off peaks at ~1.04× the "
        "memory a step holds at 100M parameters against ~1.8× with the C library's malloc, "
        "and is no slower. `auto`: jemalloc when `libjemalloc.so.2` is installed (Debian: "
        "`libjemalloc2`; in the Docker image), else the C library's; `jemalloc`: required; "
        "`system`: the C library's.",
    )

    # Jobs
    job_lease_s: int = Field(default=300, ge=5, description="Lease a running job holds.")
    job_max_attempts: int = Field(
        default=3, ge=1, description="Attempts before a job is marked failed for good."
    )
    job_max_replans: int = Field(
        default=3, ge=0, description="Times a failed job's key is planned again (attempts reset) "
        "by the next scheduler tick before its failure is final.",
    )
    job_replan_backoff_s: float = Field(
        default=60.0, ge=0, description="Wait before the first re-plan of a failed job; doubles "
        "with each further one.",
    )
    reaper_interval_s: int = Field(
        default=30, ge=1, description="How often the reaper re-queues jobs with expired leases."
    )

    # Logging
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_json: bool = Field(default=True, description="Structured JSON logs (False: console).")

    @field_validator("data_dir", "base_model_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Paths end up in rows (a policy's base model, a snapshot's adapter) and in child
        # processes' environments, which need not share our working directory.
        return None if value is None else value.expanduser().resolve()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tracelearn.db').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @model_validator(mode="after")
    def _no_default_secret_in_production(self) -> Settings:
        if self.environment == "production" and self.session_secret == "dev-insecure-change-me":
            raise ValueError("set TRACELEARN_SESSION_SECRET in production")
        return self

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


_override: Settings | None = None


@lru_cache
def _from_environment() -> Settings:
    return Settings()


def get_settings() -> Settings:
    return _override or _from_environment()


def set_settings(settings: Settings | None) -> None:
    """Replace the process-wide settings (tests, `tracelearn up`); None returns to the env."""
    global _override
    _override = settings
    _from_environment.cache_clear()
