"""PostgreSQL + pgvector: the embedded server, connections and versioned migrations."""

from components.db.migrate import migrate
from components.db.postgres import connect, database_url, stop_embedded

__all__ = ["connect", "database_url", "migrate", "stop_embedded"]
