#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Finds ordering cycles through blk-snap's systemd units.

A unit ordered Before= something early in the boot and After= something
that comes later closes a cycle; systemd then deletes one job of the cycle
to break it, which job depending on the transaction: once it was
systemd-remount-fs.service, and the root file system stayed read-only.
`systemd-analyze verify` does not see it without a running systemd, so this
reads the ordering itself: every After= and Before= (and the implicit ones
of DefaultDependencies=yes services, sockets and timers) of the units in
the system's unit directories, with ours added (or replacing the installed
ones), and follows the "starts after" edges from each of our units. A path
back to it is a cycle; it is printed and the exit status is 1.

Usage: unit-order.py UNIT_FILE...   (e.g. dist/systemd/*.service)
"""
import os
import sys

DIRS = ["/usr/lib/systemd/system", "/lib/systemd/system", "/etc/systemd/system"]


def parse(path):
    after, before = set(), set()
    default = True
    section = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
                continue
            if section != "[Unit]" or "=" not in line or line.startswith("#"):
                continue
            key, value = (s.strip() for s in line.split("=", 1))
            if key == "After":
                after.update(value.split())
            elif key == "Before":
                before.update(value.split())
            elif key == "DefaultDependencies":
                default = value.lower() not in ("no", "false", "0", "off")
    return after, before, default


def load(ours):
    units = {}
    for d in DIRS:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if os.path.isfile(p) and "." in name and not name.endswith(".d"):
                units.setdefault(name, p)
    for p in ours:
        units[os.path.basename(p)] = p
    after = {}
    for name, p in units.items():
        try:
            a, b, default = parse(p)
        except OSError:
            continue
        if default and name.rsplit(".", 1)[-1] in ("service", "socket", "timer"):
            a |= {"sysinit.target", "basic.target"}
            b |= {"shutdown.target"}
        after.setdefault(name, set()).update(a)
        for u in b:
            after.setdefault(u, set()).add(name)
    return after


def cycle_through(start, after):
    # Depth-first search over "starts after" edges, for a path back to start.
    stack = [(start, iter(sorted(after.get(start, ()))))]
    path = [start]
    seen = {start}
    while stack:
        node, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            path.pop()
            continue
        if nxt == start:
            return path + [start]
        if nxt in seen:
            continue
        seen.add(nxt)
        path.append(nxt)
        stack.append((nxt, iter(sorted(after.get(nxt, ())))))
    return None


def main():
    ours = sys.argv[1:]
    if not ours:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    if not any(os.path.isdir(d) for d in DIRS):
        print("unit-order: no systemd unit directory on this machine", file=sys.stderr)
        return 2
    after = load(ours)
    rc = 0
    for p in ours:
        name = os.path.basename(p)
        c = cycle_through(name, after)
        if c:
            print(f"unit-order: {name}: ordering cycle: " + " -> after -> ".join(c))
            rc = 1
        else:
            print(f"unit-order: {name}: no ordering cycle through it")
    return rc


if __name__ == "__main__":
    sys.exit(main())
