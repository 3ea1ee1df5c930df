# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# what they need (torch pinned to the 2.13.0 CPU build, see pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := build/demo

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,plot,serve,openvino]"
	touch $(STAMP)

# The main job on the embedded default (DeiT-S EViT keep 0.7; random weights unless
# CHECKPOINT=path is given): export + validate, then bench against plain DeiT-S on the best
# backend this machine has (ONNX Runtime picks TensorRT > CUDA > CPU).
demo: install
	$(BIN)/evit-deploy export --model deit_small_patch16_224 --keep-rate 0.7 \
		--output $(DEMO_DIR)/deit_small_keep0.7.onnx --force $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))
	$(BIN)/evit-deploy bench $(DEMO_DIR)/deit_small_keep0.7.onnx --batch 1,8,64 --min-seconds 5 \
		--json-out $(DEMO_DIR)/bench.json --force

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build .pytest_cache
