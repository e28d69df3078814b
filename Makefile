# The two commands of README.md: `make demo` (train + sample on a CPU) and `make test`.
# Both create the virtual environment .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/quickstart

.PHONY: install demo test

install: $(BIN)/.installed

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -e ".[test]"
	touch $@

demo: install
	$(BIN)/python train_mcvd.py --config configs/tiny.yaml --output_dir $(DEMO_DIR) --overwrite true
	$(BIN)/python eval_mcvd.py --model $(DEMO_DIR)/pipeline --samplers ddpm:1000 ddim:50 --num-clips 4 \
		--mnist-root bundled --out $(DEMO_DIR)/samples

test: install
	$(BIN)/python -m pytest -q
