# ipqd: `make test` installs everything it needs on a fresh Debian machine (as root)
# and runs the whole suite, real-kernel tests included.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PREFIX  ?= /usr/local
DEBS    := iptables nftables iproute2 iputils-ping libsystemd-dev pkg-config gcc \
	   systemd util-linux python3-venv python3-dev
PYTEST_ARGS ?=

.PHONY: all test run deps venv check-policy clean install uninstall fuzz soak

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

# Hostile input at full size: the hypothesis properties with FUZZ_CASES cases
# in total, then each atheris (libFuzzer) harness for FUZZ_TIME seconds.
FUZZ_CASES ?= 120000
FUZZ_TIME  ?= 60
fuzz: venv
	$(PY) -m pip install -q atheris
	FUZZ_CASES=$(FUZZ_CASES) $(PY) -m pytest -m fuzz -p no:cacheprovider -q $(PYTEST_ARGS)
	for target in decoder packet engine; do \
		$(PY) fuzz/fuzz_$$target.py -max_total_time=$(FUZZ_TIME) -print_final_stats=1 || exit 1; \
	done

# Load: mixed traffic through `ipqd run` on the example policy, with reloads
# and restarts, for DURATION seconds (default 30 minutes). Not part of `make test`.
DURATION ?= 1800
soak: venv
	$(PY) soak/run.py --duration $(DURATION)

# The main job: ipqd on the example policy, in the foreground (Ctrl-C stops it
# and removes its queue rules).
run: venv
	$(VENV)/bin/ipqd check etc/ipqd/policy.yaml
	chmod go-w etc/ipqd/policy.yaml
	$(VENV)/bin/ipqd run --policy etc/ipqd/policy.yaml --log-target stderr

check-policy: venv
	$(VENV)/bin/ipqd check etc/ipqd/policy.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# make install: a venv of its own in $(LIBDIR), over an interpreter outside
# /root so the unit's ProtectHome=yes holds (pyenv's lives under /root).
# PIP_INSTALL_FLAGS passes e.g. --no-index --find-links=DIR for offline installs.
DESTDIR           ?=
BINDIR            ?= $(PREFIX)/bin
LIBDIR            ?= $(PREFIX)/lib/ipqd
UNITDIR           ?= /etc/systemd/system
CONFDIR           ?= /etc/ipqd
INSTALL_PYTHON    ?= /usr/bin/python3
PIP_INSTALL_FLAGS ?=
ROOT_OWNED        := $(if $(filter 0,$(shell id -u)),-o root -g root,)

install:
	@case "$$(readlink -f $(INSTALL_PYTHON))" in /root/*|/home/*) \
		echo "INSTALL_PYTHON=$(INSTALL_PYTHON) lives under /root or /home:" \
		     "the unit's ProtectHome=yes would hide it"; exit 1;; esac
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q --disable-pip-version-check \
		$(PIP_INSTALL_FLAGS) .
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR)
	@# A wrapper, not the venv's console script: its path holds no DESTDIR,
	@# and -I keeps root's ipqd from importing modules from the current directory.
	printf '#!/bin/sh\nexec %s/bin/python3 -I -m ipqd.cli "$$@"\n' '$(LIBDIR)' \
		> $(DESTDIR)$(BINDIR)/ipqd
	chmod 755 $(DESTDIR)$(BINDIR)/ipqd
	sed 's|@BINDIR@|$(BINDIR)|g' systemd/ipqd.service > $(DESTDIR)$(UNITDIR)/ipqd.service
	chmod 644 $(DESTDIR)$(UNITDIR)/ipqd.service
	install -d -m 755 $(ROOT_OWNED) $(DESTDIR)$(CONFDIR)
	@# The administrator's policy is never overwritten.
	@if [ -e $(DESTDIR)$(CONFDIR)/policy.yaml ]; then \
		echo "keeping the existing $(DESTDIR)$(CONFDIR)/policy.yaml"; \
	else \
		install -m 644 $(ROOT_OWNED) etc/ipqd/policy.yaml $(DESTDIR)$(CONFDIR)/policy.yaml; \
	fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# Removes what install put, not the policy (the administrator's by then).
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/ipqd $(DESTDIR)$(UNITDIR)/ipqd.service
	rm -rf $(DESTDIR)$(LIBDIR)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# The throughput, CPU, latency, reload and memory benchmark (root; not part of
# `make test`). BENCH_ARGS="--reps 3 --quick" for a quick look; see bench/run.py.
BENCH_DEBS := libnetfilter-queue-dev gcc util-linux
BENCH_ARGS ?=
.PHONY: bench
bench: venv
	@missing=""; \
	for p in $(BENCH_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(PY) bench/run.py $(BENCH_ARGS)
