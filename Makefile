# SPDX-License-Identifier: GPL-2.0
#
# blk-snap: the two commands a newcomer needs (see README.md):
#
#   make run    build everything, boot the test VM, show change tracking work
#   make test   build everything, run the host tests and the VM tests
#
# Everything else is a step of those two. The kernel build is cached in
# $(BLKSNAP_CACHE) (default ~/.cache/blk-snap), keyed by the patches and config.

SHELL := /bin/bash
REPO := $(CURDIR)
export BLKSNAP_CACHE ?= $(HOME)/.cache/blk-snap
export PATH := /usr/lib/llvm-19/bin:$(HOME)/.cargo/bin:$(PATH)
KOUT = $(shell cat $(BLKSNAP_CACHE)/kbuild-output 2>/dev/null)

# Kbuild reads these from the environment when building the module.
unexport KBUILD_OUTPUT

.PHONY: all run test soak bench deps kernel module tools host-test vm-test check clean

all: module tools

run: all
	tests/qemu/run.sh demo

# Both test suites run even if the first fails; the target fails if either did.
test: all
	@rc=0; \
	echo "== host tests (cargo test)"; cargo test --workspace --release || rc=1; \
	echo "== VM tests (debug kernel under QEMU)"; tests/qemu/run.sh test || rc=1; \
	echo "== VM reboot test (CBT saved at shutdown, three boots)"; tests/qemu/run.sh reboot || rc=1; \
	echo "== style (checkpatch --strict, rustfmt, clippy)"; scripts/check.sh || rc=1; \
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

clean:
	-$(MAKE) -C $(KOUT) LLVM=1 M=$(REPO) clean
	cargo clean
	rm -rf results
