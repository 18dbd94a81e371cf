"""The live service's database: item changes and user events written while serving.

Two append-only logs, the same on both engines: `item_changes` (a put or a delete of one item,
with its text and metadata) and `events` (user, item, event type, time). Every row gets a
sequence number from the database; a reader keeps the highest it has applied and asks for what
came after (`since`), so any number of API processes sharing one PostgreSQL see each other's
writes. A write of many rows is one transaction: applied whole or not at all.

Engines: SQLite (the default, a file beside the model directory, WAL mode: no set-up) and
PostgreSQL (`DATABASE_URL=postgresql://...`, psycopg 3) for several processes or hosts. The
schema is created and migrated on connect, its version recorded in `towerrec_schema`.

PostgreSQL hands out sequence numbers before commit, so a reader can see 12 before 11 commits.
`Tail` remembers the numbers it skipped and asks for them again for GAP_SECONDS (a rolled-back
number never appears and is forgotten then).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
GAP_SECONDS = 30.0
MAX_GAP = 1000
ITEM_COLUMNS = ("seq", "item_id", "op", "text", "category", "brand", "price", "at")
EVENT_COLUMNS = ("seq", "user_id", "item_id", "event_type", "ts", "at")


class DatabaseError(RuntimeError):
    """The database cannot be reached or refused a statement: writes answer 503."""


def _migrations(serial: str) -> dict[int, list[str]]:
    """Schema version -> the statements that reach it from the one before."""
    return {
        1: [
            f"CREATE TABLE item_changes (seq {serial}, item_id TEXT NOT NULL, op TEXT NOT NULL, "
            "text TEXT, category TEXT, brand TEXT, price DOUBLE PRECISION, "
            "at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX item_changes_item ON item_changes (item_id)",
            f"CREATE TABLE events (seq {serial}, user_id TEXT NOT NULL, item_id TEXT NOT NULL, "
            "event_type TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX events_user ON events (user_id, seq)",
        ]
    }


@dataclass(frozen=True)
class ItemChange:
    seq: int
    item_id: str
    op: str  # "put" | "delete"
    text: str | None
    category: str | None
    brand: str | None
    price: float | None
    at: float


@dataclass(frozen=True)
class Event:
    seq: int
    user_id: str
    item_id: str
    event_type: str
    ts: float
    at: float


def default_url(model_dir: Path) -> str:
    """SQLite in a file beside the model directory: saved_model/NAME -> saved_model/NAME.live.db"""
    model_dir = Path(model_dir)
    return f"sqlite:///{model_dir.parent / (model_dir.name + '.live.db')}"


def describe(url: str) -> str:
    """The URL without its password, for logs and /metadata."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


