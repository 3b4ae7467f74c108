"""Alembic migrations: the only way the schema changes (``prompt-capture db upgrade``)."""
