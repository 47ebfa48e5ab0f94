# The two commands: `make demo` (set up, then run the demo) and `make test` (set up, then run the tests).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BUNDLE := models/bccd-nano.bundle
BCCD := ../shared/datasets/BCCD
DEMO_OUT := demo-out
APT_PACKAGES := ffmpeg gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp \
	gir1.2-gst-rtsp-server-1.0 python3-gi systemd chromium

.PHONY: demo test test-fast bench sysdeps venv sample clean

# System packages the tests and the demo need, installed with apt-get when missing (CI runs as root).
sysdeps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# (this machine's pip config names local indexes that may be missing: drop those warnings)
	$(PY) -m pip install -q -e '.[train,dev]' 2> >(grep -v "^WARNING: Location" >&2)
	$(PY) -c "import streamd, trainer, torch, yolox, onnxruntime, av, zmq"
	touch $@

venv: $(VENV)/.installed

# The demo's input: a 30 fps 640x480 video made from the BCCD test images, 1 s per image.
$(DEMO_OUT)/bccd-test.mp4: | sysdeps
	mkdir -p $(DEMO_OUT)
	sed 's#^#file $(abspath $(BCCD))/JPEGImages/#; s#$$#.jpg\nduration 1#' $(BCCD)/ImageSets/Main/test.txt | head -n 40 > $(DEMO_OUT)/frames.txt
	ffmpeg -loglevel error -y -f concat -safe 0 -i $(DEMO_OUT)/frames.txt -vf "fps=30,scale=640:480,format=yuv420p" \
		-c:v libx264 -preset veryfast -crf 20 -frames:v 600 $@

sample: $(DEMO_OUT)/bccd-test.mp4

# The main job: streamd on the sample video with the shipped model, a ZeroMQ subscriber beside it,
# then the shipped model's BCCD test-split metrics.
demo: sysdeps venv sample
	rm -rf $(DEMO_OUT)/recordings $(DEMO_OUT)/detections
	$(VENV)/bin/streamd listen tcp://127.0.0.1:5555 --stream bccd-file --count 5 --timeout-s 60 & \
	$(VENV)/bin/streamd run configs/streamd/demo.yaml; status=$$?; wait; exit $$status
	@echo "bccd-live is paced like a camera: a result older than its max_age_ms (configs/streamd/demo.yaml) is not"
	@echo "published but counted in 'dropped' as stale; on a busy CPU, beside the file read as fast as it decodes, many are."
	@echo; echo "annotated recordings:"; ls -l $(DEMO_OUT)/recordings
	@echo "detection logs (one JSON line per frame):"; ls -l $(DEMO_OUT)/detections
	$(VENV)/bin/trainer eval $(BUNDLE) --data configs/trainer/bccd-nano.yaml --split test --out $(DEMO_OUT)/eval

test: sysdeps venv
	$(PY) -m pytest -q -p no:cacheprovider

# The quick loop while editing: everything but the tests that train or stream for long (marked slow).
test-fast: sysdeps venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: sysdeps venv sample
	$(PY) benchmarks/bench.py --json out/bench-results.json  # not the tracked benchmarks/results.json

clean:
	rm -rf $(DEMO_OUT) runs eval predictions

# On a machine with an NVIDIA GPU and PyTorch: the gpu-marked tests, then the GPU benchmark table; everything it
# found (gpu_check.json, table.txt, pytest.log, junit.xml) goes to GPU_CHECK_OUT.
.PHONY: gpu-check gpu-wheels gpu-check-offline
GPU_CHECK_OUT ?= $(CURDIR)/gpu-check-out
gpu-check: venv
	$(PY) -m pip install -q -e '.[gpu]' 2> >(grep -v "^WARNING: Location" >&2)
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

# A GPU machine without network (PyTorch already there): `make gpu-wheels` here, carry .whl/, then
# `make gpu-check-offline` there (installs the wheels into /tmp/site, no index, no dependencies; the BCCD test
# images from .gpu-data/BCCD). One command, within 8 minutes: the tests get 210 s, the timing rows 200 s.
gpu-wheels: venv
	benchmarks/gpu_wheels.sh

gpu-check-offline:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	STREAMD_BCCD_ROOT=$(CURDIR)/.gpu-data/BCCD PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)
