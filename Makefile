# Two commands: `make demo` (the demo experiment → reports/demo/index.html) and `make test`.
# Both create or reuse the virtual environment .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dbkit-installed

.PHONY: demo test lint venv browser

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly 2.13.0: this machine's local CPU wheel (no CUDA downloads)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dbkit run params/demo.yaml

test: $(STAMP) browser
	$(PY) -m ruff check dbkit tests
	$(PY) -m pytest

# The browser tests (report pages, JupyterLab) need a Chromium; Debian's is installed when
# missing and the machine lets us (root). Without one they skip, saying so.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "make: no Chromium and cannot install it: the browser tests will skip"

lint: $(STAMP)
	$(PY) -m ruff check dbkit tests
