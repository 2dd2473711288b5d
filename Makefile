# Every target creates the virtualenv on first use, so a fresh clone needs only `make test`
# or `make run`. Requirements: Python 3.11+, a JDK 17+ and Maven (for the local Kafka broker);
# for `make test` also Go (Helm and promtool are built from their modules) and apt (bubblewrap).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Helm is built from its Go module once and cached (no prebuilt binaries can be fetched here).
HELM_VERSION := v3.22.0
HELM   := $(HOME)/.cache/purge-worker/helm-$(HELM_VERSION)/helm
# promtool checks the chart's alert rules; built from Prometheus' Go module the same way.
PROMTOOL_VERSION := v0.316.0
PROMTOOL := $(HOME)/.cache/purge-worker/promtool-$(PROMTOOL_VERSION)/promtool

.PHONY: test run lint fmt bench bench-trace bench-receipts soak clean broker helm promtool bwrap chart-schema lock

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

$(HELM):
	GOBIN=$(dir $(HELM)) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

helm: $(HELM)

$(PROMTOOL):
	GOBIN=$(dir $(PROMTOOL)) go install github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_VERSION)

promtool: $(PROMTOOL)

# The image smoke test runs the worker read-only as uid 10001 under bubblewrap (no Docker here).
bwrap:
	@command -v bwrap >/dev/null || { apt-get update -qq && apt-get install -y -qq bubblewrap; }

broker: $(STAMP)
	$(BIN)/python scripts/kafka_broker.py fetch

lint: $(STAMP)
	$(BIN)/ruff check worker tests scripts examples
	$(BIN)/ruff format --check worker tests scripts examples
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format worker tests scripts
	$(BIN)/ruff check --fix worker tests scripts

test: lint broker helm promtool bwrap
	HELM=$(HELM) PROMTOOL=$(PROMTOOL) $(BIN)/pytest

run: broker
	$(BIN)/python scripts/dev_run.py

# The image's dependencies, pinned with their hashes (the Dockerfile installs exactly these).
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-find-links --output-file requirements.lock pyproject.toml

# The chart's schema for the worker's settings comes from the config model.
chart-schema: $(STAMP)
	$(BIN)/python scripts/chart_schema.py

bench: broker
	$(BIN)/python scripts/bench.py

# make bench's catch-up and ingest with receipts off and on (alone, ~10 minutes).
bench-receipts: broker
	$(BIN)/python scripts/bench_receipts.py

# `trace` on a receipts topic of 1,000,000 receipts (alone: it fills the topic first).
bench-trace: broker
	$(BIN)/python scripts/bench_trace.py

# A long run at a steady rate: memory, files, threads, lag and latency over time (SOAK.md).
SOAK_MINUTES ?= 30
SOAK_RATE ?= 300
soak: broker
	$(BIN)/python scripts/soak.py --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .bench
