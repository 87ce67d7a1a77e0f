#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Style checks: checkpatch.pl --strict on the kernel patch series, rustfmt and
# clippy on the module (with the kernel's rules) and on the userspace crates.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blk-snap}
KOUT=$(cat "$CACHE/kbuild-output")
SRC=$(readlink -f "$KOUT/source")
export PATH="/usr/lib/llvm-19/bin:$HOME/.cargo/bin:$PATH"
rc=0
step() { echo "check: $*"; }
fail() { echo "check: FAILED: $*"; rc=1; }

step "checkpatch.pl --strict on blk_filter/"
while read -r p; do
	case "$p" in '#'* | '') continue ;; esac
	out=$(cd "$SRC" && scripts/checkpatch.pl --strict --quiet "$REPO/blk_filter/$p" 2>&1)
	[ -z "$out" ] || { echo "$out"; fail "checkpatch: $p"; }
done <"$REPO/blk_filter/series"

step "rustfmt on the kernel module"
rustfmt --edition 2021 --config-path "$SRC/.rustfmt.toml" --check \
	"$REPO"/blk_snap/*.rs "$REPO"/blk_snap/logic/*.rs || fail "rustfmt (module)"

step "clippy on the kernel module (make CLIPPY=1)"
make -s -C "$KOUT" LLVM=1 M="$REPO" clean
out=$(make -C "$KOUT" LLVM=1 M="$REPO" CLIPPY=1 modules 2>&1)
echo "$out" | grep -E '^(warning|error)' && { echo "$out" | tail -40; fail "clippy (module)"; }

step "cargo fmt and clippy on the userspace crates"
cargo fmt --all --check || fail "cargo fmt"
cargo clippy --workspace --all-targets --quiet -- -D warnings || fail "cargo clippy"

[ $rc = 0 ] && step "all clean"
exit $rc
