# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install
# what they need (torch pinned to the 2.13.0 CPU build, see pyproject.toml). The demo installs
# only the core and plotting; the tests add the serving, OpenVINO and test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
CLI := $(BIN)/evit-deploy
DEMO_DIR := build/demo
BENCH_DIR := build/bench
SHAPES := evit_deploy/assets/shapes/shapes_evit_tiny.safetensors
PLAIN := evit_deploy/assets/shapes_plain_tiny/shapes_plain_tiny.safetensors
HELD_OUT := $(DEMO_DIR)/heldout
DEMO_ONNX := $(DEMO_DIR)/shapes_keep0.7.onnx
PLAIN_ONNX := $(DEMO_DIR)/shapes_plain.onnx
# Three held-out images (classes cycle with the image index: 0 red_disk, 5 blue_star, 14 blue_bar).
DEMO_IMAGES := $(HELD_OUT)/red_disk/000000.png $(HELD_OUT)/blue_star/000005.png $(HELD_OUT)/blue_bar/000014.png

.PHONY: install install-demo demo bench test clean

install-demo: $(VENV)/.installed-core
install: $(VENV)/.installed

$(VENV)/.installed-core: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[plot]"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-core
	$(PIP) -e ".[test,plot,serve,openvino]"
	touch $@

# The main job on the trained models that ship with the package (deit_tiny EViT keep 0.7, and the
# plain deit_tiny trained the same way without token reduction, on the generated shapes data):
# held-out images they never saw, both exports validated on them, EViT's speed against the plain
# ViT's, the accuracy of each with EViT's object recall per drop block, predictions with the true
# class, and the kept-token picture.
demo: install-demo
	$(CLI) dataset shapes --output $(HELD_OUT) --count 400 --seed 3 --force
	$(CLI) export --checkpoint $(SHAPES) --with-token-indices --validate-dir $(HELD_OUT) \
		--output $(DEMO_ONNX) --force
	$(CLI) export --checkpoint $(PLAIN) --validate-dir $(HELD_OUT) --output $(PLAIN_ONNX) --force
	$(CLI) bench $(DEMO_ONNX) --plain $(PLAIN_ONNX) --batch 8 --min-seconds 3 \
		--json-out $(DEMO_DIR)/bench.json --force
	$(CLI) eval $(PLAIN_ONNX) $(HELD_OUT)
	$(CLI) eval $(DEMO_ONNX) $(HELD_OUT)
	$(CLI) predict $(DEMO_ONNX) $(DEMO_IMAGES) --topk 2
	$(CLI) visualize $(DEMO_ONNX) $(DEMO_IMAGES) --output $(DEMO_DIR)/visualize --force

# The paper's model at its size: DeiT-S EViT keep 0.7 (random weights unless CHECKPOINT=path),
# export + validate, then bench against plain DeiT-S on the best backend here (ONNX Runtime
# picks TensorRT > CUDA > CPU).
bench: install-demo
	$(CLI) export --model deit_small_patch16_224 --keep-rate 0.7 \
		--output $(BENCH_DIR)/deit_small_keep0.7.onnx --force $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))
	$(CLI) bench $(BENCH_DIR)/deit_small_keep0.7.onnx --batch 1,8,64 --min-seconds 5 \
		--json-out $(BENCH_DIR)/bench.json --force

# Two pytest-xdist workers: each test file stays on one worker (tests/conftest.py's scheduler),
# exports shared between files are made once per run; `pytest` alone runs the same tests serially.
test: install
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) build .pytest_cache
