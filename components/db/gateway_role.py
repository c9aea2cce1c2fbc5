"""The Postgres role the gateway connects as: ``tandem_gateway``, created by migration 0006.

The gateway never connects as the owner that migrates the schema. Its connection string is
``TANDEM_GATEWAY_DATABASE_URL`` when set; for the embedded server it is derived (the same local socket, user
``tandem_gateway``: the embedded server trusts its socket, which only this machine reaches, so no password);
with an external ``TANDEM_DATABASE_URL`` and no gateway URL the gateway refuses to start (fail closed).

    python -m components.db.gateway_role   # set the role's password from TANDEM_GATEWAY_DATABASE_URL
"""

from __future__ import annotations

import sys

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from components.errors import ConfigError, ServiceError, TandemError
from components.settings import Settings, get_settings

GATEWAY_ROLE = "tandem_gateway"


def gateway_database_url(settings: Settings | None = None) -> str:
    """The connection string the gateway uses; starts the embedded server if it is the one configured."""
    from components.db.postgres import database_url

    settings = settings or get_settings()
    if settings.gateway_database_url:
        return settings.gateway_database_url
    if settings.database_url:
        raise ConfigError(
            "TANDEM_GATEWAY_DATABASE_URL is not set: the gateway does not connect as the schema owner of "
            f"TANDEM_DATABASE_URL; set it to the {GATEWAY_ROLE} role's URL (docs/operations.md: Deploying)"
        )
    return make_conninfo(database_url(settings), user=GATEWAY_ROLE, password="")


def set_gateway_password(settings: Settings | None = None) -> bool:
    """Give ``tandem_gateway`` the password in TANDEM_GATEWAY_DATABASE_URL, connected as the owner.

    Returns False (nothing to do) when that URL is unset, names another user, or carries no password.
    """
    from components.db.postgres import connect

    settings = settings or get_settings()
    if not settings.gateway_database_url:
        return False
    try:
        params = conninfo_to_dict(settings.gateway_database_url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"TANDEM_GATEWAY_DATABASE_URL is not a Postgres connection string ({exc})") from exc
    password = params.get("password")
    if params.get("user") != GATEWAY_ROLE or not password:
        return False
    with connect(settings, autocommit=True, vector=False) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (GATEWAY_ROLE,)).fetchone() is None:
            raise ServiceError(
                f"role {GATEWAY_ROLE} does not exist: run `tandem up --only postgres` (migration 0006) as a user "
                "that may create roles, or create it by hand"
            )
        # A utility statement takes no bind parameters; Literal quotes the password on the client side.
        conn.execute(
            sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(GATEWAY_ROLE), sql.Literal(str(password))
            )
        )
    return True


def main() -> int:
    try:
        changed = set_gateway_password()
    except TandemError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    sys.stdout.write(
        f"{GATEWAY_ROLE}: password set\n" if changed else f"{GATEWAY_ROLE}: no password in the gateway URL to set\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
