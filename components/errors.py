"""Errors meant for the user: one line saying what was expected and what to do."""


class TandemError(Exception):
    """A failure the user can fix; the CLI prints its message on one line and exits non-zero."""

    exit_code = 2


class ConfigError(TandemError):
    """A setting or input has a value Tandem cannot use."""


class ServiceError(TandemError):
    """A service (Postgres, vLLM, the gateway, ...) is missing, unhealthy or failed to start."""

    exit_code = 3
