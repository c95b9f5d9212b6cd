# Promptline — verbs. `make run` and `make test` install what is missing into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/promptline/v1/*.proto)
GEN    := promptline/v1/.generated

.PHONY: run test protos lint bench k8s-validate clean drills soak

# REDIS=cluster (3 masters + 3 replicas) or REDIS=sentinel (master, replica, 3 sentinels): a local
# topology on free ports instead of the single embedded Redis; REDIS=standalone forces that one.
run: $(STAMP) $(GEN)
	PROMPTLINE_DEV_REDIS='$(REDIS)' $(PY) -m promptline.devtools.launcher

test: $(STAMP) $(GEN)
	$(PY) -m pytest $(PYTEST_ARGS)

# Fault drills on a real local deployment (~8 min; docs/drills.md): one row per drill, a report
# in bench/results/drills-*/, exit 1 when one fails. DRILLS_ARGS="--only redis-kill --smoke".
drills: $(STAMP) $(GEN)
	$(PY) -m promptline.devtools.drills $(DRILLS_ARGS)

# 15 minutes of mixed load; memory, fds, threads and asyncio tasks of each service sampled every
# 10 s must grow less than 5 % after the warm-up. Table and plot in bench/results/soak-*/.
soak: $(STAMP) $(GEN)
	$(PY) -m promptline.devtools.drills.soak $(SOAK_ARGS)

protos: $(GEN)

# ruff, then mypy (strict on promptline/ and services/; settings in pyproject.toml).
lint: $(STAMP) $(GEN)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Render k8s/ (base and overlays) with `kubectl kustomize`, validate against pinned Kubernetes
# schemas, check the config.
k8s-validate: $(STAMP)
	$(PY) -m pytest tests/test_k8s.py -q

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Generated code lives in promptline/v1 (git-ignored); nobody edits it.
$(GEN): $(PROTOS) $(STAMP)
	rm -rf promptline/v1
	mkdir -p promptline/v1
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch promptline/v1/__init__.py
	touch $@

clean:
	rm -rf $(VENV) promptline/v1 .pytest_cache

# Measurements (not part of `make test`); reports in bench/results/.
.PHONY: bench-baseline bench-compare bench-floor bench-provider bench-ab bench-quotas
LITELLM_VENV := .venv-litellm
PORTKEY_DIR  := bench/portkey
PORTKEY_START := $(PORTKEY_DIR)/node_modules/@portkey-ai/gateway/build/start-server.js
BENCH_REF    ?=
BASELINE     := bench/baseline.json

# The load generator (bench/run.py, ~45 s), compared with the committed $(BASELINE): fails when
# a figure is worse beyond the tolerance (BENCH_ARGS="--tolerance 0.5" widens it).
bench: $(STAMP) $(GEN)
	$(PY) -m bench.run --quick --resume-off --baseline $(BASELINE) $(BENCH_ARGS)

# The same run, written to $(BASELINE) as the new baseline (commit it).
bench-baseline: $(STAMP) $(GEN)
	$(PY) -m bench.run --quick --baseline $(BASELINE) --update-baseline $(BENCH_ARGS)

# One-time experiments (bench/experiments/): the floor under the chain, bare grpc.aio servers
# and relays next to our hops; and the engine's OpenAI-compatible provider through llm_engine
# alone (BENCH_ARGS="--root <other checkout>" measures another commit against the same upstream).
bench-floor: $(STAMP) $(GEN)
	$(PY) -m bench.experiments.floor

bench-provider: $(STAMP) $(GEN)
	$(PY) -m bench.experiments.provider $(BENCH_ARGS)

# C=1 time to first token, this checkout against BENCH_ARGS="--root <checkout>", interleaved.
bench-ab: $(STAMP) $(GEN)
	$(PY) -m bench.ab $(BENCH_ARGS)

# The full loads (`bench.run` without --quick) with chunk shaping at its default and off, plus
# the LiteLLM proxy (in its own venv) and the Portkey gateway (npm, pinned in bench/portkey/,
# run with node on 127.0.0.1), pointed at the same upstream; our figures as ratios to each
# peer's. BENCH_REF=<commit> also runs that commit's services (e.g. the one before chunk
# shaping) in the same run, the reference of "without shaping, no regression".
bench-compare: $(STAMP) $(GEN) $(PORTKEY_START)
	@test -x $(LITELLM_VENV)/bin/litellm || { $(PYTHON) -m venv $(LITELLM_VENV) && \
	  $(LITELLM_VENV)/bin/pip install --quiet --disable-pip-version-check 'litellm[proxy]'; } || \
	  { echo "bench-compare: could not install litellm[proxy] into $(LITELLM_VENV)" >&2; exit 1; }
	$(PY) -m bench.run --litellm $(LITELLM_VENV)/bin/litellm --portkey $(PORTKEY_DIR) --unshaped \
	  $(if $(BENCH_REF),--ref $(BENCH_REF)) $(BENCH_ARGS)

# The Portkey gateway as bench/portkey/package-lock.json pins it (its postinstall only runs
# patch-package, which has no patches to apply in the published package).
$(PORTKEY_START): $(PORTKEY_DIR)/package-lock.json
	npm ci --prefix $(PORTKEY_DIR) --ignore-scripts --no-audit --no-fund || \
	  { echo "bench-compare: could not install the Portkey gateway (npm ci)" >&2; exit 1; }
	touch $@

# Quota admissions per second on one Redis and on a 3-master cluster (bench/experiments/).
bench-quotas: $(STAMP) $(GEN)
	$(PY) -m bench.experiments.quota_shards $(BENCH_ARGS)
