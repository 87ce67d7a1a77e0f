#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Developer tool: regenerate blk_filter/ from a kernel git tree whose commits
# on top of BASE are the patch series.
#
# usage: export-patches.sh KERNEL_GIT_TREE [BASE]    (BASE defaults to HEAD~N
#        where N is the number of patches in blk_filter/series)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
TREE=${1:?usage: export-patches.sh KERNEL_GIT_TREE [BASE]}
N=$(grep -cv '^#' "$REPO/blk_filter/series" 2>/dev/null || echo 0)
BASE=${2:-HEAD~$N}
rm -f "$REPO"/blk_filter/*.patch
git -C "$TREE" format-patch --quiet --no-signature --zero-commit -N \
	-o "$REPO/blk_filter" "$BASE"..HEAD
(
	echo "# Apply in this order with patch -p1 on Linux 6.12."
	cd "$REPO/blk_filter" && ls -1 ./*.patch | sed 's|^\./||'
) >"$REPO/blk_filter/series"
echo "exported $(grep -cv '^#' "$REPO/blk_filter/series") patches"
