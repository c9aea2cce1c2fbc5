"""Airflow standalone: where its generated admin password lives."""

from __future__ import annotations

import json

from components.settings import Settings


def admin_login(settings: Settings) -> str:
    """'user admin, password ...' from the file standalone writes, or a hint where to find it."""
    path = settings.airflow_home / "simple_auth_manager_passwords.json.generated"
    try:
        users = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"login: see {path}"
    if isinstance(users, dict) and users:
        user, password = next(iter(users.items()))
        return f"user {user}, password {password}"
    return f"login: see {path}"
