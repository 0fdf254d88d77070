#!/usr/bin/env bash
# nvidia-pytriton (NVIDIA Triton Inference Server and its Python-callable bridge) for
# benchmarks/triton_gpu.py, in a directory of its own: it pins numpy < 2, which Triton's Python
# backend stub needs, while the project's environment keeps numpy 2. The version is pyproject's
# `triton` extra.
#
#   scripts/install_pytriton.sh DIR
#       for this machine's Python (make setup: .venv/triton-site). Never fails: without it the
#       Triton tests skip, or fail where STGS_REQUIRE_PYTRITON=1 (CI).
#   scripts/install_pytriton.sh --gpu OUT.tar.xz
#       for the lent GPU (CPython 3.12, x86-64): only what its image lacks (docs/baselines.md),
#       without the backend stubs of other Python versions and the bundled libpython3.13, as one
#       xz tarball (the wheels themselves, 62 MB, do not fit the 64 MiB a device call carries).
#       There: mkdir -p /tmp/site-triton && tar -xJf OUT.tar.xz -C /tmp/site-triton
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PIN=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["triton"][0])')
if [ "${1:-}" != "--gpu" ]; then
    dir=${1:?usage: install_pytriton.sh DIR | --gpu OUT.tar.xz}
    if [ -d "$dir/pytriton" ]; then exit 0; fi
    if ! "$PY" -m pip install --quiet --no-compile --target "$dir" "$PIN"; then
        echo "install_pytriton.sh: could not install $PIN into $dir (the Triton tests skip)" >&2
        rm -rf "$dir"
    fi
    exit 0
fi
set -e
out=${2:?usage: install_pytriton.sh --gpu OUT.tar.xz}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the lent GPU's image has torch, numpy 2, grpcio, protobuf, wrapt, typer, typing-inspect,
# mypy-extensions, aiohttp, urllib3, certifi, zipp, ml-dtypes; pytriton needs these besides
"$PY" -m pip install --quiet --no-compile --no-deps --only-binary=:all: --target "$tmp/site" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    "$PIN" numpy==1.26.4 pyzmq==27.3.0 sh==2.4.0 importlib_metadata==10.2.0 \
    lazy_importer==0.1.0 gevent==26.9.0 geventhttpclient==2.6.1 greenlet==3.3.2 \
    zope.event==6.2 zope.interface==8.7 brotli==1.2.1 tritonclient==2.73.0 \
    python-rapidjson==1.25
site=$tmp/site
rm -rf "$site/bin" "$site"/nvidia_pytriton.libs/libpython3-*.13.so.* "$site"/gevent/tests
find "$site/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 \
    -exec rm -rf {} +
find "$site/numpy" -type d -name tests -prune -exec rm -rf {} +
tar -cf - -C "$site" . | xz -T0 -9 > "$out"
ls -l "$out"
