# ipqd: `make test` installs everything it needs on a fresh Debian machine (as root)
# and runs the whole suite, real-kernel tests included.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PREFIX  ?= /usr/local
DEBS    := iptables nftables iproute2 iputils-ping libsystemd-dev pkg-config gcc \
	   systemd util-linux python3-venv python3-dev pandoc
PYTEST_ARGS ?=

.PHONY: all test run deps venv check-policy clean install install-files uninstall \
	fuzz soak man deb

all: venv

# Debian packages: only what is missing, so a warm machine pays nothing.
# $(call apt,PACKAGES) in a recipe installs those that are missing.
apt = missing=""; \
	for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

deps:
	@$(call apt,$(DEBS))
	@# fail2ban for tests/kernel/test_fail2ban_kernel.py, which runs a server of its
	@# own in a namespace: a fresh install's service is not left running on the host.
	@dpkg -s fail2ban >/dev/null 2>&1 || { $(call apt,fail2ban); \
		systemctl disable --now fail2ban >/dev/null 2>&1 || true; }

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
	@# ipqd refuses a policy (or its directory) that others could change.
	chmod go-w etc/ipqd etc/ipqd/policy.yaml
	$(VENV)/bin/ipqd check etc/ipqd/policy.yaml
	$(VENV)/bin/ipqd run --policy etc/ipqd/policy.yaml --log-target stderr

check-policy: venv
	$(VENV)/bin/ipqd check etc/ipqd/policy.yaml

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis

# Man pages ipqd(8) and ipqd-policy(5), from docs/*.md with pandoc, into
# MAN_BUILD (not committed). ipqd-policy(5) includes docs/policy.md whole
# (docs/manpage.lua). The date is the source's (SOURCE_DATE_EPOCH in a
# package build), so a rebuild gives the same bytes.
VERSION    = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
MAN_DATE   = $(shell date -u -d "@$${SOURCE_DATE_EPOCH:-$$(git log -1 --format=%ct 2>/dev/null || date +%s)}" +%Y-%m-%d)
MAN_BUILD ?= build/man
MANPAGES   = $(MAN_BUILD)/ipqd.8 $(MAN_BUILD)/ipqd-policy.5

man: $(MANPAGES)

$(MAN_BUILD)/%: docs/%.md docs/manpage.lua docs/policy.md pyproject.toml
	@command -v pandoc >/dev/null || { $(call apt,pandoc); }
	@mkdir -p $(MAN_BUILD)
	pandoc --standalone --from markdown-smart --to man --lua-filter docs/manpage.lua \
		--metadata footer="ipqd $(VERSION)" --metadata date="$(MAN_DATE)" --output $@ $<

# make install: a venv of its own in $(LIBDIR), over an interpreter outside
# /root so the unit's ProtectHome=yes holds (pyenv's lives under /root).
# PIP_INSTALL_FLAGS passes e.g. --no-index --find-links=DIR for offline installs.
# install-files puts the rest (command, unit, policy, man pages): the Debian
# package (debian/rules) uses it too, with its own paths and RUN_PYTHON.
DESTDIR           ?=
BINDIR            ?= $(PREFIX)/bin
LIBDIR            ?= $(PREFIX)/lib/ipqd
UNITDIR           ?= /etc/systemd/system
SYSUSERSDIR       ?= /usr/lib/sysusers.d
CONFDIR           ?= /etc/ipqd
MANDIR            ?= $(PREFIX)/share/man
INSTALL_PYTHON    ?= /usr/bin/python3
RUN_PYTHON        ?= $(LIBDIR)/bin/python3
PIP_INSTALL_FLAGS ?=
ROOT_OWNED        := $(if $(filter 0,$(shell id -u)),-o root -g root,)

