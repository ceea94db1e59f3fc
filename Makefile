# Two commands on a fresh machine:
#   make demo   — virtualenv, install, a generated district, its first sync, the Dagster UI on 127.0.0.1:3000
#   make test   — virtualenv, install, system test dependencies (sshd, Chromium), the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := $(CURDIR)/.capti
export CAPTI_DATA_DIR ?= $(DATA)
export DAGSTER_HOME ?= $(DATA)/dagster_home
DEMO_STUDENTS ?= 2000
PORT ?= 3000

.PHONY: install demo ui daemon test test-fast lint bench clean system-deps

$(BIN)/capti-sync: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/capti-sync

demo: install
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml || true
	$(BIN)/capti-sync demo-data --out $(DATA)/drop/demo-district --students $(DEMO_STUDENTS)
	$(BIN)/capti-sync district add demo-district --source $(DATA)/drop/demo-district --name "Demo Unified School District"
	$(BIN)/capti-sync run demo-district
	$(BIN)/capti-sync status demo-district
	@echo "Dagster UI: http://127.0.0.1:$(PORT)  (webserver + daemon; Ctrl-C stops both)"
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(BIN)/dg dev --host 127.0.0.1 --port $(PORT)

ui: install
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(BIN)/dg dev --host 127.0.0.1 --port $(PORT)

system-deps:
	bash .ci/system-deps.sh

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2 --timeout 600

test-fast: install
	$(BIN)/pytest -n 2 -m "not slow and not browser"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m capti_pipeline.bench --students 10000 100000

clean:
	rm -rf $(DATA)
