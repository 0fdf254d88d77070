"""The daemon's SQLite store and TOML config."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from api.config import DaemonConfig, load_config, read_token
from api.store import Store, StoreError
from stgs.errors import ConfigError
from stgs.plan import Plan, empty_plan
from stgs.profiles import ProfileRow


def test_models_round_trip_and_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state" / "stgs.db"
    s = Store(db)
    s.put_model("resnet50", {"slo_ms": 20, "rate_rps": 100}, "profiling")
    s.put_model("bert", {"slo_ms": 40, "rate_rps": 10}, "ready")
    assert s.set_model_status("resnet50", "ready", "profiled in 3 s")
    assert not s.set_model_status("nope", "ready")
    created = s.get_model("resnet50")
    assert created is not None
    s.put_model("resnet50", {"slo_ms": 25, "rate_rps": 100}, "ready")  # update keeps created_at
    s.close()

    s2 = Store(db)
    names = [m.name for m in s2.models()]
    assert names == ["resnet50", "bert"]
    r = s2.get_model("resnet50")
    assert r is not None and r.spec == {"slo_ms": 25, "rate_rps": 100} and r.status == "ready"
    assert r.created_at == created.created_at
    assert s2.delete_model("bert") and not s2.delete_model("bert")
    assert s2.get_model("bert") is None


def test_plans_current_and_last_good(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    assert s.latest_plan("current") is None
    p1 = empty_plan("stgs", [("H100-80GB", True)])
    p2 = empty_plan("temporal", [("L4", False), ("L4", False)])
    s.save_plan(p1, "last_good", "ready")
    s.save_plan(p2, "current", "applying")
    s.save_plan(p1, "current", "ready")
    cur = s.latest_plan("current")
    good = s.latest_plan("last_good")
    assert cur is not None and good is not None
    assert cur.plan == p1 and cur.state == "ready"
    assert good.plan == p1
    assert isinstance(cur.plan, Plan)
    s.prune_plans(keep=1)
    assert s.latest_plan("last_good") is not None  # newest per role survives pruning


def test_profiles_replace_by_key(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    row = ProfileRow("H100-80GB", "m", "mps:50", 66, 8, 2.0, 100.0)
    assert s.put_profiles([row, ProfileRow("H100-80GB", "m", "full", 132, 8, 1.5, 100.0)]) == 2
    s.put_profiles([ProfileRow("H100-80GB", "m", "mps:50", 66, 8, 2.5, 100.0)])
    rows = s.profiles(gpu="H100-80GB", model="m")
    assert len(rows) == 2
    assert {r.partition: r.latency_ms for r in rows} == {"full": 1.5, "mps:50": 2.5}
    assert s.has_profile("H100-80GB", "m") and not s.has_profile("L4", "m")


def test_events_newest_first(tmp_path: Path) -> None:
    t = iter(range(100))
    s = Store(tmp_path / "s.db", clock=lambda: float(next(t)))
    s.log_event("register", "model a", model="a")
    s.log_event("replan", "k=2", k=2.0)
    s.log_event("register", "model b", model="b")
    ev = s.events()
    assert [e.message for e in ev] == ["model b", "k=2", "model a"]
    assert [e.data for e in s.events(kind="register", limit=1)] == [{"model": "b"}]


def test_committed_write_survives_kill_9(tmp_path: Path) -> None:
    """A write that returned is on disk even if the process dies right after."""
    db = tmp_path / "s.db"
    code = textwrap.dedent(
        f"""
        import os, signal
        from api.store import Store
        s = Store({str(db)!r})
        s.put_model("survivor", {{"slo_ms": 10}}, "ready")
        s.log_event("register", "survivor")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == -9
    s = Store(db)
    assert s.get_model("survivor") is not None
    assert [e.message for e in s.events()] == ["survivor"]


def test_schema_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    """A newer schema than this stgs knows (an older one is migrated: test_store_migrations)."""
    db = tmp_path / "s.db"
    s = Store(db)
    s._db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    s.close()
    with pytest.raises(StoreError, match=r"schema version 99 .*is newer than this stgs"):
        Store(db)


def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(bad)


# ---------------------------------------------------------------------------- config
def test_default_config_is_loopback_and_simulated_when_no_gpu() -> None:
    cfg = DaemonConfig()
    assert cfg.server.host == "127.0.0.1"
    assert cfg.backend.kind == "auto"
    assert read_token(cfg) is None


def test_config_file_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token-0123456789\n")
    f = tmp_path / "stgs.toml"
    f.write_text(
        textwrap.dedent(
            """
            [server]
            host = "0.0.0.0"
            port = 9000
            token_file = "token"
            [paths]
            state_dir = "state"
            [backend]
            kind = "simulated"
            simulated_gpus = [{sku = "A100-80GB", count = 2}]
            [controller]
            hysteresis = 0.3
            """
        )
    )
    cfg = load_config(f)
    assert cfg.server.port == 9000
    assert cfg.paths.state_dir == tmp_path / "state"
    assert cfg.backend.simulated_gpus[0].count == 2
    assert read_token(cfg) == "s3cret-token-0123456789"


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("[server]\nprot = 1\n", "server.prot"),
        ("[server]\nhost = '0.0.0.0'\n", "token_file"),
        ("[controller]\ninterval_s = -1\n", "controller.interval_s"),
        ("[backend]\nkind = 'cuda'\n", "backend.kind"),
        ("not toml = = 1", "not valid TOML"),
        ("[planner]\nspare_factor = 'full'\n", 'planner.spare_factor: .*or "fill"'),
        ("[planner]\nspare_factor = 0.5\n", "planner.spare_factor: .*from 1 to 10"),
        ("[planner]\nspare_factor = true\n", "planner.spare_factor"),
        ("[planner]\nmax_spare_factor = 0.9\n", "planner.max_spare_factor"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, msg: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.", 1)):
        load_config(f)


def test_spare_factor_default_fill_and_old_configs_keep_working(tmp_path: Path) -> None:
    assert DaemonConfig().planner.spare_factor == "fill"
    assert DaemonConfig().planner.max_spare_factor == 8.0
    f = tmp_path / "c.toml"
    for text, want in [
        ("spare_factor = 1.5", 1.5),  # a config written before "fill" existed
        ("spare_factor = 1", 1.0),
        ('spare_factor = "fill"\nmax_spare_factor = 4', "fill"),
    ]:
        f.write_text(f"[planner]\n{text}\n")
        assert load_config(f).planner.spare_factor == want


def test_missing_config_and_short_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
    (tmp_path / "t").write_text("short")
    f = tmp_path / "c.toml"
    f.write_text("[server]\ntoken_file = 't'\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(load_config(f))
