"""The daemon's state: one SQLite database in the state directory (no other server needed).

What it keeps, so that a crash, ``kill -9`` or a reboot loses nothing registered:

* ``models``: every registered model (its spec as JSON) and its status
  (``profiling``, ``ready``, ``refused``, ``failed``, ...), with a status detail;
* ``profiles``: measured profile rows per (gpu, model), the same columns as the profile CSV;
* ``plans``: every plan the daemon applied or tried, with its role (``current``,
  ``last_good``) and outcome; the current and the last good plan are read back at start;
* ``events``: an append-only log of what the daemon did (registrations, re-plans, applies,
  failures), newest first on read;
* ``meta``: the schema version and the stgs version that last opened the file;
  ``schema_history``: each schema version the file went through, when, by which stgs, and the
  backup made before the upgrade.

The schema has a version (``SCHEMA_VERSION``); each change is a :class:`Migration` in
``MIGRATIONS``. Opening a file of an older version backs it up beside itself
(``stgs.db.schema<N>-<UTC time>.bak``, SQLite's backup API) and applies the missing migrations in
one transaction: all or nothing. A file of a newer version than this stgs knows is refused,
naming both versions.

Writes are transactions in WAL mode with ``synchronous=FULL``: a write acknowledged to a client
is on disk. One connection is shared by the daemon's threads behind a lock (SQLite serialises
writers anyway); reads are cheap.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stgs import __version__, events
from stgs.errors import ConfigError
from stgs.plan import Plan
from stgs.profiles import PROFILE_COLUMNS, ProfileRow

log = logging.getLogger(__name__)
events_log = logging.getLogger("api.events")

# Version 1: the schema of stgs 0.1.0, as that release wrote it. Never edit it: every change
# is a migration below, and a new database is made by version 1 plus every migration (the path
# an upgrade takes, so both paths give the same schema; a test compares them).
_SCHEMA_V1 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS profiles (
    gpu TEXT NOT NULL,
    model TEXT NOT NULL,
    partition TEXT NOT NULL,
    sm_count INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    memory_mib REAL NOT NULL,
    PRIMARY KEY (gpu, model, partition, batch)
)""",
    """CREATE TABLE IF NOT EXISTS plans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    role TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    plan TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS plans_role ON plans (role, id)",
    """CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}'
)""",
)

Step = str | Callable[[sqlite3.Cursor], None]


@dataclass(frozen=True)
class Migration:
    """One schema change: the version it makes, what it changes (one line: logged, and kept in
    ``schema_history``), and its steps, SQL statements or functions of a cursor, run in order
    inside the transaction that opens the database."""

    version: int
    what: str
    steps: tuple[Step, ...]


# Ordered; each one's version is the previous one's + 1. Add a change as a new entry at the end,
# never by editing one that a release shipped.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        "schema_history (each version: when, by which stgs, its backup); events indexed by kind",
        (
            """CREATE TABLE schema_history (
    version INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL,
    stgs_version TEXT NOT NULL,
    what TEXT NOT NULL,
    backup TEXT NOT NULL DEFAULT ''
)""",
            # GET /v1/events?kind=... and the start's reads of one kind: without it, a query for
            # a rare kind scans the whole (append-only) log
            "CREATE INDEX events_kind ON events (kind, id)",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


class StoreError(ConfigError):
    """The state database cannot be opened, is not stgs's, or has a schema newer than this stgs
    reads. A setup error, as a bad config is (``stgs serve`` exits 2; the systemd unit does not
    restart it): restarting does not help."""


@dataclass(frozen=True)
class ModelRecord:
    name: str
    spec: dict[str, Any]
    status: str
    detail: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class PlanRecord:
    id: int
    created_at: float
    role: str
    state: str
    reason: str
    plan: Plan


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    kind: str
    message: str
    data: dict[str, Any]


class Store:
    """The daemon's SQLite state. ``Store(path)`` creates the file and schema when missing and
    migrates an older schema (``schema_version``; ``backup``: the copy made first, if any)."""

    migrations: tuple[Migration, ...] = MIGRATIONS

    def __init__(self, path: Path | str, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from exc
        try:
            self.schema_version, self.backup = self._migrate()
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------------ schema
    def _found(self) -> int | None:
        """The file's schema version; None for a new (empty) database."""
        try:
            tables = {
                r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from exc
        if not tables:
            return None
        row = (
            self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if "meta" in tables
            else None
        )
        if row is None:
            raise StoreError(
                f"{self.path}: not an stgs state database (no schema version; tables: "
                f"{', '.join(sorted(tables))})"
            )
        try:
            return int(row[0])
        except ValueError:
            raise StoreError(f"{self.path}: unreadable state schema version {row[0]!r}") from None

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _refuse_newer(self, found: int, target: int) -> None:
        by = self._meta("stgs_version")
        raise StoreError(
            f"{self.path}: state schema version {found}"
            + (f" (written by stgs {by})" if by else "")
            + f" is newer than this stgs {__version__} reads (schema version {target}): run"
            " that stgs or a newer one, or restore the copy that an upgrade from this version"
            f" left beside it ({self.path.name}.schema{target}-*.bak)"
        )

    def _migrate(self) -> tuple[int, Path | None]:
        """Bring the file to the newest schema in one transaction: version 1 and every
        migration for a new file, the missing migrations for an older one, after a backup
        copy. A newer schema is refused. Returns (version, the backup made or None)."""
        migrations = self.migrations
        target = migrations[-1].version if migrations else 1
        found = self._found()
        if found is not None and found > target:
            self._refuse_newer(found, target)
        backup = None
        if found is not None and found < target:
            backup = self._backup(found)
        try:
            with self._tx() as cur:
                found = self._found()  # again, under the write lock
                if found is not None and found > target:
                    self._refuse_newer(found, target)
                now = self._clock()
                todo = [m for m in migrations if found is None or m.version > found]
                if found is None:
                    for sql in _SCHEMA_V1:
                        cur.execute(sql)
                    cur.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')")
                for m in todo:
                    for step in m.steps:
                        try:
                            if isinstance(step, str):
                                cur.execute(step)
                            else:
                                step(cur)
                        except Exception as exc:
                            what = step.splitlines()[0] if isinstance(step, str) else step.__name__
                            raise StoreError(
                                f"{self.path}: migrating the state to schema version {m.version}"
                                f" ({m.what}) failed at {what!r}: {exc}; the database is"
                                f" unchanged (schema version {found})"
                            ) from exc
                if target >= 2:  # schema_history exists from version 2 on
                    if found is None:
                        self._history(cur, 1, now, "created", "")
                    for m in todo:
                        self._history(cur, m.version, now, m.what, str(backup or ""))
                cur.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?),"
                    " ('stgs_version', ?)",
                    (str(target), __version__),
                )
                if found is not None and todo:
                    cur.execute(
                        "INSERT INTO events (ts, kind, message, data) VALUES (?, ?, ?, ?)",
                        (
                            now,
                            "state_migrated",
                            f"state schema {found} -> {target}; backup {backup}",
                            json.dumps(
                                {"from": found, "to": target, "backup": str(backup)},
                                sort_keys=True,
                            ),
                        ),
                    )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the state database: {exc}") from exc
        if found is not None and found < target:
            log.info(
                "state %s: schema version %d -> %d (backup: %s)", self.path, found, target, backup
            )
        return target, backup

    @staticmethod
    def _history(cur: sqlite3.Cursor, version: int, now: float, what: str, backup: str) -> None:
        cur.execute(
            "INSERT OR REPLACE INTO schema_history (version, applied_at, stgs_version, what,"
            " backup) VALUES (?, ?, ?, ?, ?)",
            (version, now, __version__, what, backup),
        )

    def _backup(self, version: int) -> Path:
        """A copy of the whole database (SQLite's online backup: consistent, the WAL's
        committed writes included) beside it, before a migration touches it."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        dst = self.path.with_name(f"{self.path.name}.schema{version}-{stamp}.bak")
        try:
            with closing(sqlite3.connect(dst)) as copy:
                self._db.backup(copy)
            dst.chmod(0o600)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(
                f"{self.path}: cannot back up the state to {dst} before migrating it from"
                f" schema version {version}: {exc}; nothing was changed"
            ) from exc
        return dst

    def history(self) -> list[dict[str, Any]]:
        """The schema versions this file went through (version 2 on): version, applied_at,
        stgs_version, what, backup."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version, applied_at, stgs_version, what, backup FROM schema_history"
                " ORDER BY version"
            ).fetchall()
        keys = ("version", "applied_at", "stgs_version", "what", "backup")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")

    # ------------------------------------------------------------------ models
    def put_model(self, name: str, spec: Mapping[str, Any], status: str, detail: str = "") -> None:
        """Register ``name`` (or replace its spec), keeping its creation time."""
        now = self._clock()
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO models (name, spec, status, detail, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, status=excluded.status,"
                " detail=excluded.detail, updated_at=excluded.updated_at",
                (name, json.dumps(dict(spec), sort_keys=True), status, detail, now, now),
            )

    def set_model_status(self, name: str, status: str, detail: str = "") -> bool:
        with self._tx() as cur:
            cur.execute(
                "UPDATE models SET status=?, detail=?, updated_at=? WHERE name=?",
                (status, detail, self._clock(), name),
            )
            return cur.rowcount > 0

    def delete_model(self, name: str) -> bool:
        with self._tx() as cur:
            cur.execute("DELETE FROM models WHERE name=?", (name,))
            return cur.rowcount > 0

    def get_model(self, name: str) -> ModelRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT name, spec, status, detail, created_at, updated_at FROM models"
                " WHERE name=?",
                (name,),
            ).fetchone()
        return _model(row) if row else None

    def models(self) -> list[ModelRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, spec, status, detail, created_at, updated_at FROM models"
                " ORDER BY created_at, name"
            ).fetchall()
        return [_model(r) for r in rows]

    # ------------------------------------------------------------------ profiles
    def put_profiles(self, rows: Iterable[ProfileRow]) -> int:
        """Insert or replace profile rows (one per gpu, model, partition, batch)."""
        data = [
            (r.gpu, r.model, r.partition, r.sm_count, r.batch, r.latency_ms, r.memory_mib)
            for r in rows
        ]
        with self._tx() as cur:
            cur.executemany(
                "INSERT OR REPLACE INTO profiles (" + ", ".join(PROFILE_COLUMNS) + ")"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                data,
            )
        return len(data)

    def profiles(self, gpu: str | None = None, model: str | None = None) -> list[ProfileRow]:
        sql = "SELECT " + ", ".join(PROFILE_COLUMNS) + " FROM profiles"
        where, args = [], []
        if gpu is not None:
            where.append("gpu=?")
            args.append(gpu)
        if model is not None:
            where.append("model=?")
            args.append(model)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY gpu, model, partition, batch"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            ProfileRow(r[0], r[1], r[2], int(r[3]), int(r[4]), float(r[5]), float(r[6]))
            for r in rows
        ]

    def has_profile(self, gpu: str, model: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM profiles WHERE gpu=? AND model=? LIMIT 1", (gpu, model)
            ).fetchone()
        return row is not None

    # ------------------------------------------------------------------ plans
    def save_plan(self, plan: Plan, role: str, state: str, reason: str = "") -> int:
        """Record a plan; ``role`` is ``current``, ``last_good`` or ``tried``."""
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO plans (created_at, role, state, reason, plan) VALUES (?, ?, ?, ?, ?)",
                (self._clock(), role, state, reason, plan.to_json(indent=None)),
            )
            return int(cur.lastrowid or 0)

    def latest_plan(self, role: str) -> PlanRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, created_at, role, state, reason, plan FROM plans WHERE role=?"
                " ORDER BY id DESC LIMIT 1",
                (role,),
            ).fetchone()
        if row is None:
            return None
        return PlanRecord(
            int(row[0]), float(row[1]), row[2], row[3], row[4], Plan.from_json(row[5])
        )

    def prune_plans(self, keep: int = 200) -> None:
        """Keep the newest ``keep`` plans and the newest of each role."""
        with self._tx() as cur:
            cur.execute(
                "DELETE FROM plans WHERE id NOT IN (SELECT id FROM plans ORDER BY id DESC LIMIT ?)"
                " AND id NOT IN (SELECT MAX(id) FROM plans GROUP BY role)",
                (keep,),
            )

    # ------------------------------------------------------------------ events
    def log_event(self, kind: str, message: str, **data: Any) -> int:
        """Store an event (``GET /v1/events``) and log it, once: the one place where the
        daemon's registrations, plans, transitions and faults reach its log with their reason
        (:func:`stgs.events.level`; logger ``api.events``)."""
        events_log.log(events.level(kind), "%s: %s", kind, message)
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO events (ts, kind, message, data) VALUES (?, ?, ?, ?)",
                (self._clock(), kind, message, json.dumps(data, sort_keys=True, default=str)),
            )
            return int(cur.lastrowid or 0)

    def events(self, limit: int = 100, kind: str | None = None) -> list[Event]:
        sql = "SELECT id, ts, kind, message, data FROM events"
        args: list[Any] = []
        if kind is not None:
            sql += " WHERE kind=?"
            args.append(kind)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Event(int(r[0]), float(r[1]), r[2], r[3], json.loads(r[4])) for r in rows]


def _model(row: tuple[Any, ...]) -> ModelRecord:
    return ModelRecord(row[0], json.loads(row[1]), row[2], row[3], float(row[4]), float(row[5]))
