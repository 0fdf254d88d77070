"""``stgs mig export|import|apply`` (issue 18), as a sysadmin runs them: a plan's MIG layouts as a
mig-parted config (counts) and in stgs's own form (placements); stgs's form round-trips exactly,
mig-parted's keeps the counts and says that it chose the placements; bad files exit 2 with one
line; ``apply`` changes a simulated node's GPUs (a real one's through NVML, as root), checks the
whole file against the node before it changes anything, and says what a permission error needs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from api.cli import main
from api.launch import ROOT, LocalDaemon
from api.migcmd import _apply_on
from stgs.backend import SimulatedNode
from stgs.catalog import MigLayout, MigPlacement, canonical_layout, get_sku, layout_violation
from stgs.errors import ConfigError, NoPermissionError
from stgs.migfile import GpuLayout, NodeLayouts, from_mapping, from_plan
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan

# Five 1g.10gb instances at memory slices 2..6 of an H100: the layout that came back from a
# mig-parted round trip as @0, 1, 2, 3, 6 (issue 18).
ISSUE_LAYOUT = canonical_layout(("1g.10gb", s) for s in range(2, 7))
OTHER_LAYOUT = canonical_layout([("2g.20gb", 0), ("3g.40gb", 4)])


def _mig_gpu(index: int, layout: MigLayout) -> GpuPlan:
    sku = get_sku("H100-80GB")
    parts = tuple(
        Partition(
            kind="mig",
            sm_count=sku.mig_profile(p.profile).sm_count,
            memory_mib=sku.mig_profile(p.profile).memory_mib,
            duty_cycle_ms=10.0,
            models=(ModelAssignment(f"m{index}{p.start}", 4, 50.0, 5.0),),
            mig_profile=p.profile,
            mig_start=p.start,
        )
        for p in layout
    )
    return GpuPlan(index, sku.name, True, parts)


PLAN = Plan(
    policy="test",
    feasible=True,
    gpus=(
        _mig_gpu(0, ISSUE_LAYOUT),
        GpuPlan(
            1,
            "H100-80GB",
            False,
            (Partition("full", 132, 81559.0, 10.0, (ModelAssignment("w", 8, 100.0, 8.0),)),),
        ),
        _mig_gpu(2, OTHER_LAYOUT),
    ),
)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("mig") / "plan.json"
    p.write_text(PLAN.to_json())
    return p


def stgs(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("as_json", [False, True])
def test_stgs_form_round_trip_is_exact(
    plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    form = tmp_path / ("layouts.json" if as_json else "layouts.yaml")
    extra = ["--json"] if as_json else []
    rc, _, err = cli(
        capsys, "mig", "export", str(plan_file), "--format", "stgs", "--out", str(form), *extra
    )
    assert rc == 0, err
    doc = json.loads(form.read_text()) if as_json else yaml.safe_load(form.read_text())
    assert doc["format"] == "stgs.mig/v1" and doc["name"] == "stgs-plan"
    assert doc["gpus"][0]["placements"] == [{"profile": "1g.10gb", "start": s} for s in range(2, 7)]
    plan = Plan.from_json(plan_file.read_text())
    assert [g["index"] for g in doc["gpus"]] == [g.index for g in plan.gpus]

    back = tmp_path / "back"
    rc, out, err = cli(capsys, "mig", "import", str(form), "--out", str(back), *extra)
    assert rc == 0, err
    assert back.read_text() == form.read_text()  # byte for byte
    assert "1g.10gb@2, 1g.10gb@3, 1g.10gb@4, 1g.10gb@5, 1g.10gb@6 (read exactly)" in out
    # and to standard output, the notes on standard error
    rc, out, err = cli(capsys, "mig", "import", str(form), *extra)
    assert rc == 0 and out == form.read_text() and "read exactly" in err


def test_mig_parted_round_trip_keeps_the_counts_and_says_it_chose(
    plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mp = tmp_path / "mig-parted.yaml"
    rc, _, err = cli(
        capsys, "mig", "export", str(plan_file), "--name", "stgs-node1", "--out", str(mp)
    )
    assert rc == 0, err
    text = mp.read_text()
    assert text.startswith("# mig-parted config 'stgs-node1' written by stgs")
    assert "counts per profile only" in text
    doc = yaml.safe_load(text)
    assert doc["version"] == "v1"
    entries = doc["mig-configs"]["stgs-node1"]
    assert entries[0] == {"devices": [0], "mig-enabled": True, "mig-devices": {"1g.10gb": 5}}

    rc, out, err = cli(capsys, "mig", "import", str(mp), "--sku", "H100-80GB")
    assert rc == 0, err
    got = yaml.safe_load(out)
    plan = from_plan(Plan.from_json(plan_file.read_text()))
    assert [g["index"] for g in got["gpus"]] == [g.index for g in plan.gpus]
    for g, want in zip(got["gpus"], plan.gpus, strict=True):
        assert g["mig"] == (want.layout is not None)
        placed = canonical_layout((p["profile"], p["start"]) for p in g.get("placements", []))
        assert Counter(p.profile for p in placed) == Counter(p.profile for p in want.layout or ())
        assert layout_violation(get_sku("H100-80GB"), placed) is None
    chosen = got["gpus"][0]["placements"]
    assert [p["start"] for p in chosen] == [0, 1, 2, 3, 6]  # not the plan's 2..6: counts only
    assert "chosen for 5 x 1g.10gb: mig-parted gives counts only" in err

    # the imported layouts, exported again, give the same mig-parted config: counts are stable
    assert got["name"] == "stgs-node1"
    assert yaml.safe_load(from_mapping(got).to_mig_parted()) == doc


MP_HEAD = "version: v1\nmig-configs:\n  c:\n  - devices: all\n    mig-enabled: true\n"


@pytest.mark.parametrize(
    ("text", "args", "needle"),
    [
        (
            MP_HEAD + '    mig-devices: {"9g.99gb": 1}\n',
            ["--gpus", "1"],
            "H100-80GB has no MIG profile '9g.99gb'",
        ),
        (
            MP_HEAD + '    mig-devices: {"3g.40gb": 3}\n',
            ["--gpus", "1"],
            "cannot hold {'3g.40gb': 3}: at most 2 instances of 3g.40gb",
        ),
        (
            MP_HEAD + '    mig-devices: {"4g.40gb": 1, "3g.40gb": 1, "1g.10gb": 1}\n',
            ["--gpus", "1"],
            "cannot hold",
        ),
        (
            MP_HEAD.replace("v1", "v2") + '    mig-devices: {"1g.10gb": 1}\n',
            ["--gpus", "1"],
            "unknown mig-parted version 'v2'; supported: v1",
        ),
        (MP_HEAD + '    mig-devices: {"1g.10gb": 1}\n', [], "give the node's GPU count"),
        (
            MP_HEAD + '    mig-devices: {"1g.10gb": 1}\n  d:\n  - devices: all\n'
            "    mig-enabled: false\n",
            ["--gpus", "1"],
            "holds 2 mig-parted configs (c, d): choose one with --config-name",
        ),
        (
            "version: v1\nmig-configs:\n  c:\n  - devices: [0, 0]\n    mig-enabled: false\n",
            [],
            "lists a GPU twice",
        ),
        (
            "format: stgs.mig/v1\ngpus:\n- {index: 0, sku: H100-80GB, mig: true, placements:"
            " [{profile: 3g.40gb, start: 0}, {profile: 1g.10gb, start: 2}]}\n",
            [],
            "1g.10gb@2 overlaps another instance at memory slice 2",
        ),
        (
            "format: stgs.mig/v1\ngpus:\n- {index: 0, sku: H100-80GB, mig: true, placements:"
            " [{profile: 9g.99gb, start: 0}]}\n",
            [],
            "has no MIG profile '9g.99gb'",
        ),
        (
            "format: stgs.mig/v2\ngpus: [{index: 0, sku: H100-80GB, mig: false}]\n",
            [],
            "unknown format 'stgs.mig/v2'",
        ),
        (
            "format: stgs.mig/v1\ngpus: [{index: 0, sku: H100-80GB, mig: false},"
            " {index: 0, sku: H100-80GB, mig: false}]\n",
            [],
            "GPU 0 is listed twice",
        ),
        (
            "format: stgs.mig/v1\ngpus: [{index: 0, sku: L4, mig: true}]\n",
            [],
            "L4 does not support MIG",
        ),
        ("- a list\n", [], "not a MIG layout file"),
        ("version: v1\nversion: v1\n", [], "duplicate key 'version'"),
    ],
)
def test_bad_files_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, args: list[str], needle: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    for verb in (["import", str(f), "--sku", "H100-80GB"], ["apply", str(f), "--simulated"]):
        extra = args if verb[0] == "import" else [a for a in args if a != "--sku"]
        if verb[0] == "apply" and text.startswith("version"):
            extra = [*extra, "--sku", "H100-80GB"]
        rc, out, err = cli(capsys, "mig", *verb, *extra)
        assert rc == 2, (verb, out, err)
        assert needle in err and err.count("\n") == 1, err
        assert out == ""


def test_a_mig_parted_file_needs_the_sku(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "mp.yaml"
    f.write_text(MP_HEAD + '    mig-devices: {"1g.10gb": 1}\n')
    rc, _, err = cli(capsys, "mig", "import", str(f), "--gpus", "1")
    assert rc == 2 and "give --sku" in err


def test_export_refuses_a_name_that_cannot_be_a_label(
    plan_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = cli(capsys, "mig", "export", str(plan_file), "--name", "my config!")
    assert rc == 2 and "nvidia.com/mig.config" in err


def test_apply_on_a_simulated_node(
    plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    form = tmp_path / "layouts.yaml"
    assert (
        cli(capsys, "mig", "export", str(plan_file), "--format", "stgs", "--out", str(form))[0] == 0
    )

    rc, out, err = cli(capsys, "mig", "apply", str(form), "--simulated", "--dry-run")
    assert rc == 0, err
    assert "gpu 0 (H100-80GB): would enable MIG; create 1g.10gb@2, 1g.10gb@3" in out
    assert "dry run on simulated node: nothing changed" in out and "MIG-" not in out

    rc, out, err = cli(capsys, "mig", "apply", str(form), "--simulated")
    assert rc == 0, err
    assert made(out) == {0: [str(p) for p in ISSUE_LAYOUT], 2: [str(p) for p in OTHER_LAYOUT]}
    assert "gpu 1 (H100-80GB): already as asked (MIG disabled)" in out

    rc, out, err = cli(capsys, "mig", "apply", str(form), "--simulated", "--gpu", "1")
    assert rc == 0 and "gpu 0" not in out

    mp = tmp_path / "mp.yaml"
    assert cli(capsys, "mig", "export", str(plan_file), "--out", str(mp))[0] == 0
    rc, out, err = cli(capsys, "mig", "apply", str(mp), "--simulated", "--sku", "H100-80GB")
    assert rc == 0, err
    assert made(out)[0] == ["1g.10gb@0", "1g.10gb@1", "1g.10gb@2", "1g.10gb@3", "1g.10gb@6"]


def made(out: str) -> dict[int, list[str]]:
    """The instances ``stgs mig apply`` reports created, per GPU."""
    got: dict[int, list[str]] = {}
    gpu = -1
    for line in out.splitlines():
        if line.startswith("gpu "):
            gpu = int(line.split()[1])
        elif line.startswith("  "):
            assert "  MIG-" in line
            got.setdefault(gpu, []).append(line.split()[0])
    return got


def test_pipeline_through_standard_input(plan_file: Path) -> None:
    """plan | export | apply, as a shell pipeline passes them."""
    form = stgs("mig", "export", "-", "--format", "stgs", stdin=plan_file.read_text())
    assert form.returncode == 0, form.stderr
    applied = stgs("mig", "apply", "-", "--simulated", stdin=form.stdout)
    assert applied.returncode == 0, applied.stderr
    assert "1g.10gb@6  MIG-" in applied.stdout


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"dry_run": False, **kw})


def test_apply_checks_the_whole_file_before_changing_anything() -> None:
    node = SimulatedNode(["H100-80GB", "A100-80GB"])
    try:
        good = GpuLayout(0, "H100-80GB", canonical_layout([("3g.40gb", 0)]))
        for bad, needle in (
            (GpuLayout(1, "H100-80GB", ()), "GPU 1 of test node is a A100-80GB"),
            (GpuLayout(2, "H100-80GB", ()), "the file has a layout for GPU 2; test node has 2"),
        ):
            with pytest.raises(ConfigError, match=needle):
                _apply_on(node, NodeLayouts("x", (good, bad)), _args(), "test node")
            assert node.calls == []  # GPU 0 came first and was not touched
        assert _apply_on(node, NodeLayouts("x", (good,)), _args(), "test node") == 0
        assert node.mig_layout(0) == (MigPlacement(0, "3g.40gb"),)
        # back to MIG off: the instances go first
        assert (
            _apply_on(node, NodeLayouts("x", (GpuLayout(0, "H100-80GB", None),)), _args(), "t") == 0
        )
        assert not node.gpus()[0].mig_enabled and node.calls[-1] == "set_mig_mode 0 False"
    finally:
        node.close()


class _NotRoot(SimulatedNode):
    """What NVML answers a caller without root on a MIG change (NVML_ERROR_NO_PERMISSION)."""

    def set_mig_mode(self, gpu: int, enabled: bool) -> None:
        raise NoPermissionError(f"GPU {gpu}: set MIG mode: Insufficient Permissions (NVML error 4)")


def test_permission_error_says_root_is_needed(capsys: pytest.CaptureFixture[str]) -> None:
    node = _NotRoot(["H100-80GB"])
    try:
        layouts = NodeLayouts("x", (GpuLayout(0, "H100-80GB", canonical_layout([("7g.80gb", 0)])),))
        assert _apply_on(node, layouts, _args(), "this node") == 1
        err = capsys.readouterr().err
        assert "Insufficient Permissions" in err and "MIG changes need root" in err
        assert "sudo stgs mig apply" in err and err.count("\n") == 1
    finally:
        node.close()


def _has_nvml() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_has_nvml(), reason="this machine has NVML: apply would reach real GPUs")
def test_apply_without_a_gpu_points_at_simulated(plan_file: Path, tmp_path: Path) -> None:
    form = tmp_path / "layouts.yaml"
    assert (
        stgs("mig", "export", str(plan_file), "--format", "stgs", "--out", str(form)).returncode
        == 0
    )
    r = stgs("mig", "apply", str(form), "--dry-run")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "NVML" in r.stderr and "--simulated" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ a live daemon's plan
MIG_GPU = """
[backend]
kind = "simulated"
simulated_gpus = [{ sku = "H100-80GB", count = 1, mig = true }]
[planner]
policy = "mig-only"
[controller]
interval_s = 3600.0
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    d = LocalDaemon(tmp_path_factory.mktemp("migd"), MIG_GPU)
    try:
        d.start_ready()
        yield d
    finally:
        d.stop()


