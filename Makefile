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

# The embedded default end to end: the default text corpus and synthetic media (made offline), CLIP and BEST-RQ
# pretraining of the tiny encoders on 2 ranks, then a random-weight debug LM loaded back to generate. Each stage
# is skipped when its output exists, so a rerun resumes. LM pretraining, adapters and the demo join as they land.
TORCHRUN := $(VENV)/bin/torchrun --nproc-per-node 2
quickstart: install
	test -f runs/data/text/general/manifest.json || $(PY) -m data.default --out runs/data/text
	$(PY) -m data.synthetic all --out runs/data/media
	test -f runs/encoder/vision_tiny/final/encoder/model.safetensors || \
	  $(TORCHRUN) train/encoder.py --modality vision --config configs/encoder/vision_tiny.toml
	test -f runs/encoder/speech_tiny/final/encoder/model.safetensors || \
	  $(TORCHRUN) train/encoder.py --modality speech --config configs/encoder/speech_tiny.toml
	$(PY) -m train.plot runs/encoder/vision_tiny
	$(PY) -m train.plot runs/encoder/speech_tiny
	test -f runs/quickstart/lm/config.json || $(PY) -m lm.init --preset debug --out runs/quickstart/lm --seed 0
	$(PY) -m lm.generate --checkpoint runs/quickstart/lm --prompt "a small red circle" --max-new-tokens 16 --temperature 0
	@echo "quickstart: encoders pretrained (runs/encoder/*/metrics.jsonl, curves.png); the LM has random weights."
	@echo "quickstart: LM pretraining, adapters and the demo are not built yet (see the open issues)."

bench: install
	$(PY) bench/generate.py
	$(PY) bench/data.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
