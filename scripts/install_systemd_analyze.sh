#!/usr/bin/env bash
# Put systemd-analyze (`systemd-analyze verify` and `security --offline=true` of the units in
# deploy/) at $1 (default .venv/bin/systemd-analyze) for tests/test_systemd_unit.py. No root
# needed, and no systemd running: both verbs read unit files only.
#
# systemd-analyze ships in Debian's `systemd` package, its code in `libsystemd-shared`.
# Installing them would replace the machine's init, so the .debs are downloaded (`apt-get
# download`) and unpacked (`dpkg-deb -x`) into $1's ../lib/systemd-analyze, with the libraries
# they depend on that the machine lacks (libkmod2, libapparmor1, ... where systemd is not
# installed); $1 is a wrapper that runs the unpacked binary on those libraries. The unpacked
# tree also holds systemd's own units (sysinit.target, ...), which `verify --root` needs. With no
# package lists for them, `apt-get update` fills lists of our own in a temporary directory
# first: no root needed. A systemd-analyze already on PATH that runs is used as it is. Never fails:
# without it the tests that need it skip, saying why (unless STGS_REQUIRE_SYSTEMD_ANALYZE=1, as
# .ci/run sets).
set -uo pipefail
dest=${1:-.venv/bin/systemd-analyze}
if systemd-analyze --version >/dev/null 2>&1 || [ -x "$dest" ]; then
    exit 0
fi
say() { echo "install_systemd_analyze: $*" >&2; }
if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here: the systemd unit tests will skip"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
own=(-o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1)
opts=()
download() { (cd "$tmp" && apt-get "${opts[@]}" download "$@" >>"$tmp/apt.log" 2>&1); }
if ! download systemd libsystemd-shared; then
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
    apt-get "${own[@]}" update -qq >"$tmp/update.log" 2>&1
    opts=("${own[@]}")
    download systemd libsystemd-shared
fi
if ! ls "$tmp"/systemd_*.deb "$tmp"/libsystemd-shared_*.deb >/dev/null 2>&1; then
    say "could not download Debian's systemd package: the systemd unit tests will skip"
    tail -n 3 "$tmp/apt.log" >&2
    exit 0
fi
# the libraries of both packages' Depends that this machine does not have
missing=()
for deb in "$tmp"/systemd_*.deb "$tmp"/libsystemd-shared_*.deb; do
    for pkg in $(dpkg-deb -f "$deb" Pre-Depends Depends | sed 's/^[A-Za-z-]*: //; s/([^)]*)//g; s/|[^,]*//g' | tr ',' '\n'); do
        case $pkg in
        lib*) [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] \
            || missing+=("$pkg") ;;
        esac
    done
done
[ ${#missing[@]} -eq 0 ] || download $(printf '%s\n' "${missing[@]}" | sort -u) || true
root="$(cd "$(dirname "$dest")" && pwd)/../lib/systemd-analyze"
rm -rf "$root" && mkdir -p "$root"
for deb in "$tmp"/*.deb; do
    dpkg-deb -x "$deb" "$root" || { say "unpacking $deb failed: the tests will skip"; exit 0; }
done
root=$(cd "$root" && pwd)
libs=$(find "$root" \( -type f -o -type l \) -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
cat >"$dest.part" <<EOF
#!/bin/sh
# systemd-analyze of Debian's systemd package, unpacked by scripts/install_systemd_analyze.sh
LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$root/usr/bin/systemd-analyze" "\$@"
EOF
chmod +x "$dest.part"
if "$dest.part" --version >/dev/null 2>"$tmp/run.log"; then
    mv "$dest.part" "$dest"
    say "$("$dest" --version | head -n 1) at $dest (unpacked in $root)"
else
    rm -f "$dest.part"
    say "the unpacked systemd-analyze does not run: the systemd unit tests will skip"
    tail -n 3 "$tmp/run.log" >&2
fi
exit 0
