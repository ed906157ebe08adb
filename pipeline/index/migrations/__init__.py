"""Alembic migrations of the index (run by :func:`pipeline.index.db.migrate`)."""
