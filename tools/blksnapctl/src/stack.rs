// SPDX-License-Identifier: GPL-2.0

//! Which block devices a difference storage writes to, through the layers
//! the kernel module cannot see.
//!
//! The module refuses a store on a snapshotted device, on its partitions or
//! whole disk, and on a device-mapper or md device stacked over it (it
//! follows the holder links). A loop device leaves no such link: its I/O
//! goes through a file on some file system, so a store on a loop device whose
//! backing file lies on a snapshotted disk would make every chunk the
//! snapshot stores write to that disk again. This module follows loop
//! backing files, device-mapper and md slaves and file systems from sysfs,
//! so that the tools refuse such a store before the kernel is asked.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A block device number, `(major, minor)`.
pub type DevNo = (u32, u32);

fn devno(raw: u64) -> DevNo {
    (
        nix::sys::stat::major(raw) as u32,
        nix::sys::stat::minor(raw) as u32,
    )
}

fn sysfs(dev: DevNo) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1))
}

fn parse_devno(s: &str) -> Option<DevNo> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The whole disk of a partition, or the device itself.
pub fn whole(dev: DevNo) -> DevNo {
    let dir = sysfs(dev);
    if dir.join("partition").exists() {
        if let Ok(s) = std::fs::read_to_string(dir.join("../dev")) {
            if let Some(d) = parse_devno(&s) {
                return d;
            }
        }
    }
    dev
}

/// The device a path is (a block device node) or lives on (a file or a
/// directory: its file system's device).
pub fn device_of(path: &Path) -> Result<DevNo, String> {
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if md.file_type().is_block_device() {
        devno(md.rdev())
    } else {
        devno(md.dev())
    })
}

/// Every block device that I/O to `path` reaches: the device itself, the
/// devices a dm or md device is built on, the device holding a loop
/// device's backing file, and so on down the stack.
pub fn underlying(path: &Path) -> Result<BTreeSet<DevNo>, String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![device_of(path)?];
    while let Some(dev) = todo.pop() {
        if !seen.insert(dev) {
            continue;
        }
        let dir = sysfs(dev);
        if let Ok(entries) = std::fs::read_dir(dir.join("slaves")) {
            for e in entries.flatten() {
                if let Some(d) = std::fs::read_to_string(e.path().join("dev"))
                    .ok()
                    .and_then(|s| parse_devno(&s))
                {
                    todo.push(d);
                }
            }
        }
        // A partition of a loop device has the loop directory on its disk.
        let loop_dir = sysfs(whole(dev)).join("loop");
        if let Ok(file) = std::fs::read_to_string(loop_dir.join("backing_file")) {
            let file = file.trim_end_matches('\n');
            // A deleted backing file reads "path (deleted)": nothing to stat.
            if let Ok(d) = device_of(Path::new(file)) {
                todo.push(d);
            }
        }
    }
    Ok(seen)
}

/// Whether I/O to a device of `stack` reaches `dev`: the same device, its
/// whole disk, or one of its partitions.
pub fn reaches(stack: &BTreeSet<DevNo>, dev: DevNo) -> bool {
    stack
        .iter()
        .any(|&s| s == dev || whole(s) == dev || whole(dev) == s)
}

/// Refuses a store whose I/O would reach one of `devices`.
pub fn check_store(store: &Path, devices: &[PathBuf]) -> Result<(), String> {
    let stack = underlying(store)?;
    for d in devices {
        let dev = device_of(d)?;
        if reaches(&stack, dev) {
            return Err(format!(
                "the difference storage {} writes to {} (through a loop, device-mapper or md device, or directly), \
                 which is in the snapshot: every chunk the snapshot stored would be written to a snapshotted device; \
                 put the storage on another device",
                store.display(),
                d.display()
            ));
        }
    }
    Ok(())
}