install: man
	@case "$$(readlink -f $(INSTALL_PYTHON))" in /root/*|/home/*) \
		echo "INSTALL_PYTHON=$(INSTALL_PYTHON) lives under /root or /home:" \
		     "the unit's ProtectHome=yes would hide it"; exit 1;; esac
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q --disable-pip-version-check \
		$(PIP_INSTALL_FLAGS) .
	$(MAKE) --no-print-directory install-files
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

install-files: man
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(MANDIR)/man5
	@# A wrapper, not the venv's console script: its path holds no DESTDIR,
	@# and -I keeps root's ipqd from importing modules from the current directory.
	printf '#!/bin/sh\nexec %s -I -m ipqd.cli "$$@"\n' '$(RUN_PYTHON)' \
		> $(DESTDIR)$(BINDIR)/ipqd
	chmod 755 $(DESTDIR)$(BINDIR)/ipqd
	sed 's|@BINDIR@|$(BINDIR)|g' systemd/ipqd.service > $(DESTDIR)$(UNITDIR)/ipqd.service
	chmod 644 $(DESTDIR)$(UNITDIR)/ipqd.service
	@# The group the service reads a root:ipqd 0640 policy through.
	install -D -m 644 systemd/ipqd.sysusers $(DESTDIR)$(SYSUSERSDIR)/ipqd.conf
	@if [ -z "$(DESTDIR)" ] && command -v systemd-sysusers >/dev/null; then \
		systemd-sysusers $(SYSUSERSDIR)/ipqd.conf; fi
	install -m 644 $(MAN_BUILD)/ipqd.8 $(DESTDIR)$(MANDIR)/man8/ipqd.8
	install -m 644 $(MAN_BUILD)/ipqd-policy.5 $(DESTDIR)$(MANDIR)/man5/ipqd-policy.5
	install -d -m 755 $(ROOT_OWNED) $(DESTDIR)$(CONFDIR)
	@# The administrator's policy is never overwritten.
	@if [ -e $(DESTDIR)$(CONFDIR)/policy.yaml ]; then \
		echo "keeping the existing $(DESTDIR)$(CONFDIR)/policy.yaml"; \
	else \
		install -m 644 $(ROOT_OWNED) etc/ipqd/policy.yaml $(DESTDIR)$(CONFDIR)/policy.yaml; \
	fi

# Removes what install put, not the policy (the administrator's by then).
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/ipqd $(DESTDIR)$(UNITDIR)/ipqd.service $(DESTDIR)$(SYSUSERSDIR)/ipqd.conf \
		$(DESTDIR)$(MANDIR)/man8/ipqd.8 $(DESTDIR)$(MANDIR)/man5/ipqd-policy.5
	rm -rf $(DESTDIR)$(LIBDIR)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# make deb: the Debian package (debian/), built with dpkg-buildpackage from a
# copy of the tree in DEB_BUILD (what git tracks or would add: no .venv, no
# build/), so the tree gets no packaging leftovers, then checked by lintian
# (an error fails). The .deb, .changes and .buildinfo land in DIST. Only
# Debian's own packages are needed, installed here when missing.
DEB_DEBS  := dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all \
	     python3-setuptools python3-yaml python3-dpkt pandoc lintian
DEB_BUILD ?= build/deb
DIST      ?= dist

deb:
	@$(call apt,$(DEB_DEBS))
	rm -rf $(DEB_BUILD)
	mkdir -p $(DEB_BUILD)/ipqd $(DIST)
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -z --cached --others --exclude-standard \
			| tar --null --ignore-failed-read -T - -cf -; \
	else \
		tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist -cf - .; \
	fi | tar -xf - -C $(DEB_BUILD)/ipqd
	@# Debian's python3, not a pyenv or venv one from the caller's PATH.
	cd $(DEB_BUILD)/ipqd && env -u PYTHONPATH -u VIRTUAL_ENV -u PYTHONHOME \
		PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	mv $(DEB_BUILD)/ipqd_* $(DIST)/
	lintian --fail-on error $(DIST)/ipqd_$$(dpkg-parsechangelog -S Version)_*.changes
	@ls $(DIST)/ipqd_$$(dpkg-parsechangelog -S Version)_all.deb

# The throughput, CPU, latency, reload and memory benchmark (root; not part of
# `make test`). BENCH_ARGS="--reps 3 --quick" for a quick look; see bench/run.py.
BENCH_DEBS := libnetfilter-queue-dev gcc util-linux
BENCH_ARGS ?=
.PHONY: bench
bench: venv
	@$(call apt,$(BENCH_DEBS))
	$(PY) bench/run.py $(BENCH_ARGS)
