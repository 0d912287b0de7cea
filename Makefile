# The two commands of the README: `make quickstart` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Local package mirrors on these machines print one harmless warning per package; keep the log readable.
PIP_QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

.PHONY: install system-deps test lint quickstart bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	$(PY) -m pip install -q -e ".[dev]" $(PIP_QUIET)
	touch $@

# Debian packages the tests and the embedded default data need: espeak-ng speaks the default speech data.
SYSTEM_PACKAGES := espeak-ng
APT := $(shell command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) apt-get

system-deps:
	@missing=""; for pkg in $(SYSTEM_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(APT) update -q && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q $$missing >/dev/null; fi

install: $(VENV)/.installed system-deps

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q

# The embedded default end to end. Today: a random-weight debug LM written in the HF layout, loaded back
# and asked to continue a prompt. Training stages join as their issues land.
quickstart: install
	$(PY) -m lm.init --preset debug --out runs/quickstart/lm --seed 0
	$(PY) -m lm.generate --checkpoint runs/quickstart/lm --prompt "a small red circle" --max-new-tokens 16 --temperature 0
	@echo "quickstart: the LM core works end to end (random weights, so the text is noise)."
	@echo "quickstart: pretraining, encoders, adapters and the demo are not built yet (see the open issues)."

bench: install
	$(PY) bench/generate.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
