# SPDX-License-Identifier: GPL-2.0
#
# blk-snap: the two commands a newcomer needs (see README.md):
#
#   make run    build everything, boot the test VM, show change tracking work
#   make test   build everything, run the host tests and the VM tests
#
# and to install (see README.md "Install"):
#
#   make install        blksnapctl, man pages, completions, dist/ files (and
#                       the example hooks in $(DATADIR)/blksnap/hooks.d)
#   make install-dkms   the module's source for DKMS, in /usr/src
#
# Everything else is a step of those. The kernel build is cached in
# $(BLKSNAP_CACHE) (default ~/.cache/blk-snap), keyed by the patches and config.

SHELL := /bin/bash
REPO := $(CURDIR)
export BLKSNAP_CACHE ?= $(HOME)/.cache/blk-snap
export PATH := /usr/lib/llvm-19/bin:$(HOME)/.cargo/bin:$(PATH)
KOUT = $(shell cat $(BLKSNAP_CACHE)/kbuild-output 2>/dev/null)

# Kbuild reads these from the environment when building the module.
unexport KBUILD_OUTPUT

.PHONY: all run test soak bench deps kernel module tools host-test vm-test check clean
.PHONY: install uninstall install-dkms uninstall-dkms dkms-check intree

all: module tools

run: all
	tests/qemu/run.sh demo

# Both test suites run even if the first fails; the target fails if either did.
test: all
	@rc=0; \
	echo "== host tests (cargo test)"; cargo test --workspace --release || rc=1; \
	echo "== VM tests (debug kernel under QEMU)"; tests/qemu/run.sh test || rc=1; \
	echo "== VM reboot test (CBT saved at shutdown, three boots)"; tests/qemu/run.sh reboot || rc=1; \
	echo "== VM root disk test (initramfs-tools hook, a Debian system on a virtio disk)"; tests/qemu/run.sh rootdisk || rc=1; \
	echo "== style (checkpatch --strict, rustfmt, clippy)"; scripts/check.sh || rc=1; \
	echo "== packaging (make install, DKMS tree and check)"; scripts/test-packaging.sh || rc=1; \
	echo "== in-tree module build (Kconfig path)"; scripts/intree.sh || rc=1; \
	if [ $$rc = 0 ]; then echo "== all tests passed"; else echo "== TESTS FAILED"; fi; \
	exit $$rc

# Not part of `make test`: the fuzzer (1,000,000 calls), the stress test
# (10 minutes) and the fault injection runs, longer (see README.md).
soak: all
	tests/qemu/run.sh soak

