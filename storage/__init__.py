"""Persistence: SQLAlchemy models, repository functions, Alembic migrations and the file store.

A leaf package: it imports nothing from ``dicom_node`` or ``model``.
"""
