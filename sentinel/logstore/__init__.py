"""Log stores (local SQLite-backed JSON store; Elasticsearch) and the shipper that feeds them.

:func:`open` is the one place that chooses the store, for the daemon, the CLI and the runbooks alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentinel.logstore.elasticsearch import ElasticsearchLogStore
    from sentinel.logstore.local import LocalLogStore
    from sentinel.settings import Settings

__all__ = ["NoLogStore", "open"]


class NoLogStore(ValueError):
    """The store asked for cannot be opened (no Elasticsearch configured, no local store written yet)."""


def open(settings: Settings, kind: str | None = None, db: Path | None = None,
         writer: bool = False) -> ElasticsearchLogStore | LocalLogStore:
    """The configured log store: Elasticsearch when ``logs.elasticsearch_url`` is set, else the local store
    at ``state_dir/logs.db``. ``kind`` picks one explicitly (``es`` needs the URL); ``db`` reads another
    local file. A reader needs the local store to exist (a running sentinel writes it); the ``writer`` (the
    one process that ships) creates it and keeps its DuckDB column index beside it."""
    lg = settings.logs
    kind = kind or ("es" if lg.elasticsearch_url else "local")
    if kind == "es":
        if not lg.elasticsearch_url:
            raise NoLogStore("the es store needs logs.elasticsearch_url (or --elasticsearch-url)")
        from elasticsearch import Elasticsearch

        from sentinel.logstore.elasticsearch import ElasticsearchLogStore

        return ElasticsearchLogStore(Elasticsearch(lg.elasticsearch_url), lg.elasticsearch_timeout)
    if kind != "local":
        raise NoLogStore(f"log store {kind!r}: expected local or es")
    from sentinel.logstore.local import LocalLogStore

    path = db or settings.state_dir / "logs.db"
    if writer:
        return LocalLogStore(path, column_index=True)
    if not path.exists():
        raise NoLogStore(f"no local log store at {path} (is sentinel running with state_dir {settings.state_dir}?)")
    return LocalLogStore(path)
