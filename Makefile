# Two entry points: `make demo` (the whole job on the embedded default) and `make test` (ruff, mypy, the whole suite).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEMO_OUT ?= runs/demo

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch and torchaudio in one call: a bare `torch` pulls a different multi-GB build.
	$(BIN)/python -m pip install --quiet torch==2.9.1 torchaudio==2.9.1
	$(BIN)/python -m pip install --quiet -e '.[synth,test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kd-tune demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/ruff check kd_tune tests
	$(BIN)/mypy kd_tune
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