@pytest.mark.slow
def test_export_live_is_the_layout_the_daemon_applied(daemon: LocalDaemon, tmp_path: Path) -> None:
    none = stgs("mig", "export", "--live", "--config", str(daemon.config))
    assert none.returncode == 2 and "applied no plan yet" in none.stderr

    daemon.register("tiny_mlp", 500, 5)
    r = stgs(
        "mig", "export", "--live", "--config", str(daemon.config), "--format", "stgs", "--json"
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    with daemon.client() as c:
        node = c.get("/v1/gpus").json()["gpus"][0]
    assert node["mig_enabled"] and node["mig_devices"]
    live = [{"profile": d["profile"], "start": d["start"]} for d in node["mig_devices"]]
    assert doc["gpus"][0]["placements"] == live  # what the plan says is what the node has

    mp = stgs("mig", "export", "--live", "--config", str(daemon.config))
    assert mp.returncode == 0, mp.stderr
    counts = Counter(d["profile"] for d in node["mig_devices"])
    assert yaml.safe_load(mp.stdout)["mig-configs"]["stgs-plan"][0]["mig-devices"] == dict(counts)


def test_a_bad_file_is_refused_before_the_node_is_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On any machine, GPU or not: the file's error, not NVML's, and nothing touched."""
    f = tmp_path / "bad.yaml"
    f.write_text(
        "format: stgs.mig/v1\ngpus:\n- {index: 0, sku: H100-80GB, mig: true, placements:"
        " [{profile: 7g.80gb, start: 0}, {profile: 1g.10gb, start: 0}]}\n"
    )
    rc, out, err = cli(capsys, "mig", "apply", str(f))
    assert rc == 2 and out == ""
    assert "overlaps another instance" in err and "NVML" not in err
