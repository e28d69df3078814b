# The two commands of README.md: `make demo` (predict and evaluate with the shipped model on a CPU) and
# `make test`; `make train-demo` trains a small model of your own. All create the virtual environment
# .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= checkpoints/mmnist-5to10
GENERAL_MODEL ?= checkpoints/mmnist-general
DEMO_DIR ?= runs/demo
TASKS_DEMO_DIR ?= runs/demo-tasks
TRAIN_DEMO_DIR ?= runs/quickstart

# LPIPS needs torchvision's AlexNet/VGG weights. Offline machines (CI) find them in
# ../shared/data/torch; elsewhere torchvision downloads them into its own cache.
SHARED_TORCH := $(wildcard ../shared/data/torch)
ifneq ($(SHARED_TORCH),)
export TORCH_HOME ?= $(abspath $(SHARED_TORCH))
endif

.PHONY: install demo demo-tasks train-demo test

install: $(BIN)/.installed

# TORCH_INDEX: a wheel index to take torch and torchvision from first, e.g. PyTorch's CPU-only wheels
# (make install TORCH_INDEX=https://download.pytorch.org/whl/cpu): without it pip takes PyPI's CUDA build.
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --progress-bar off torch torchvision --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --progress-bar off -e ".[test]"
	touch $@

# The shipped model predicts 16 clips of the bundled MNIST test digits (one sample each) with the
# sampler it ships with, next to copy-last-frame: the table, predictions.gif and report.html.
demo: install
	$(BIN)/python eval_mcvd.py --model $(MODEL) --samplers shipped --num_clips 16 --samples_per_clip 1 --batch_size 16 --mnist_root bundled --out $(DEMO_DIR)

# The general model's three tasks on 16 bundled test clips each: prediction and interpolation beside their
# baselines (the shipped sampler), unconditional generation (DDIM-20 per block: from nothing, digits need
# more steps than prediction does) beside real clips and noise; a table and a GIF per task.
demo-tasks: install
	$(BIN)/python eval_mcvd.py --model $(GENERAL_MODEL) --task predict --samplers shipped --num_clips 16 --samples_per_clip 1 --batch_size 16 --mnist_root bundled --out $(TASKS_DEMO_DIR)/predict
	$(BIN)/python eval_mcvd.py --model $(GENERAL_MODEL) --task interpolate --samplers shipped --num_clips 16 --samples_per_clip 1 --batch_size 16 --mnist_root bundled --out $(TASKS_DEMO_DIR)/interpolate
	$(BIN)/python eval_mcvd.py --model $(GENERAL_MODEL) --task generate --samplers ddim:20 --num_clips 16 --batch_size 16 --mnist_root bundled --out $(TASKS_DEMO_DIR)/generate

train-demo: install
	$(BIN)/python train_mcvd.py --config configs/quickstart.yaml --output_dir $(TRAIN_DEMO_DIR) --overwrite true
	$(BIN)/python eval_mcvd.py --model $(TRAIN_DEMO_DIR)/pipeline --samplers shipped \
		--num_clips 64 --samples_per_clip 2 --batch_size 32 --mnist_root bundled --out $(TRAIN_DEMO_DIR)/eval --update_model_card

test: install
	$(BIN)/python -m pytest
