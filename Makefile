# The two commands a new user needs: `make demo` (the main job) and `make test` (the suite).
# Both bootstrap a local virtual environment from nothing but python3 + pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint crds bench clean cluster-bins prometheus-bin images test-cluster-images

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kubetune demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok),
# built from the Go module proxy once per machine into ~/.cache/kubetune/controlplane/<versions>/.
cluster-bins:
	bash tests/cluster/controlplane/build.sh

# A real Prometheus for the prometheus analysis provider's tests: Debian's package, installed
# once per machine when the binary is missing (apt-get, as root or through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus-bin:
	@command -v prometheus >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# The trainer, server and operator images, built from their Dockerfiles with daemonless podman
# on a local Debian base (apt-get installs podman, runc and debootstrap when missing); layers,
# the base image and a wheelhouse of the dependencies are cached per machine (docs/images.md).
images: $(STAMP)
	nice -n 10 $(PY) -m tests.images.build

test: lint cluster-bins prometheus-bin images
	$(VENV)/bin/kubetune crds --check
	$(VENV)/bin/kubetune docs --check
	$(PY) -m pytest -q -p no:cacheprovider

# The cluster tier's two stories with every pod in kubetune's images (the node runner's
# container mode), not part of `make test`: 8 min idle, about 30 min loaded, on 2 cores (docs/testing.md).
test-cluster-images: cluster-bins images
	KUBETUNE_CLUSTER_IMAGES=1 $(PY) -m pytest -q -p no:cacheprovider \
		tests/cluster/test_finetunejob.py tests/cluster/test_modeldeployment.py

crds: $(STAMP)
	$(VENV)/bin/kubetune crds
	$(VENV)/bin/kubetune docs

clean:
	rm -rf $(VENV) .kubetune
