#!/usr/bin/env bash
# Put promtool (Prometheus's linter: `promtool check metrics`, `promtool check rules`) at $1
# (default .venv/bin/promtool) for the monitoring tests (tests/test_monitoring.py).
#
# promtool ships in Debian's `prometheus` package. Installing that package would also install
# and start a Prometheus server, so the .deb is downloaded (`apt-get download`) and only
# usr/bin/promtool is extracted from it. With no package lists for it (a fresh CI machine),
# `apt-get update` fills lists of our own in a temporary directory first: no root needed.
# A promtool already on PATH is used as it is. Never fails: without promtool the tests that need
# it skip, saying why (unless STGS_REQUIRE_PROMTOOL=1, as .ci/run sets).
set -uo pipefail
dest=${1:-.venv/bin/promtool}
if command -v promtool >/dev/null 2>&1 || [ -x "$dest" ]; then
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# package lists of our own (no root needed, the system's lists untouched): apt-get update into
# them when the system has none for the package
own=(-o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1)
download() { (cd "$tmp" && apt-get "$@" download prometheus >"$tmp/apt.log" 2>&1); }
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_promtool: no apt-get here: the promtool tests will skip" >&2
    exit 0
fi
if ! download; then
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
    apt-get "${own[@]}" update -qq >"$tmp/update.log" 2>&1
    download "${own[@]}"
fi
deb=$(ls "$tmp"/prometheus_*.deb 2>/dev/null | head -n 1)
if [ -z "$deb" ]; then
    echo "install_promtool: could not download Debian's prometheus package: the promtool" \
        "tests will skip" >&2
    tail -n 3 "$tmp/apt.log" >&2
    exit 0
fi
mkdir -p "$(dirname "$dest")"
if dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/promtool >"$dest.part" \
    && chmod +x "$dest.part" && "$dest.part" --version >/dev/null 2>&1; then
    mv "$dest.part" "$dest"
    echo "install_promtool: $("$dest" --version 2>&1 | head -n 1) at $dest"
else
    rm -f "$dest.part"
    echo "install_promtool: extracting promtool from $deb failed: the promtool tests will skip" >&2
fi
exit 0
