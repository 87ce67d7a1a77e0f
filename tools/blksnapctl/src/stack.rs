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
    Ok(underlying_in(Path::new("/sys"), device_of(path)?))
}

/// [`underlying`] from device `start`, in the sysfs tree at `sys`.
fn underlying_in(sys: &Path, start: DevNo) -> BTreeSet<DevNo> {
    let sysfs = |dev: DevNo| sys.join(format!("dev/block/{}:{}", dev.0, dev.1));
    let mut seen = BTreeSet::new();
    let mut todo = vec![start];
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
        let loop_dir = if dir.join("partition").exists() {
            dir.join("../loop")
        } else {
            dir.join("loop")
        };
        if let Ok(file) = std::fs::read_to_string(loop_dir.join("backing_file")) {
            let file = file.trim_end_matches('\n');
            // A deleted backing file reads "path (deleted)": nothing to stat.
            if let Ok(d) = device_of(Path::new(file)) {
                todo.push(d);
            }
        }
    }
    seen
}

/// If `device` is the origin of an LVM (dm-snapshot) snapshot, or is
/// stacked on one: the name of the `-real` device-mapper device that LVM
/// puts under an origin while it has snapshots (and while one is merged
/// into it).
///
/// `lvconvert --merge` copies the snapshot's chunks back to the `-real`
/// device, under the origin: the origin's content changes without a write
/// through it, which its change map would see. A backup must not trust the
/// change map of such a device across a time where it had a snapshot.
pub fn lvm_origin(device: &Path) -> Option<String> {
    lvm_origin_in(Path::new("/sys"), device_of(device).ok()?)
}

/// [`lvm_origin`] of device `dev`, in the sysfs tree at `sys`.
pub fn lvm_origin_in(sys: &Path, dev: DevNo) -> Option<String> {
    for d in underlying_in(sys, dev) {
        let dir = sys.join(format!("dev/block/{}:{}/dm", d.0, d.1));
        let uuid = std::fs::read_to_string(dir.join("uuid")).unwrap_or_default();
        let uuid = uuid.trim();
        if uuid.starts_with("LVM-") && uuid.ends_with("-real") {
            let name = std::fs::read_to_string(dir.join("name")).unwrap_or_default();
            let name = name.trim();
            return Some(if name.is_empty() { uuid } else { name }.to_string());
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake sysfs: `bsvg-lv` (254:0) on `bsvg-lv-real` (254:1) on `vdc`
    /// (253:32), and `crypt` (254:2) on `bsvg-lv`; `other` (254:3) on
    /// `vdd` (253:48).
    fn fake(root: &Path, origin: bool) -> PathBuf {
        let sys = root.join("sys");
        let _ = fs::remove_dir_all(&sys);
        let dev = |d: DevNo| sys.join(format!("dev/block/{}:{}", d.0, d.1));
        let dm = |d: DevNo, name: &str, uuid: &str| {
            fs::create_dir_all(dev(d).join("dm")).unwrap();
            fs::write(dev(d).join("dm/name"), format!("{name}\n")).unwrap();
            fs::write(dev(d).join("dm/uuid"), format!("{uuid}\n")).unwrap();
        };
        let slave = |upper: DevNo, lower: DevNo, name: &str| {
            let s = dev(upper).join("slaves").join(name);
            fs::create_dir_all(&s).unwrap();
            fs::write(s.join("dev"), format!("{}:{}\n", lower.0, lower.1)).unwrap();
        };
        for d in [(253, 32), (253, 48)] {
            fs::create_dir_all(dev(d)).unwrap();
        }
        dm((254, 0), "bsvg-lv", "LVM-aaaabbbb");
        dm((254, 2), "crypt", "CRYPT-LUKS2-1234-crypt");
        dm((254, 3), "other", "LVM-ccccdddd");
        slave((254, 2), (254, 0), "dm-0");
        slave((254, 3), (253, 48), "vdd");
        if origin {
            dm((254, 1), "bsvg-lv-real", "LVM-aaaabbbb-real");
            slave((254, 0), (254, 1), "dm-1");
            slave((254, 1), (253, 32), "vdc");
        } else {
            slave((254, 0), (253, 32), "vdc");
        }
        sys
    }

    #[test]
    fn an_lvm_origin_is_found_through_the_stack() {
        let root = std::env::temp_dir().join(format!("blksnap-stack-{}", std::process::id()));
        let sys = fake(&root, true);
        let name = Some("bsvg-lv-real".to_string());
        assert_eq!(lvm_origin_in(&sys, (254, 0)), name, "the origin");
        assert_eq!(lvm_origin_in(&sys, (254, 2)), name, "dm-crypt on it");
        assert_eq!(lvm_origin_in(&sys, (253, 32)), None, "the PV under it");
        assert_eq!(lvm_origin_in(&sys, (254, 3)), None, "another LV");
        let sys = fake(&root, false);
        assert_eq!(lvm_origin_in(&sys, (254, 0)), None, "no snapshot");
        assert_eq!(lvm_origin_in(&sys, (254, 2)), None, "no snapshot under");
        fs::remove_dir_all(&root).ok();
    }
}
