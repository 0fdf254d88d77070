"""State schema migrations (api.store): an upgrade from the state the previous release wrote.

``tests/data/state-v1.sql`` is the dump of a real stgs 0.1.0 state database (schema version 1:
its DDL and two served models as that release wrote them). The daemon, started as a process on
it, migrates it to the current version after a backup, and the models serve again; a state
database newer than the daemon knows stops it with both versions named.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from api.launch import LocalDaemon, wait_until
from api.store import MIGRATIONS, SCHEMA_VERSION, Migration, Store, StoreError

V1_DUMP = Path(__file__).parent / "data" / "state-v1.sql"
V1_MODELS = ["tiny_mlp", "tiny_cnn"]
SECTIONS = """
[backend]
kind = "simulated"
simulated_gpus = [{ sku = "H100-80GB", count = 1 }]
"""


def write_v1(path: Path) -> None:
    """The v1 state file: WAL mode (as stgs 0.1.0 opened it), then its dump."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_DUMP.read_text())
    db.close()


def schema_of(path: Path) -> dict[str, str]:
    """Every table and index the file defines: name -> its SQL, whitespace normalised."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
        ).fetchall()
    finally:
        db.close()
    return {n: " ".join(s.replace("IF NOT EXISTS ", "").split()) for n, s in rows}


def file_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0])
    finally:
        db.close()


def rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        db.close()


def test_migrations_are_consecutive() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(2, SCHEMA_VERSION + 1))
    assert SCHEMA_VERSION >= 2


def test_v1_state_is_upgraded_in_place_after_a_backup(tmp_path: Path) -> None:
    db = tmp_path / "state" / "stgs.db"
    write_v1(db)
    v1_tables = {t: rows(db, t) for t in ("models", "profiles", "plans", "events", "meta")}
    assert v1_tables["meta"] == [("schema", "1")]

    s = Store(db, clock=lambda: 1.8e9)
    assert s.schema_version == SCHEMA_VERSION
    # the backup: the v1 file as it was, every row
    assert s.backup is not None and s.backup.parent == db.parent
    assert s.backup.name.startswith("stgs.db.schema1-") and s.backup.name.endswith(".bak")
    assert file_version(s.backup) == 1
    for t, before in v1_tables.items():
        assert rows(s.backup, t) == before, t
    assert s.backup.stat().st_mode & 0o077 == 0
    # what v1 kept reads back through the store's API
    assert [m.name for m in s.models()] == V1_MODELS
    assert all(m.status == "ready" for m in s.models())
    assert len(s.profiles(gpu="H100-80GB", model="tiny_mlp")) == 5
    good = s.latest_plan("last_good")
    assert good is not None
    assert {m.name for _, p in good.plan.partitions() for m in p.models} == set(V1_MODELS)
    # the upgrade is recorded: history and an event
    hist = s.history()
    assert [h["version"] for h in hist] == list(range(2, SCHEMA_VERSION + 1))
    assert all(h["backup"] == str(s.backup) for h in hist)
    ev = s.events(kind="state_migrated")
    assert len(ev) == 1 and ev[0].data == {"from": 1, "to": SCHEMA_VERSION, "backup": str(s.backup)}
    s.close()
    assert file_version(db) == SCHEMA_VERSION
    for t in ("models", "profiles", "plans"):
        assert rows(db, t) == v1_tables[t], t

    # opening it again changes nothing: no second backup, no second event
    s2 = Store(db)
    assert s2.backup is None and len(s2.events(kind="state_migrated")) == 1
    s2.close()
    assert len(list(db.parent.glob("*.bak"))) == 1


def test_upgraded_schema_equals_a_new_one(tmp_path: Path) -> None:
    """Version 1 + the migrations gives the schema a new file gets, table by table."""
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    write_v1(old)
    Store(old).close()
    Store(new).close()
    assert schema_of(old) == schema_of(new)
    assert "schema_history" in schema_of(new)
    # and the v1 fixture's DDL is the store's version 1 (IF NOT EXISTS aside)
    v1 = tmp_path / "v1.db"
    write_v1(v1)
    assert set(schema_of(v1)) < set(schema_of(new))
    for name, sql in schema_of(v1).items():
        assert schema_of(new)[name] == sql, name


class _Failing(Store):
    """A store one version ahead whose migration fails half-way."""

    @staticmethod
    def _broken(cur: sqlite3.Cursor) -> None:
        raise ValueError("no room in the inn")

    migrations = (
        *MIGRATIONS,
        Migration(
            SCHEMA_VERSION + 1,
            "a table, then a step that fails",
            ("CREATE TABLE half_done (x INTEGER)", _broken),
        ),
    )


def test_a_failed_migration_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "stgs.db"
    Store(db).close()
    before = schema_of(db)
    with pytest.raises(StoreError, match=r"to schema version \d+ .*'_broken': no room") as exc:
        _Failing(db)
    assert "unchanged" in str(exc.value)
    assert schema_of(db) == before and "half_done" not in before
    assert file_version(db) == SCHEMA_VERSION
    Store(db).close()  # still opens with this stgs


def test_python_migration_steps_run_in_order(tmp_path: Path) -> None:
    db = tmp_path / "stgs.db"
    s = Store(db)
    s.put_model("a", {"slo_ms": 10}, "ready")
    s.close()

    def upper(cur: sqlite3.Cursor) -> None:
        cur.execute("UPDATE models SET status = upper(status)")

    class Next(Store):
        migrations = (
            *MIGRATIONS,
            Migration(SCHEMA_VERSION + 1, "statuses in capitals", (upper,)),
        )

    n = Next(db)
    assert n.schema_version == SCHEMA_VERSION + 1 and n.backup is not None
    assert [m.status for m in n.models()] == ["READY"]
    assert n.history()[-1]["what"] == "statuses in capitals"
    n.close()
    # ... and this stgs now refuses the file, naming both versions
    with pytest.raises(StoreError) as exc:
        Store(db)
    msg = str(exc.value)
    assert f"state schema version {SCHEMA_VERSION + 1} (written by stgs" in msg
    assert f"(schema version {SCHEMA_VERSION})" in msg


def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "stgs.db"
    future_state(db)
    before = db.read_bytes()
    with pytest.raises(StoreError, match=r"schema version 99 \(written by stgs 9\.9\.9\) is newer"):
        Store(db)
    assert db.read_bytes() == before and not list(tmp_path.glob("*.bak"))


def test_foreign_databases_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE photos (id INTEGER)")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match=r"not an stgs state database.*photos"):
        Store(other)
    bad = tmp_path / "bad.db"
    Store(bad).close()
    c = sqlite3.connect(bad)
    c.execute("UPDATE meta SET value='two' WHERE key='schema'")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match="unreadable state schema version 'two'"):
        Store(bad)


def future_state(db: Path, version: int = 99) -> None:
    """A state file as a future stgs 9.9.9 would leave it (schema ``version``)."""
    Store(db).close()
    c = sqlite3.connect(db)
    c.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version),))
    c.execute("UPDATE meta SET value='9.9.9' WHERE key='stgs_version'")
    c.commit()
    c.close()


# ---------------------------------------------------------------------------- the daemon
def _infer(c: Any, model: str) -> dict[str, Any]:
    """One KServe v2 JSON inference of zeros, shaped as the model's metadata says."""
    meta = c.get(f"/v2/models/{model}").json()
    inputs = []
    for i in meta["inputs"]:
        shape = [1 if d < 0 else d for d in i["shape"]]
        n = 1
        for d in shape:
            n *= d
        inputs.append(
            {"name": i["name"], "shape": shape, "datatype": i["datatype"], "data": [0] * n}
        )
    r = c.post(f"/v2/models/{model}/infer", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.mark.slow
def test_daemon_starts_on_v1_state_and_serves_its_models(tmp_path: Path) -> None:
    d = LocalDaemon(tmp_path, SECTIONS)
    db = tmp_path / "state" / "stgs.db"
    write_v1(db)
    try:
        p = d.start()
        with d.client() as c:
            wait_until("ready", lambda: c.get("/v2/health/ready").status_code == 200, 120, p)
            d.wait_all_ready(180)
            models = c.get("/v1/models").json()
            assert [m["name"] for m in models] == V1_MODELS
            assert all(m["status"] == "ready" and m["ready"] for m in models)
            for m in V1_MODELS:
                out = _infer(c, m)
                assert out["model_name"] == m and out["outputs"], out
            status = c.get("/v1/status").json()
            assert status["state_schema"] == SCHEMA_VERSION
            ev = c.get("/v1/events", params={"kind": "state_migrated"}).json()
            assert [e["data"]["from"] for e in ev] == [1]
            # the events v1 wrote are still there, under the new ones
            assert any(
                e["message"] == "model tiny_mlp: profiling"
                for e in c.get("/v1/events", params={"limit": 1000}).json()
            )
    finally:
        d.stop()
    assert file_version(db) == SCHEMA_VERSION
    (backup,) = db.parent.glob("stgs.db.schema1-*.bak")
    assert file_version(backup) == 1
    assert "schema version 1 -> " in d.log_path.read_text()


@pytest.mark.slow
def test_daemon_refuses_a_newer_state(tmp_path: Path) -> None:
    d = LocalDaemon(tmp_path, SECTIONS)
    db = tmp_path / "state" / "stgs.db"
    future_state(db, SCHEMA_VERSION + 1)
    before = db.read_bytes()
    try:
        p = d.start()
        rc = p.wait(120)
    finally:
        d.stop()
    log = d.log_path.read_text()
    assert rc == 2, log  # a setup error, as a bad config: systemd does not restart it
    want = (
        f"stgs: error: {db}: state schema version {SCHEMA_VERSION + 1} (written by stgs 9.9.9)"
        f" is newer than this stgs"
    )
    assert want in log and f"reads (schema version {SCHEMA_VERSION})" in log, log
    assert "Traceback" not in log
    assert db.read_bytes() == before and not list(db.parent.glob("*.bak"))
