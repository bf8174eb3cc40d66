# Two commands: `make demo` and `make test`. Each installs what it needs into .venv/ first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# ve-fairseq: a cp311 wheel of fairseq 0.12 (no compile step); see README "Install".
FAIRSEQ := ve-fairseq==0.12.3
STAMP := $(VENV)/.installed
DATA ?=

.PHONY: install demo test clean

install: $(STAMP)

# --no-warn-conflicts: ve-fairseq declares torchaudio, which is left out on purpose (the
# text tasks never import it, and pip would pull a torch build of its own choosing).
$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet --no-deps $(FAIRSEQ)
	$(PY) -m pip install --quiet --no-warn-conflicts $(TORCH) -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check 2>/dev/null | grep -viE "torchaudio|^No broken" || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo/run_demo.py $(if $(DATA),--data $(DATA))

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo-work
