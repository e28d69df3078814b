# The two commands of README.md: `make demo` (train + sample + evaluate on a CPU) and `make test`.
# Both create the virtual environment .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/quickstart

# LPIPS needs torchvision's AlexNet/VGG weights. Offline machines (CI) find them in
# ../shared/data/torch; elsewhere torchvision downloads them into its own cache.
SHARED_TORCH := $(wildcard ../shared/data/torch)
ifneq ($(SHARED_TORCH),)
export TORCH_HOME ?= $(abspath $(SHARED_TORCH))
endif

.PHONY: install demo test

install: $(BIN)/.installed

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -e ".[test]"
	touch $@

demo: install
	$(BIN)/python train_mcvd.py --config configs/tiny.yaml --output_dir $(DEMO_DIR) --overwrite true
	$(BIN)/python eval_mcvd.py --model $(DEMO_DIR)/pipeline --samplers ddpm:1000 ddim:50 dpm++:20 \
		--num-clips 4 --samples-per-clip 2 --batch-size 8 --mnist-root bundled --out $(DEMO_DIR)/eval --update-model-card

test: install
	$(BIN)/python -m pytest -q
