# Everything a fresh machine needs: `make demo` and `make test` create .venv from the lock on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/dev.txt
NO_DEPS_LOCK := requirements/no-deps.txt
PIP_TOOLS := pip-tools==7.6.2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# pip warns once per package that this machine's extra file:// indexes lack it; those lines bury real messages.
# The braces keep pip's own exit status (pipefail) while letting grep print nothing.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo test test-slow test-latest package-check docs lock lock-upgrade browser clean clean-venv

# The development and CI environment: exactly the lock, verified after installing (requirements/verify.py).
$(VENV)/.installed: pyproject.toml $(LOCK) $(NO_DEPS_LOCK) requirements/verify.py
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r $(LOCK) 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r $(NO_DEPS_LOCK) 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	$(BIN)/python requirements/verify.py $(LOCK) $(NO_DEPS_LOCK)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/pretrace demo --out runs/demo

# Headless Chromium for the report's browser test (Debian); skipped where it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) || echo "chromium not installed: browser tests will be skipped"; }

test: setup browser
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The package as a user gets it: the wheel, installed at the lock's versions into a clean venv outside the checkout,
# runs the demo and the tutorial there (CI runs this after `make test`).
package-check: setup
	rm -rf dist
	$(BIN)/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w dist . 2>&1 | $(QUIET_PIP)
	place=$$(mktemp -d) && trap 'rm -rf "$$place"' EXIT && \
	$(PYTHON) -m venv "$$place/venv" && \
	"$$place/venv/bin/pip" install -q --disable-pip-version-check -c $(LOCK) "$$(ls dist/pretrace-*.whl)[all,data]" 2>&1 | $(QUIET_PIP) && \
	"$$place/venv/bin/pip" install -q --disable-pip-version-check --no-deps -r $(NO_DEPS_LOCK) 2>&1 | $(QUIET_PIP) && \
	cp examples/tutorial.py "$$place/" && cd "$$place" && \
	venv/bin/pretrace --version && \
	venv/bin/pretrace demo --out demo && \
	PRETRACE_TUTORIAL_DIR="$$place/tutorial" venv/bin/python tutorial.py > tutorial.log && echo "tutorial: ran from the installed wheel"

# The default suite against the newest releases pyproject.toml's ranges allow (torch stays at the CPU build
# constraints.txt pins): finds dependency drift on purpose. Not run by CI; prints how the versions differ from the lock.
test-latest: browser
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[all,data,dev]' 2>&1 | $(QUIET_PIP)
	.venv-latest/bin/pip install -q --disable-pip-version-check --no-deps -r $(NO_DEPS_LOCK) 2>&1 | $(QUIET_PIP)
	.venv-latest/bin/python requirements/verify.py $(LOCK) $(NO_DEPS_LOCK) || echo "(the versions above differ from the lock)"
	.venv-latest/bin/python -m pytest -q

# The documentation site (mkdocs.yml, docs/): --strict turns a broken link, anchor or docstring into an error.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# Regenerate the lock from pyproject.toml and constraints.txt: `lock` keeps today's pins and only adds or drops
# what pyproject.toml changed; `lock-upgrade` moves every package to the newest version its range allows.
lock:
	$(MAKE) _compile COMPILE_FLAGS=
lock-upgrade:
	$(MAKE) _compile COMPILE_FLAGS=--upgrade
_compile:
	[ -x .venv-lock/bin/pip-compile ] || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q $(PIP_TOOLS) 2>&1 | $(QUIET_PIP); }
	.venv-lock/bin/pip-compile -q $(COMPILE_FLAGS) --allow-unsafe --strip-extras --no-emit-find-links --no-emit-index-url \
	  --extra retrieval --extra index --extra trainer --extra adapters --extra formats --extra data --extra docs --extra dev -c constraints.txt -o $(LOCK) pyproject.toml 2>&1 | $(QUIET_PIP)

clean:
	rm -rf runs .pytest_cache site dist

clean-venv:
	rm -rf $(VENV) .venv-latest .venv-lock
