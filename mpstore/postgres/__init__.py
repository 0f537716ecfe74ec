"""The PostgreSQL backend: ``PostgresStore``, the store's API with its state in a database
that any number of ``agl store --backend postgresql://...`` servers share.

Needs the optional extra ``mpstore[postgres]`` (psycopg 3 and its pool); importing
:mod:`mpstore` alone never imports it.
"""

from __future__ import annotations

from .schema import SCHEMA_VERSION
from .store import PostgresStore

__all__ = ["SCHEMA_VERSION", "PostgresStore"]