# A benchmark, not a test: ratios to the raw device and to dm-snapshot, from
# one VM run on the bench kernel (no debug options), with the module built
# against that kernel in target/bench-module.
BENCH_MOD := $(REPO)/target/bench-module
bench: tools
	@scripts/kernel.sh bench >/dev/null
	@rm -rf $(BENCH_MOD) && mkdir -p $(BENCH_MOD)/blk_snap/logic
	@cp Kbuild $(BENCH_MOD)/ && cp blk_snap/Kbuild blk_snap/*.rs $(BENCH_MOD)/blk_snap/ && \
		cp blk_snap/logic/*.rs $(BENCH_MOD)/blk_snap/logic/
	$(MAKE) -C $$(cat $(BLKSNAP_CACHE)/kbuild-output-bench) LLVM=1 M=$(BENCH_MOD) modules
	BLKSNAP_FLAVOUR=bench tests/qemu/run.sh bench

deps:
	@scripts/deps.sh

kernel: deps
	@scripts/kernel.sh >/dev/null

module: kernel
	$(MAKE) -C $(KOUT) LLVM=1 M=$(REPO) modules

tools: deps
	cargo build --release --workspace --bins
	@mkdir -p target/compat32
	gcc -m32 -static -O2 -Wall -Wextra -Werror -I include/uapi \
		-o target/compat32/client32 tests/compat32/client.c

host-test: deps
	cargo test --workspace --release

vm-test: module tools
	tests/qemu/run.sh test

# Style: checkpatch --strict on the kernel patches, rustfmt and clippy on all
# Rust code (the module with the kernel's own rules).
check: kernel
	scripts/check.sh

# The module built the in-tree way (README.md "On your own kernel") against
# the cached kernel, which it leaves untouched. Part of `make test`.
intree: kernel
	scripts/intree.sh

# Installing. `install` needs only the tools (no kernel); the paths can be
# changed as usual (make install PREFIX=/usr DESTDIR=...). The units and the
# rule run $(SBINDIR)/blksnapctl. systemd-shutdown reads its hooks from
# /usr/lib/systemd/system-shutdown only, whatever the prefix; so do
# initramfs-tools (/usr/share/initramfs-tools) and dracut
# (/usr/lib/dracut/modules.d) with theirs.
VERSION := $(shell sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
PREFIX ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin
MANDIR ?= $(PREFIX)/share/man
DATADIR ?= $(PREFIX)/share
SYSCONFDIR ?= /etc
UDEVRULESDIR ?= $(PREFIX)/lib/udev/rules.d
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
SHUTDOWNDIR ?= /usr/lib/systemd/system-shutdown
INITRAMFSDIR ?= /usr/share/initramfs-tools
DRACUTDIR ?= /usr/lib/dracut/modules.d
DKMSDIR ?= /usr/src/blksnap-$(VERSION)
GEN := $(REPO)/target/install
CTL := $(REPO)/target/release/blksnapctl

install: tools
	@rm -rf $(GEN) && mkdir -p $(GEN)/man $(GEN)/dist
	$(CTL) generate man $(GEN)/man
	$(CTL) generate completions bash >$(GEN)/blksnapctl.bash
	$(CTL) generate completions zsh >$(GEN)/_blksnapctl
	$(CTL) generate completions fish >$(GEN)/blksnapctl.fish
	for f in udev/60-blksnap-cbt.rules systemd/blksnap-cbt.service systemd/blksnap-cbt.shutdown \
		initramfs-tools/hooks/blksnap initramfs-tools/scripts/init-premount/blksnap \
		dracut/90blksnap/module-setup.sh dracut/90blksnap/blksnap-cbt.sh; do \
		mkdir -p $(GEN)/dist/$$(dirname $$f) && \
		sed 's|/usr/sbin/blksnapctl|$(SBINDIR)/blksnapctl|g' dist/$$f >$(GEN)/dist/$$f || exit 1; \
	done
	install -D -m 0755 $(CTL) $(DESTDIR)$(SBINDIR)/blksnapctl
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 0644 $(GEN)/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -D -m 0644 $(GEN)/blksnapctl.bash $(DESTDIR)$(DATADIR)/bash-completion/completions/blksnapctl
	install -D -m 0644 $(GEN)/_blksnapctl $(DESTDIR)$(DATADIR)/zsh/site-functions/_blksnapctl
	install -D -m 0644 $(GEN)/blksnapctl.fish $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/blksnapctl.fish
	install -D -m 0644 $(GEN)/dist/udev/60-blksnap-cbt.rules $(DESTDIR)$(UDEVRULESDIR)/60-blksnap-cbt.rules
	install -D -m 0644 $(GEN)/dist/systemd/blksnap-cbt.service $(DESTDIR)$(SYSTEMDUNITDIR)/blksnap-cbt.service
	install -D -m 0755 $(GEN)/dist/systemd/blksnap-cbt.shutdown $(DESTDIR)$(SHUTDOWNDIR)/blksnap-cbt.shutdown
	install -D -m 0755 $(GEN)/dist/initramfs-tools/hooks/blksnap $(DESTDIR)$(INITRAMFSDIR)/hooks/blksnap
	install -D -m 0755 $(GEN)/dist/initramfs-tools/scripts/init-premount/blksnap \
		$(DESTDIR)$(INITRAMFSDIR)/scripts/init-premount/blksnap
	install -D -m 0755 $(GEN)/dist/dracut/90blksnap/module-setup.sh $(DESTDIR)$(DRACUTDIR)/90blksnap/module-setup.sh
	install -D -m 0755 $(GEN)/dist/dracut/90blksnap/blksnap-cbt.sh $(DESTDIR)$(DRACUTDIR)/90blksnap/blksnap-cbt.sh
	install -D -m 0644 dist/blksnap/cbt.conf.example $(DESTDIR)$(SYSCONFDIR)/blksnap/cbt.conf.example
	install -d $(DESTDIR)$(DATADIR)/blksnap/hooks.d
	for f in dist/blksnap/hooks.conf.example dist/hooks.d/*; do \
		sed 's|/usr/local/share/blksnap/hooks.d|$(DATADIR)/blksnap/hooks.d|g' $$f >$(GEN)/dist/$${f##*/} || exit 1; \
	done
	install -m 0644 $(GEN)/dist/hooks.conf.example $(DESTDIR)$(SYSCONFDIR)/blksnap/hooks.conf.example
	for f in dist/hooks.d/*; do \
		install -m 0755 $(GEN)/dist/$${f##*/} $(DESTDIR)$(DATADIR)/blksnap/hooks.d/ || exit 1; \
	done

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/blksnapctl \
		$(DESTDIR)$(MANDIR)/man1/blksnapctl.1 $(DESTDIR)$(MANDIR)/man1/blksnapctl-*.1 \
		$(DESTDIR)$(DATADIR)/bash-completion/completions/blksnapctl \
		$(DESTDIR)$(DATADIR)/zsh/site-functions/_blksnapctl \
		$(DESTDIR)$(DATADIR)/fish/vendor_completions.d/blksnapctl.fish \
		$(DESTDIR)$(UDEVRULESDIR)/60-blksnap-cbt.rules \
		$(DESTDIR)$(SYSTEMDUNITDIR)/blksnap-cbt.service \
		$(DESTDIR)$(SHUTDOWNDIR)/blksnap-cbt.shutdown \
		$(DESTDIR)$(INITRAMFSDIR)/hooks/blksnap \
		$(DESTDIR)$(INITRAMFSDIR)/scripts/init-premount/blksnap \
		$(DESTDIR)$(DRACUTDIR)/90blksnap/module-setup.sh \
		$(DESTDIR)$(DRACUTDIR)/90blksnap/blksnap-cbt.sh \
		$(DESTDIR)$(SYSCONFDIR)/blksnap/cbt.conf.example \
		$(DESTDIR)$(SYSCONFDIR)/blksnap/hooks.conf.example \
		$(addprefix $(DESTDIR)$(DATADIR)/blksnap/hooks.d/,$(notdir $(wildcard dist/hooks.d/*)))
	-rmdir $(DESTDIR)$(SYSCONFDIR)/blksnap $(DESTDIR)$(DRACUTDIR)/90blksnap 2>/dev/null
	-rmdir $(DESTDIR)$(DATADIR)/blksnap/hooks.d $(DESTDIR)$(DATADIR)/blksnap 2>/dev/null

# The module's source for DKMS (then: dkms add blksnap/$(VERSION); dkms
# install blksnap/$(VERSION)). Needs no kernel here: DKMS builds it.
install-dkms:
	@rm -rf $(DESTDIR)$(DKMSDIR)
	install -d $(DESTDIR)$(DKMSDIR)/blk_snap/logic $(DESTDIR)$(DKMSDIR)/scripts
	sed 's/^PACKAGE_VERSION=.*/PACKAGE_VERSION="$(VERSION)"/' dkms.conf >$(DESTDIR)$(DKMSDIR)/dkms.conf
	install -m 0644 Kbuild Kconfig $(DESTDIR)$(DKMSDIR)/
	install -m 0644 blk_snap/Kbuild blk_snap/*.rs $(DESTDIR)$(DKMSDIR)/blk_snap/
	install -m 0644 blk_snap/logic/*.rs $(DESTDIR)$(DKMSDIR)/blk_snap/logic/
	install -m 0755 scripts/dkms-check.sh $(DESTDIR)$(DKMSDIR)/scripts/

uninstall-dkms:
	rm -rf $(DESTDIR)$(DKMSDIR)

# Can the module be built against KDIR (default: the cached kernel)?
dkms-check:
	scripts/dkms-check.sh $(or $(KDIR),$(KOUT))

clean:
	-$(MAKE) -C $(KOUT) LLVM=1 M=$(REPO) clean
	cargo clean
	rm -rf results
