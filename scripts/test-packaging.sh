#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Tests of the packaging, on the host, in seconds (part of `make test`):
#
#   - scripts/dkms-check.sh passes on the cached kernel build and fails, with
#     its message, on the pristine source tree (no patch series, no .config)
#     and on a Rust kernel without the series, and when the rustc in PATH
#     is not the kernel's;
#   - make install DESTDIR=...: every file is there and not empty, the man
#     pages render, the completions and the shutdown hook parse, the units
#     run the installed blksnapctl, no ordering cycle runs through the
#     units (scripts/unit-order.py); the example hooks (application-
#     consistent snapshots) are executable, pass sh -n and shellcheck, and
#     name their installed place; make uninstall removes all of it;
#   - make install-dkms DESTDIR=...: dkms add and dkms build of that tree
#     (DKMS and source trees under /tmp) give blksnap.ko for the cached
#     kernel, and fail with dkms-check.sh's message on the pristine tree.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blk-snap}
export PATH="/usr/lib/llvm-19/bin:$HOME/.cargo/bin:$PATH"
KOUT=$(cat "$CACHE/kbuild-output")
KVER=$(cat "$KOUT/include/config/kernel.release")
# scripts/kernel.sh keeps the unpatched tree beside the patched one.
PRISTINE=$(readlink -f "$KOUT/source").orig
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml")
PREFIX=/usr/local
tmp=$(mktemp -d /tmp/blksnap-packaging.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0
ok() {
	echo "packaging: ok: $*"
	passed=$((passed + 1))
}
bad() {
	echo "packaging: FAILED: $*"
	failed=$((failed + 1))
}
# expect_fail WHAT PATTERN CMD...: CMD fails and prints PATTERN.
expect_fail() {
	local what=$1 pattern=$2 out
	shift 2
	if out=$("$@" 2>&1); then
		bad "$what: succeeded"
	elif ! grep -qF -- "$pattern" <<<"$out"; then
		echo "$out" | tail -20
		bad "$what: no '$pattern' in its output"
	else
		ok "$what: $(grep -F -- "$pattern" <<<"$out" | head -1)"
	fi
}

# --- dkms.conf and dkms-check.sh
conf_version=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"$/\1/p' "$REPO/dkms.conf")
if [ "$conf_version" = "$VERSION" ]; then
	ok "dkms.conf PACKAGE_VERSION $conf_version is the workspace version"
else
	bad "dkms.conf PACKAGE_VERSION $conf_version, Cargo.toml $VERSION"
fi
if out=$("$REPO/scripts/dkms-check.sh" "$KOUT" 2>&1) && [ -z "$out" ]; then
	ok "dkms-check.sh passes on $KOUT ($KVER)"
else
	echo "$out"
	bad "dkms-check.sh on $KOUT"
fi
msg="lacks the blk-filter patch series or CONFIG_RUST"
expect_fail "dkms-check.sh on the pristine tree" \
	"$msg (CONFIG_RUST not set; no include/linux/blk-filter.h)" \
	"$REPO/scripts/dkms-check.sh" "$PRISTINE"
mkdir -p "$tmp/rust-kernel/include/config"
echo CONFIG_RUST=y >"$tmp/rust-kernel/.config"
echo 6.12.0-rust >"$tmp/rust-kernel/include/config/kernel.release"
expect_fail "dkms-check.sh on a Rust kernel without the series" \
	"kernel 6.12.0-rust $msg (no include/linux/blk-filter.h; no rust/libkernel.rmeta" \
	"$REPO/scripts/dkms-check.sh" "$tmp/rust-kernel"
mkdir -p "$tmp/bin"
printf '#!/bin/sh\necho "rustc 1.0.0 (other)"\n' >"$tmp/bin/rustc"
chmod +x "$tmp/bin/rustc"
expect_fail "dkms-check.sh with another rustc first in PATH" \
	"blksnap: kernel $KVER was built by other compilers than those in PATH (rustc: rustc 1.0.0 (other)" \
	env PATH="$tmp/bin:$PATH" "$REPO/scripts/dkms-check.sh" "$KOUT"

# dracut (Fedora, RHEL, SUSE) cannot be boot-tested here (the root disk
# test boots initramfs-tools); its module installed in DESTDIR is checked by
# a real dracut run instead: in a mount namespace where /etc (a copy, with
# a cbt.conf), /usr/local/sbin and dracut's modules.d (copies, with the
# installed files) are bind-mounted over the host's, `dracut -m blksnap`
# builds an initramfs for the cached kernel (its module tree: blksnap.ko
# and the lists), and lsinitrd must show blksnapctl, the configuration, the
# module, the rule (with its TEST of the control device) and the pre-mount
# hook.
dracut_check() { # DESTDIR
	local destdir=$1 d=$tmp/dracut out want missing=0
	if ! command -v dracut >/dev/null || ! command -v lsinitrd >/dev/null; then
		bad "dracut is not installed (scripts/deps.sh installs dracut-core)"
		return
	fi
	if [ ! -f "$REPO/blk_snap/blksnap.ko" ]; then
		bad "dracut check: no blk_snap/blksnap.ko (make module)"
		return
	fi
	local kmod=$d/root/lib/modules/$KVER
	rm -rf "$d" && mkdir -p "$d/sbin" "$kmod/extra"
	cp -a /etc "$d/etc"
	install -D -m 0644 "$REPO/dist/blksnap/cbt.conf.example" "$d/etc/blksnap/cbt.conf"
	cp -a /usr/lib/dracut/modules.d "$d/modules.d"
	cp -a "$destdir/usr/lib/dracut/modules.d/90blksnap" "$d/modules.d/"
	cp -a /usr/local/sbin/. "$d/sbin/" 2>/dev/null || true
	cp "$destdir$PREFIX/sbin/blksnapctl" "$d/sbin/"
	cp "$REPO/blk_snap/blksnap.ko" "$kmod/extra/"
	cp "$KOUT/modules.builtin" "$KOUT/modules.builtin.modinfo" "$KOUT/modules.order" "$kmod/"
	depmod -b "$d/root" "$KVER"
	# shellcheck disable=SC2016 # expanded by the inner shell
	if unshare -m --propagation private bash -euc '
		d=$1 kver=$2 prefix=$3
		mount --bind "$d/etc" /etc
		mount --bind "$d/modules.d" /usr/lib/dracut/modules.d
		mount --bind "$d/sbin" "$prefix/sbin"
		dracut --quiet --no-hostonly --kver "$kver" --kmoddir "$d/root/lib/modules/$kver" -m blksnap \
			--tmpdir "$d" --force "$d/initrd.img"
	' - "$d" "$KVER" "$PREFIX" >"$d/dracut.log" 2>&1 &&
		lsinitrd "$d/initrd.img" >"$d/lsinitrd.txt" 2>&1; then
		for want in "${PREFIX#/}/sbin/blksnapctl" etc/blksnap/cbt.conf "extra/blksnap.ko" \
			etc/udev/rules.d/60-blksnap-cbt.rules "hooks/pre-mount/10-blksnap-cbt.sh"; do
			grep -q -- "$want" "$d/lsinitrd.txt" || {
				bad "dracut -m blksnap: no $want in the initramfs"
				missing=1
			}
		done
		out=$(lsinitrd -f etc/udev/rules.d/60-blksnap-cbt.rules "$d/initrd.img")
		if ! grep -q "TEST==\"/dev/blksnap-control\", RUN+=\"$PREFIX/sbin/blksnapctl cbt boot --device \$devnode\"" <<<"$out"; then
			echo "$out"
			bad "dracut -m blksnap: the rule in the initramfs"
			missing=1
		fi
		[ $missing = 1 ] || ok "dracut -m blksnap (kernel $KVER): the initramfs has blksnapctl, cbt.conf, blksnap.ko, the rule and the pre-mount hook"
	else
		tail -20 "$d/dracut.log" "$d/lsinitrd.txt" 2>/dev/null || true
		bad "dracut -m blksnap --kver $KVER"
	fi
}

# --- make install / uninstall
root=$tmp/root
if ! make -s -C "$REPO" install DESTDIR="$root" PREFIX=$PREFIX >"$tmp/install.log" 2>&1; then
	tail -20 "$tmp/install.log"
	bad "make install"
else
	ok "make install DESTDIR=$root"
	files=(
		"$PREFIX/sbin/blksnapctl"
		"$PREFIX/share/man/man1/blksnapctl.1"
		"$PREFIX/share/man/man1/blksnapctl-cbt-boot.1"
		"$PREFIX/share/bash-completion/completions/blksnapctl"
		"$PREFIX/share/zsh/site-functions/_blksnapctl"
		"$PREFIX/share/fish/vendor_completions.d/blksnapctl.fish"
		"$PREFIX/lib/udev/rules.d/60-blksnap-cbt.rules"
		"$PREFIX/lib/systemd/system/blksnap-cbt.service"
		/usr/lib/systemd/system-shutdown/blksnap-cbt.shutdown
		/usr/share/initramfs-tools/hooks/blksnap
		/usr/share/initramfs-tools/scripts/init-premount/blksnap
		/usr/lib/dracut/modules.d/90blksnap/module-setup.sh
		/usr/lib/dracut/modules.d/90blksnap/blksnap-cbt.sh
		/etc/blksnap/cbt.conf.example
		/etc/blksnap/hooks.conf.example
		"$PREFIX/share/blksnap/hooks.d/50-postgresql"
		"$PREFIX/share/blksnap/hooks.d/50-sqlite"
	)
	missing=0
	for f in "${files[@]}"; do
		[ -s "$root$f" ] || {
			bad "installed $f: missing or empty"
			missing=1
		}
	done
	[ $missing = 1 ] || ok "installed ${#files[@]} files, none empty"
	for f in "$PREFIX/sbin/blksnapctl" /usr/lib/systemd/system-shutdown/blksnap-cbt.shutdown \
		/usr/share/initramfs-tools/hooks/blksnap /usr/share/initramfs-tools/scripts/init-premount/blksnap \
		/usr/lib/dracut/modules.d/90blksnap/module-setup.sh /usr/lib/dracut/modules.d/90blksnap/blksnap-cbt.sh \
		"$PREFIX/share/blksnap/hooks.d/50-postgresql" "$PREFIX/share/blksnap/hooks.d/50-sqlite"; do
		[ -x "$root$f" ] || bad "installed $f is not executable"
	done
	hooks=0
	for f in "$PREFIX/share/blksnap/hooks.d/50-postgresql" "$PREFIX/share/blksnap/hooks.d/50-sqlite"; do
		if ! sh -n "$root$f"; then
			bad "sh -n on $f"
			hooks=1
		elif command -v shellcheck >/dev/null && ! shellcheck "$root$f"; then
			bad "shellcheck on $f"
			hooks=1
		elif ! grep -q "ln -s $PREFIX/share/blksnap/hooks.d/${f##*/} /etc/blksnap/hooks.d/" "$root$f"; then
			bad "$f does not say where it is installed"
			hooks=1
		fi
	done
	[ $hooks = 1 ] || ok "the example hooks are executable, sh -n and shellcheck accept them, each names its installed place"
	if "$root$PREFIX/sbin/blksnapctl" --help >/dev/null; then
		ok "installed blksnapctl runs"
	else
		bad "installed blksnapctl --help"
	fi
	pages=("$root$PREFIX"/share/man/man1/blksnapctl*.1)
	nomark=0
	for p in "${pages[@]}"; do
		grep -q '^\.TH ' "$p" || {
			bad "$(basename "$p"): no .TH line"
			nomark=1
		}
	done
	[ $nomark = 1 ] || ok "${#pages[@]} man pages, each with its .TH line"
	if command -v groff >/dev/null; then
		if out=$(groff -man -Tutf8 -ww -z "${pages[@]}" 2>&1) && [ -z "$out" ]; then
			ok "groff renders the man pages without a warning"
		else
			echo "$out" | head
			bad "groff on the man pages"
		fi
	fi
	if bash -n "$root$PREFIX/share/bash-completion/completions/blksnapctl"; then
		ok "bash -n accepts the bash completion"
	else
		bad "bash -n on the bash completion"
	fi
	for sh in zsh fish; do
		if command -v $sh >/dev/null; then
			f=$root$PREFIX/share/zsh/site-functions/_blksnapctl
			[ $sh = zsh ] || f=$root$PREFIX/share/fish/vendor_completions.d/blksnapctl.fish
			if $sh -n "$f"; then ok "$sh -n accepts the $sh completion"; else bad "$sh -n"; fi
		fi
	done
	shells=0
	for f in /usr/lib/systemd/system-shutdown/blksnap-cbt.shutdown \
		/usr/share/initramfs-tools/hooks/blksnap /usr/share/initramfs-tools/scripts/init-premount/blksnap \
		/usr/lib/dracut/modules.d/90blksnap/blksnap-cbt.sh /usr/lib/dracut/modules.d/90blksnap/module-setup.sh; do
		sh="sh"
		[ "${f##*/}" = module-setup.sh ] && sh=bash
		if ! $sh -n "$root$f"; then
			bad "$sh -n on $f"
			shells=1
		elif command -v shellcheck >/dev/null && ! shellcheck "$root$f"; then
			bad "shellcheck on $f"
			shells=1
		fi
	done
	[ $shells = 1 ] || ok "sh -n and shellcheck accept the shutdown hook and the initramfs hooks"
	runners=("$root$PREFIX/lib/udev/rules.d/60-blksnap-cbt.rules"
		"$root$PREFIX/lib/systemd/system/blksnap-cbt.service"
		"$root/usr/lib/systemd/system-shutdown/blksnap-cbt.shutdown"
		"$root/usr/share/initramfs-tools/hooks/blksnap"
		"$root/usr/share/initramfs-tools/scripts/init-premount/blksnap"
		"$root/usr/lib/dracut/modules.d/90blksnap/module-setup.sh"
		"$root/usr/lib/dracut/modules.d/90blksnap/blksnap-cbt.sh")
	stale=$(grep -l '/usr/sbin/blksnapctl' "${runners[@]}" || true)
	runs=$(grep -l "$PREFIX/sbin/blksnapctl" "${runners[@]}" | wc -l)
	if [ -z "$stale" ] && [ "$runs" = ${#runners[@]} ]; then
		ok "the rule, the unit and the ${#runners[@]} hooks run $PREFIX/sbin/blksnapctl"
	else
		bad "the rule, the unit and the hooks do not all run $PREFIX/sbin/blksnapctl: ${stale:-}"
	fi
	# The installed units against the system's own (Debian's systemd):
	# an ordering cycle makes systemd drop a job of the boot.
	if out=$(python3 "$REPO/scripts/unit-order.py" "$root$PREFIX"/lib/systemd/system/*.service 2>&1); then
		ok "no ordering cycle through the installed units (scripts/unit-order.py)"
	else
		echo "$out"
		bad "an ordering cycle through an installed unit"
	fi
	dracut_check "$root"
	if make -s -C "$REPO" uninstall DESTDIR="$root" PREFIX=$PREFIX >"$tmp/uninstall.log" 2>&1 &&
		[ -z "$(find "$root" -type f)" ]; then
		ok "make uninstall removes every file"
	else
		find "$root" -type f
		bad "make uninstall"
	fi
fi

# --- make install-dkms, dkms add + build (trees under $tmp, no root paths)
if ! make -s -C "$REPO" install-dkms DESTDIR="$tmp/dkmsroot" >"$tmp/install-dkms.log" 2>&1; then
	tail -20 "$tmp/install-dkms.log"
	bad "make install-dkms"
elif ! command -v dkms >/dev/null; then
	bad "dkms is not installed (scripts/deps.sh installs it)"
else
	ok "make install-dkms DESTDIR=$tmp/dkmsroot"
	dk=(--sourcetree "$tmp/dkmsroot/usr/src" --dkmstree "$tmp/dkms")
	mkdir -p "$tmp/dkms"
	if dkms add "${dk[@]}" "blksnap/$VERSION" >"$tmp/dkms.log" 2>&1 &&
		dkms build "${dk[@]}" "blksnap/$VERSION" -k "$KVER" \
			--kernelsourcedir "$KOUT" >>"$tmp/dkms.log" 2>&1; then
		ko=$tmp/dkms/blksnap/$VERSION/$KVER/$(uname -m)/module/blksnap.ko
		vermagic=$(modinfo -F vermagic "$ko" 2>/dev/null || true)
		if [ "${vermagic%% *}" = "$KVER" ]; then
			ok "dkms build blksnap/$VERSION -k $KVER: blksnap.ko, vermagic $KVER"
		else
			bad "dkms build gave no blksnap.ko for $KVER ($ko: ${vermagic:-none})"
		fi
	else
		tail -20 "$tmp/dkms.log"
		bad "dkms add/build blksnap/$VERSION against $KOUT"
	fi
	expect_fail "dkms build on the pristine tree" \
		"blksnap: kernel 6.12.0-plain $msg" \
		dkms build "${dk[@]}" "blksnap/$VERSION" -k 6.12.0-plain --kernelsourcedir "$PRISTINE"
fi

echo "packaging: $passed passed, $failed failed"
[ $failed = 0 ]
