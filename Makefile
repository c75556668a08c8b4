# ipqd: `make test` installs everything it needs on a fresh Debian machine (as root)
# and runs the whole suite, real-kernel tests included.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PREFIX  ?= /usr/local
DEBS    := iptables nftables iproute2 iputils-ping libsystemd-dev pkg-config gcc
PYTEST_ARGS ?=

.PHONY: all test deps venv check-policy clean

all: venv

# Debian packages: only what is missing, so a warm machine pays nothing.
deps:
	@missing=""; \
	for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

check-policy: venv
	$(VENV)/bin/ipqd check etc/ipqd/policy.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
