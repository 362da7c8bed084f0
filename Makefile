# dicom-node: `make run` starts the node on the embedded default; `make test` runs the tests.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# Real peers used by the tests (Debian package names).
DEBS    := dcmtk orthanc orthanc-dicomweb dicom3tools chromium chromium-driver
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install debs viewer run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@# npm (for the viewer) only where no npm exists: a Node.js from elsewhere (NodeSource) brings its
	@# own and conflicts with Debian's package; without npm the viewer is skipped, not the tests.
	@command -v npm >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends npm \
	  || echo "npm could not be installed: the OHIF viewer will not be (its tests skip)"

# The OHIF viewer served under /viewer/ (@ohif/app, pinned, sha512-checked; needs npm). Without npm
# it prints why and the node answers 503 on /viewer; the viewer tests skip.
viewer: install
	-$(PY) -m dicom_node.web.viewer_install

run: install viewer
	$(VENV)/bin/dicom-node serve --config config.toml

test: install debs viewer
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install debs
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_predict.py

clean:
	rm -rf $(VENV) var .pytest_cache dicom_node/web/viewer_dist
