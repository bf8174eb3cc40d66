# Two commands: `make demo` and `make test`. Each installs what it needs into .venv/ first.
# `make test-official` runs the plugin's fairseq tests against the official fairseq 0.12.2
# release (Python 3.10, omegaconf 2.0, hydra-core 1.0) in a second environment, .venv-official/.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
# ve-fairseq: a cp311 wheel of fairseq 0.12 (no compile step); see README "Install".
FAIRSEQ := ve-fairseq==0.12.3
STAMP := $(VENV)/.installed
DATA ?=

# The official release: Python 3.10 (hydra-core 1.0.7 cannot be imported on 3.11), pip < 24.1
# (omegaconf 2.0.6's metadata), torch from the package index (no CPU build for cp310: the
# CUDA build, which runs on CPU), no torchaudio.
PYTHON310 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.10*/bin/python3.10) python3.10)
OFFICIAL_VENV := .venv-official
OPY := $(OFFICIAL_VENV)/bin/python
OFFICIAL_STAMP := $(OFFICIAL_VENV)/.installed
# The tests that need nothing but fairseq-train and the plugin (see tests/conftest.py).
OFFICIAL_TESTS ?= -m official

.PHONY: install demo test test-official clean

install: $(STAMP)

# --no-warn-conflicts: ve-fairseq declares torchaudio, which is left out on purpose (the
# text tasks never import it, and pip would pull a torch build of its own choosing).
$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet --no-deps $(FAIRSEQ)
	$(PY) -m pip install --quiet --no-warn-conflicts $(TORCH) -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@# `--user-dir fairseq_gradinit` from any directory: fairseq looks for a --user-dir that
	@# is not in the working directory next to its own package, where an editable install
	@# puts nothing; a link puts this checkout there (a plain `pip install .` needs none).
	ln -sfn $(CURDIR)/fairseq_gradinit $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/fairseq_gradinit
	$(PY) -m pip check 2>/dev/null | grep -viE "torchaudio|^No broken" || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo/run_demo.py $(if $(DATA),--data $(DATA))

test: $(STAMP)
	$(PY) -m pytest -q tests

$(OFFICIAL_STAMP): requirements-official.txt
	@$(PYTHON310) -c "import sys; assert sys.version_info[:2] == (3, 10)" 2>/dev/null || { echo "make test-official: needs Python 3.10 (hydra-core 1.0.7 fails on 3.11); none found as $(PYTHON310): set PYTHON310=/path/to/python3.10" >&2; exit 2; }
	test -x $(OPY) || $(PYTHON310) -m venv $(OFFICIAL_VENV)
	$(OPY) -m pip install --quiet "pip<24.1"
	$(OPY) -m pip install --quiet $(TORCH) -r requirements-official.txt
	@# Build isolation keeps torch out of fairseq's build, so its optional C++ extensions
	@# are skipped: the 0.12.2 sdist lacks one of their sources (balanced_assignment.cpp).
	$(OPY) -m pip install --quiet --no-deps fairseq==0.12.2
	touch $(OFFICIAL_STAMP)

# A plain (not editable) install of the plugin, refreshed on every run, so the tests also
# show that `--user-dir fairseq_gradinit` finds an installed copy from any directory.
test-official: $(OFFICIAL_STAMP)
	$(OPY) -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .
	$(OPY) -m pytest -q tests $(OFFICIAL_TESTS)

clean:
	rm -rf $(VENV) $(OFFICIAL_VENV) demo-work
