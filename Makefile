# The README's commands. Everything a fresh machine needs is installed here, nothing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The local CPU wheel; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-unit bench bench-smoke lint docs docs-check clean redis-server postgresql chromium prometheus mlflow-server cluster-pin

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so the project's torch range is already satisfied and no CUDA wheels are pulled
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/vaectl demo

# Two pytest-xdist workers, a module each at a time (its module fixtures once), the slowest modules
# first (tests/conftest.py orders them): the suite mostly waits on servers and clusters starting.
test: setup redis-server postgresql chromium prometheus mlflow-server
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30

# The library, configs and deployment files without servers or Ray: seconds.
test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

# The Redis tests start their own redis-server on 127.0.0.1; install it when the machine lacks it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# One test keeps the embeddings catalog on a real PostgreSQL server it starts on 127.0.0.1.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; }

# The monitoring report test renders the HTML report in headless Chromium.
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# The pipeline's metrics tests push to a real Pushgateway scraped by a real Prometheus (promtool
# checks and unit-tests deploy/prometheus/); Debian's packages do not start services on install here.
prometheus:
	@{ command -v prometheus && command -v prometheus-pushgateway && command -v promtool; } >/dev/null || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
		prometheus prometheus-pushgateway >/dev/null; }

# One test trains against a real MLflow tracking server over HTTP. The server is full `mlflow`, whose
# pins (pyarrow<26) do not fit the project's environment: it gets a virtual environment of its own.
# The project itself needs only mlflow-skinny (the client). Also what `mlflow ui` runs from.
MLFLOW_VENV ?= .mlflow-venv
mlflow-server: $(MLFLOW_VENV)/.installed-auth

# [auth]: Flask-WTF, which the basic-auth app (the deploy's, and the tests') needs
$(MLFLOW_VENV)/.installed-auth:
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install --quiet "mlflow[auth]==3.17.*"
	touch $@

bench: setup redis-server
	$(BIN)/python -m benchmarks.embed
	$(BIN)/python -m benchmarks.publish
	$(BIN)/python -m benchmarks.serve
	$(BIN)/python -m benchmarks.history
	$(BIN)/python -m benchmarks.train
	$(BIN)/python -m benchmarks.anomaly
	$(BIN)/python -m benchmarks.anomaly_variants
	$(BIN)/python -m benchmarks.drift
	$(BIN)/python -m benchmarks.cluster
	$(BIN)/python -m benchmarks.month
	$(BIN)/python -m benchmarks.upstream
	$(BIN)/python -m benchmarks.registry
	$(BIN)/python -m benchmarks.year
	$(BIN)/python -m benchmarks.crash
	$(BIN)/python -m benchmarks.security

# Every benchmark at a tiny size (benchmarks.gpu on the CPU): each must complete and write its JSON.
# .ci/run runs it, so that no benchmark breaks unseen; the figures are not looked at.
bench-smoke: setup redis-server
	$(BIN)/python -m benchmarks.smoke

# Point cluster.yaml and the KubeRay RayJob at this checkout's commit (push it before `ray up`).
PINNED := cluster.yaml deploy/kuberay/rayjob.yaml deploy/kuberay/pipeline-cronjob.yaml \
	deploy/kuberay/rayservice.yaml deploy/feast/feature-server.yaml
cluster-pin:
	@git diff --quiet HEAD || { echo "commit your changes first: the clusters install a commit, not a working tree" >&2; exit 1; }
	sed -i -E "s/(vae-feast(\.git@|\/archive\/))[0-9a-f]{40}/\1$$(git rev-parse HEAD)/g" $(PINNED)
	@grep -hoE "vae-feast(\.git@|/archive/)[0-9a-f]{40}" $(PINNED) | sort -u

SOURCES := vae feast_embeddings ray_jobs feature_repo tests benchmarks
# Lines of at most 110 characters (pyproject.toml), imports in order, one formatting.
lint: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

# The documentation site (MkDocs, docs/): the configuration reference regenerated from the job configs,
# then built into site/. --strict: a broken link or anchor, or a page left out of the nav, fails.
docs: setup
	$(BIN)/python -m ray_jobs.reference > docs/configuration.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# What CI runs: the pages as committed must build without a warning (a unit test checks that the
# configuration reference is the one the configs generate).
docs-check: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir "$$(mktemp -d)"

clean:
	rm -rf $(MLFLOW_VENV) demo_output ray_results feature_repo/data benchmarks/results site