class Database:
    """One connection, used under a lock (the API's writes are few next to its reads)."""

    def __init__(self, url: str, connect_timeout: float = 5.0):
        self.url, self.connect_timeout = url, connect_timeout
        if url.startswith("sqlite:///"):
            self.kind = "sqlite"
            self.path = Path(url[len("sqlite:///") :])
        elif url.startswith(("postgresql://", "postgres://")):
            self.kind = "postgresql"
        else:
            raise ValueError(
                f"DATABASE_URL={describe(url)!r}: expected sqlite:///PATH or "
                "postgresql://USER@HOST:PORT/DB"
            )
        self._lock = threading.Lock()
        self._conn = None  # connected (and the schema migrated) on first use
        self.schema_version: int | None = None

    # ---- connection ----
    @property
    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.kind == "sqlite":
            return (sqlite3.Error,)
        import psycopg

        return (psycopg.Error,)

    def _connect(self):
        if self._conn is not None:
            return self._conn
        try:
            if self.kind == "sqlite":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    self.path,
                    timeout=self.connect_timeout,
                    check_same_thread=False,
                    isolation_level=None,
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            else:
                import psycopg

                conn = psycopg.connect(
                    self.url, connect_timeout=max(1, int(self.connect_timeout)), autocommit=True
                )
        except (*self._errors, OSError) as error:
            raise DatabaseError(f"cannot connect to {describe(self.url)}: {error}") from error
        self._conn = conn
        try:
            self._migrate()
        except BaseException:
            self._close()
            raise
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001  (closing a broken connection)
                pass
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def _sql(self, statement: str) -> str:
        return statement if self.kind == "sqlite" else statement.replace("?", "%s")

    def _transaction(self, statements: Iterable[tuple[str, Sequence]]) -> list:
        """Run statements in one transaction; the last statement's rows (if any) come back."""
        with self._lock:
            conn = self._connect()
            rows: list = []
            try:
                if self.kind == "sqlite":
                    conn.execute("BEGIN IMMEDIATE")
                    for statement, params in statements:
                        rows = conn.execute(statement, params).fetchall()
                    conn.execute("COMMIT")
                else:
                    with conn.transaction(), conn.cursor() as cursor:
                        for statement, params in statements:
                            cursor.execute(self._sql(statement), params)
                            rows = cursor.fetchall() if cursor.description else []
            except self._errors as error:
                if self.kind == "sqlite":
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                else:
                    self._close()  # reconnect on the next call
                raise DatabaseError(
                    f"{describe(self.url)}: {type(error).__name__}: "
                    f"{str(error).strip().splitlines()[0][:300]}"
                ) from error
            return rows

    def _query(self, statement: str, params: Sequence = ()) -> list:
        with self._lock:
            conn = self._connect()
            try:
                if self.kind == "sqlite":
                    return conn.execute(statement, params).fetchall()
                with conn.cursor() as cursor:
                    cursor.execute(self._sql(statement), params)
                    return cursor.fetchall()
            except self._errors as error:
                if self.kind != "sqlite":
                    self._close()
                raise DatabaseError(
                    f"{describe(self.url)}: {type(error).__name__}: "
                    f"{str(error).strip().splitlines()[0][:300]}"
                ) from error

    # ---- schema ----
    def _migrate(self) -> None:
        """Create or bring the schema up to SCHEMA_VERSION (one transaction; on PostgreSQL under
        an advisory lock, so processes starting together migrate once)."""
        conn = self._conn
        serial = (
            "INTEGER PRIMARY KEY AUTOINCREMENT"
            if self.kind == "sqlite"
            else "BIGSERIAL PRIMARY KEY"
        )
        create = (
            "CREATE TABLE IF NOT EXISTS towerrec_schema (version INTEGER NOT NULL, "
            "applied_at DOUBLE PRECISION NOT NULL)"
        )
        if self.kind == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(create)
                current = conn.execute("SELECT MAX(version) FROM towerrec_schema").fetchone()[0]
                self._apply(conn.execute, current or 0, serial)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        else:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(7261536)")
                cursor.execute(create)
                cursor.execute("SELECT MAX(version) FROM towerrec_schema")
                current = cursor.fetchone()[0]
                self._apply(lambda s, p=(): cursor.execute(self._sql(s), p), current or 0, serial)
        self.schema_version = SCHEMA_VERSION

    def _apply(self, execute, current: int, serial: str) -> None:
        if current > SCHEMA_VERSION:
            raise DatabaseError(
                f"{describe(self.url)} has schema version {current}, newer "
                f"than this towerrec's {SCHEMA_VERSION}"
            )
        for version, statements in sorted(_migrations(serial).items()):
            if version > current:
                for statement in statements:
                    execute(statement)
                execute(
                    "INSERT INTO towerrec_schema (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
                log.info("database %s: schema migrated to version %d", describe(self.url), version)

    def stored_schema_version(self) -> int:
        return int(self._query("SELECT MAX(version) FROM towerrec_schema")[0][0])

    # ---- writes (each call one transaction) ----
    def change_items(
        self,
        puts: Sequence[tuple[str, str, str, str, float | None]] = (),
        deletes: Sequence[str] = (),
    ) -> None:
        """Puts as (item_id, text, category, brand, price) rows, then deletes: one
        transaction."""
        now = time.time()
        statements = [
            (
                "INSERT INTO item_changes (item_id, op, text, category, brand, price, "
                "at) VALUES (?, 'put', ?, ?, ?, ?, ?)",
                (*row, now),
            )
            for row in puts
        ]
        statements += [
            ("INSERT INTO item_changes (item_id, op, at) VALUES (?, 'delete', ?)", (item, now))
            for item in deletes
        ]
        self._transaction(statements)

    def add_events(self, events: Sequence[tuple[str, str, str, float]]) -> None:
        """(user_id, item_id, event_type, ts) rows."""
        now = time.time()
        self._transaction(
            (
                "INSERT INTO events (user_id, item_id, event_type, ts, at) VALUES (?, ?, ?, ?, ?)",
                (*row, now),
            )
            for row in events
        )

    # ---- reads ----
    def item_changes(
        self, after: int, also: Sequence[int] = (), limit: int = 50_000
    ) -> list[ItemChange]:
        return [
            ItemChange(*row)
            for row in self._since("item_changes", ITEM_COLUMNS, after, also, limit)
        ]

    def events(self, after: int, also: Sequence[int] = (), limit: int = 50_000) -> list[Event]:
        return [Event(*row) for row in self._since("events", EVENT_COLUMNS, after, also, limit)]

    def _since(
        self, table: str, columns: Sequence[str], after: int, also: Sequence[int], limit: int
    ) -> list:
        extra = ""
        if also:
            extra = f" OR seq IN ({', '.join('?' * len(also))})"
        return self._query(
            f"SELECT {', '.join(columns)} FROM {table} WHERE seq > ?{extra} "
            f"ORDER BY seq LIMIT {int(limit)}",
            (after, *also),
        )


class Tail:
    """What a reader of one log has applied: the highest sequence number, and the numbers it
    skipped that may still commit (PostgreSQL), asked for again for GAP_SECONDS."""

    def __init__(self) -> None:
        self.last = 0
        self.pending: dict[int, float] = {}  # skipped seq -> when first missed

    def ask(self) -> tuple[int, list[int]]:
        now = time.time()
        self.pending = {s: t for s, t in self.pending.items() if now - t < GAP_SECONDS}
        return self.last, sorted(self.pending)[:500]

    def fresh(self, rows: Sequence) -> list:
        """The rows not applied before (rows sorted by seq); updates the bookkeeping."""
        out, now = [], time.time()
        for row in rows:
            if row.seq > self.last:
                if row.seq - self.last <= MAX_GAP:  # a larger jump is not a commit race
                    for skipped in range(self.last + 1, row.seq):
                        self.pending.setdefault(skipped, now)
                self.last = row.seq
                out.append(row)
            elif self.pending.pop(row.seq, None) is not None:
                out.append(row)
        return out
