# One entry point for setting up and checking stgs. `make test` is what CI runs (.ci/run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/stgs: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch 2.13.0 first, pinned: on CI and dev machines that resolves to the local CPU wheel;
	# an unpinned torch would pull the multi-GB CUDA build. The profiler's CPU mode and the
	# CPU workers of the runtime run on it.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# promtool, for the monitoring tests: extracted from Debian's prometheus package (never fails;
# without it those tests skip, or fail where STGS_REQUIRE_PROMTOOL=1 as in CI)
$(BIN)/promtool: | $(BIN)/stgs
	bash scripts/install_promtool.sh $@

# systemd-analyze, for the systemd unit tests (verify, security): unpacked from Debian's systemd
# package with the libraries it needs, no root (never fails; without it those tests skip, or fail
# where STGS_REQUIRE_SYSTEMD_ANALYZE=1 as in CI)
$(BIN)/systemd-analyze: | $(BIN)/stgs
	bash scripts/install_systemd_analyze.sh $@

# nvidia-pytriton (NVIDIA Triton Inference Server), for the Triton benchmark and its tests: in a
# directory of its own, since it pins numpy < 2 (never fails; without it those tests skip, or
# fail where STGS_REQUIRE_PYTRITON=1 as in CI)
$(VENV)/triton-site: | $(BIN)/stgs
	PY=$(BIN)/python bash scripts/install_pytriton.sh $@

setup: $(BIN)/stgs $(BIN)/promtool $(BIN)/systemd-analyze $(VENV)/triton-site

## Set up, plan the embedded example scenario, then run the daemon on the simulated node:
## register two models over REST, serve KServe v2 inference, stop (no GPU needed).
demo: setup
	$(BIN)/stgs plan
	$(BIN)/python scripts/demo.py

## Set up, then run every check: ruff, mypy on the core, import-linter, pytest.
test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python -m benchmarks.planner

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
