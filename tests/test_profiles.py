"""Profile and interference tables: reading, validation, normalisation, hashing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from profiler.models import ZOO
from stgs.catalog import get_sku
from stgs.errors import ProfileError
from stgs.profiles import (
    PROFILE_COLUMNS,
    ProfileRow,
    ProfileTable,
    default_interference_path,
    default_profiles_path,
    parse_partition,
    read_interference,
    read_profiles,
    write_profiles,
)

HEADER = ",".join(PROFILE_COLUMNS)
GOOD = "H200,resnet50,mps:50,66,8,2.24,400"


def write(tmp_path: Path, text: str, name: str = "p.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_file_reads() -> None:
    path = default_profiles_path()
    assert path.name == "example-profiles.csv"
    assert path.is_file()
    table = read_profiles(path)
    assert set(table.gpus()) == {
        "H100-80GB",
        "H200-141GB",
        "A100-80GB",
        "A100-40GB",
        "L4",
        "T4",
        "RTX-2080Ti",
    }
    for gpu in table.gpus():
        assert set(table.models(gpu)) == set(ZOO)
        assert get_sku(gpu).name == gpu
    rows = table.rows_for("H200", "resnet50")  # alias
    kinds = {r.kind for r in rows}
    assert kinds == {"full", "mps", "green", "mig"}
    assert {r.kind for r in table.rows_for("L4", "vgg16")} == {"full", "mps"}
    mig = {r.partition for r in table.rows_for("A100-40GB", "bert_base") if r.kind == "mig"}
    assert mig == {f"mig:{p.name}" for p in get_sku("A100-40GB").mig_profiles}
    assert {r.batch for r in rows} == {1, 2, 4, 8, 16, 32, 64, 128}
    for r in rows:
        if r.kind == "mps":
            assert r.sm_count == get_sku("H200").mps_sm_count(float(r.partition_arg or 0))


def test_shipped_interference_reads() -> None:
    rows = read_interference(default_interference_path())
    assert rows
    assert {r.gpu for r in rows} == {"H100-80GB", "H200-141GB"}
    assert all(r.latency_ms >= r.solo_latency_ms for r in rows)
    assert {r.neighbour_pct for r in rows} <= {25.0, 50.0, 75.0}


def test_round_trip_alias_and_unknown_gpu(tmp_path: Path) -> None:
    text = "\n".join(
        [
            HEADER + ",p99_ms,graph",
            GOOD + ",2.5,yes",
            "MysteryGPU-9000,resnet50,full,100,1,1.5,380.5,1.6,no",
            "A100-SXM4-40GB,bert_base,mig:3g.20gb,42,16.0,5.5,600,6,yes",
            "",
        ]
    )
    table = read_profiles(write(tmp_path, text))
    assert table.gpus() == ["A100-40GB", "H200-141GB", "MysteryGPU-9000"]
    assert table.has("H200-141GB", "resnet50")
    assert table.has("h200", "resnet50")
    assert not table.has("H200", "vgg16")
    row = table.rows_for("A100-40GB", "bert_base")[0]
    assert (row.kind, row.partition_arg, row.batch, row.sm_count) == ("mig", "3g.20gb", 16, 42)
    assert isinstance(row.batch, int)
    out = tmp_path / "out.csv"
    write_profiles(table, out)
    again = read_profiles(out)
    assert again.rows == table.rows
    assert again.content_hash() == table.content_hash()


def test_content_hash_order_independent_and_sensitive() -> None:
    a = ProfileRow("H200", "m", "full", 132, 1, 1.0, 10)
    b = ProfileRow("H200", "m", "full", 132, 2, 1.5, 12)
    c = ProfileRow("H200", "m", "full", 132, 2, 1.6, 12)
    assert ProfileTable([a, b]).content_hash() == ProfileTable([b, a]).content_hash()
    assert ProfileTable([a, b]).content_hash() != ProfileTable([a, c]).content_hash()
    merged = ProfileTable([a]).merge(ProfileTable([b]))
    assert len(merged) == 2
    assert merged.content_hash() == ProfileTable([a, b]).content_hash()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("full", ("full", None)),
        (" MPS:50 ", ("mps", "50")),
        ("mps:50.0", ("mps", "50")),
        ("mps:37.5", ("mps", "37.5")),
        ("mig:3g.40gb", ("mig", "3g.40gb")),
        ("mig:1g.10gb+me", ("mig", "1g.10gb+me")),
        ("green:32", ("green", "32")),
    ],
)
def test_parse_partition(text: str, want: tuple[str, str | None]) -> None:
    assert parse_partition(text) == want


@pytest.mark.parametrize(
    "text",
    ["", "half", "full:1", "mps", "mps:", "mps:abc", "mps:0", "mps:150", "mig:big", "green:-8"],
)
def test_parse_partition_rejects(text: str) -> None:
    with pytest.raises(ProfileError):
        parse_partition(text)


@pytest.mark.parametrize(
    ("lines", "line_no", "fragment"),
    [
        (["gpu,model,partition,sm_count,batch,latency_ms"], 1, "memory_mib"),
        ([HEADER, GOOD, "H200,resnet50,full,132,8,fast,400"], 3, "latency_ms"),
        ([HEADER, GOOD, GOOD, "H200,resnet50,half,132,8,1.5,400"], 4, "partition"),
        ([HEADER, "H200,resnet50,full,132,8,-1.5,400"], 2, "latency_ms"),
        ([HEADER, "H200,resnet50,full,132,0,1.5,400"], 2, "batch"),
        ([HEADER, "H200,resnet50,full,0,8,1.5,400"], 2, "sm_count"),
        ([HEADER, "H200,resnet50,full,132,2.5,1.5,400"], 2, "batch"),
        ([HEADER, "H200,resnet50,full,132,8,nan,400"], 2, "latency_ms"),
        ([HEADER, "H200,resnet50,full,132,8,1.5,-4"], 2, "memory_mib"),
        ([HEADER, "H200,resnet50,full,132"], 2, "fields"),
    ],
)
def test_bad_files(tmp_path: Path, lines: list[str], line_no: int, fragment: str) -> None:
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ProfileError) as info:
        read_profiles(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line_no}: "), msg
    assert fragment in msg


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=re.escape(str(tmp_path / "nope.csv"))):
        read_profiles(tmp_path / "nope.csv")
    with pytest.raises(ProfileError, match=":1: empty"):
        read_profiles(write(tmp_path, ""))


def test_bad_interference(tmp_path: Path) -> None:
    head = "gpu,model,mps_pct,batch,neighbour_pct,latency_ms,solo_latency_ms"
    path = write(tmp_path, f"{head}\nH200,resnet50,50,32,0,6.8,5.8\n", "i.csv")
    with pytest.raises(ProfileError, match=r"i\.csv:2: neighbour_pct"):
        read_interference(path)
    path = write(tmp_path, "gpu,model,mps_pct\nH200,resnet50,50\n", "j.csv")
    with pytest.raises(ProfileError, match=r"j\.csv:1: missing column"):
        read_interference(path)


def test_row_validation_outside_files() -> None:
    with pytest.raises(ProfileError):
        ProfileRow("H200", "m", "full", 132, 1, 0.0, 10)
    row = ProfileRow("h200", " m ", "MPS:25.0", 32, 4, 1, 10)
    assert (row.gpu, row.model, row.partition, row.kind) == ("H200-141GB", "m", "mps:25", "mps")
