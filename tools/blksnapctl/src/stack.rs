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

// File systems stacked over a snapshot's devices.
//
// A take freezes the file systems of its devices, and of a whole disk's
// partitions, in the kernel. A file system on a device stacked over them
// (an LVM logical volume on a partition of the disk, dm-crypt, md) is not
// on any of those devices: the kernel's freeze does not reach it, and its
// state in the snapshot is what a power cut would leave (journal to
// replay, an XFS log to recover). The tools freeze those file systems
// themselves (FIFREEZE) around the take and thaw them right after it.

/// A mounted file system: its device and one of its mount points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub dev: DevNo,
    pub path: PathBuf,
}

fn sys_dev(sys: &Path, dev: DevNo) -> PathBuf {
    sys.join(format!("dev/block/{}:{}", dev.0, dev.1))
}

fn read_devno(path: &Path) -> Option<DevNo> {
    parse_devno(&std::fs::read_to_string(path).ok()?)
}

/// A device and, if it is a whole disk, its partitions.
fn with_partitions(sys: &Path, dev: DevNo) -> Vec<DevNo> {
    let mut out = vec![dev];
    if let Ok(entries) = std::fs::read_dir(sys_dev(sys, dev)) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Some(d) = read_devno(&p.join("dev")) {
                    out.push(d);
                }
            }
        }
    }
    out
}

/// The devices stacked over `devices` or their partitions, through the
/// holder links of device-mapper, md, bcache (`holders/` in sysfs), up
/// the whole stack, each with its partitions; not `devices` themselves nor
/// their partitions (the kernel's freeze reaches those). `sys` is where
/// sysfs is mounted.
pub fn stacked_over(sys: &Path, devices: &[DevNo]) -> BTreeSet<DevNo> {
    let base: BTreeSet<DevNo> = devices
        .iter()
        .flat_map(|&d| with_partitions(sys, d))
        .collect();
    let mut seen = BTreeSet::new();
    let mut todo: Vec<DevNo> = base.iter().copied().collect();
    while let Some(dev) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(sys_dev(sys, dev).join("holders")) else {
            continue;
        };
        for e in entries.flatten() {
            let Some(h) = read_devno(&e.path().join("dev")) else {
                continue;
            };
            for d in with_partitions(sys, h) {
                if !base.contains(&d) && seen.insert(d) {
                    todo.push(d);
                }
            }
        }
    }
    seen
}

/// A mount point as /proc/self/mountinfo writes it: space, tab, newline
/// and backslash as octal escapes.
fn unescape(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mounts of /proc/self/mountinfo: each line's device (its third
/// field) and mount point (its fifth).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let dev = parse_devno(f.nth(2)?)?;
            let path = unescape(f.nth(1)?);
            Some(Mount { dev, path })
        })
        .collect()
}

/// One mount point of each file system on a device in `devs`, in the
/// order of `mounts` (a bind mount or a second mount of the same file
/// system is the same file system: frozen once).
pub fn mounts_on(mounts: &[Mount], devs: &BTreeSet<DevNo>) -> Vec<Mount> {
    let mut done = BTreeSet::new();
    mounts
        .iter()
        .filter(|m| devs.contains(&m.dev) && done.insert(m.dev))
        .cloned()
        .collect()
}

/// The mounted file systems on devices stacked over `devices` (see
/// [`stacked_over`]).
pub fn stacked_mounts(devices: &[PathBuf]) -> Result<Vec<Mount>, String> {
    let devs = devices
        .iter()
        .map(|d| device_of(d))
        .collect::<Result<Vec<_>, _>>()?;
    let stacked = stacked_over(Path::new("/sys"), &devs);
    if stacked.is_empty() {
        return Ok(Vec::new());
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    Ok(mounts_on(&parse_mountinfo(&info), &stacked))
}

nix::ioctl_readwrite_bad!(
    fifreeze,
    nix::request_code_readwrite!(b'X', 119, std::mem::size_of::<nix::libc::c_int>()),
    nix::libc::c_int
);
nix::ioctl_readwrite_bad!(
    fithaw,
    nix::request_code_readwrite!(b'X', 120, std::mem::size_of::<nix::libc::c_int>()),
    nix::libc::c_int
);

/// File systems frozen with FIFREEZE; thawed by [`Frozen::thaw`], or when
/// dropped (an error, a panic).
///
/// Nothing may write to them while they are frozen, the caller included:
/// its messages wait in `notes` until the thaw (stderr may go to a logger
/// that writes to a frozen file system).
pub struct Frozen {
    held: Vec<(std::fs::File, PathBuf)>,
    notes: Vec<String>,
}

impl Frozen {
    /// Freezes each of `mounts`. One that cannot be frozen (frozen
    /// already, a file system without freeze, a mount point that is now
    /// another file system's) is left as it is, with a note.
    pub fn freeze(mounts: &[Mount]) -> Frozen {
        use std::os::fd::AsRawFd;
        let mut held = Vec::new();
        let mut notes = Vec::new();
        for m in mounts {
            let f = match std::fs::File::open(&m.path) {
                Ok(f) => f,
                Err(e) => {
                    notes.push(format!("{}: {e}: not frozen", m.path.display()));
                    continue;
                }
            };
            // Another file system mounted over it since mountinfo was read.
            match f.metadata() {
                Ok(md) if devno(md.dev()) == m.dev => {}
                _ => {
                    notes.push(format!(
                        "{}: no longer the file system of device {}:{}: not frozen",
                        m.path.display(),
                        m.dev.0,
                        m.dev.1
                    ));
                    continue;
                }
            }
            let mut arg = 0;
            // SAFETY: FIFREEZE on an open descriptor; the argument is unused.
            match unsafe { fifreeze(f.as_raw_fd(), &mut arg) } {
                Ok(_) => held.push((f, m.path.clone())),
                Err(e) => notes.push(format!(
                    "{}: cannot freeze it ({e}): the snapshot holds it as a power cut would leave it",
                    m.path.display()
                )),
            }
        }
        Frozen { held, notes }
    }

    /// The mount points frozen.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.held.iter().map(|(_, p)| p.clone()).collect()
    }

    /// Thaws them, the last frozen first; returns the notes of the freeze
    /// and of the thaw.
    pub fn thaw(mut self) -> Vec<String> {
        let mut notes = std::mem::take(&mut self.notes);
        notes.extend(self.thaw_all());
        notes
    }

    fn thaw_all(&mut self) -> Vec<String> {
        use std::os::fd::AsRawFd;
        let mut notes = Vec::new();
        while let Some((f, path)) = self.held.pop() {
            let mut arg = 0;
            // SAFETY: FITHAW on an open descriptor; the argument is unused.
            if let Err(e) = unsafe { fithaw(f.as_raw_fd(), &mut arg) } {
                notes.push(format!("{}: cannot thaw it: {e}", path.display()));
            }
        }
        notes
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw_all();
    }
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

    /// A sysfs tree: `(name, devno, parent disk, holders)`; a device with a
    /// parent is a partition, in its disk's directory.
    fn fake_sysfs(root: &Path, devs: &[(&str, DevNo, Option<&str>, &[&str])]) -> PathBuf {
        let sys = root.join("sys");
        let dir_of = |name: &str| -> PathBuf {
            match devs.iter().find(|d| d.0 == name).unwrap().2 {
                Some(disk) => sys.join("devices").join(disk).join(name),
                None => sys.join("devices").join(name),
            }
        };
        fs::create_dir_all(sys.join("dev/block")).unwrap();
        for &(name, dev, parent, _) in devs {
            let dir = dir_of(name);
            fs::create_dir_all(dir.join("holders")).unwrap();
            fs::write(dir.join("dev"), format!("{}:{}\n", dev.0, dev.1)).unwrap();
            if parent.is_some() {
                fs::write(dir.join("partition"), "1\n").unwrap();
            }
            std::os::unix::fs::symlink(&dir, sys.join(format!("dev/block/{}:{}", dev.0, dev.1)))
                .unwrap();
        }
        for &(name, _, _, holders) in devs {
            for h in holders {
                std::os::unix::fs::symlink(dir_of(h), dir_of(name).join("holders").join(h))
                    .unwrap();
            }
        }
        sys
    }

    #[test]
    fn an_lvm_origin_is_found_through_the_stack() {
        let root = std::env::temp_dir().join(format!("blksnap-lvm-origin-{}", std::process::id()));
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

    fn set(devs: &[DevNo]) -> BTreeSet<DevNo> {
        devs.iter().copied().collect()
    }

    #[test]
    fn stacked_over_follows_holders_up_the_stack_with_partitions() {
        let tmp = std::env::temp_dir().join(format!("blksnap-stack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        // vda: a BIOS boot partition, /boot, and an LVM PV with two LVs,
        // one of them under dm-crypt; vdb: an md array with a partition.
        let (vda, vda1, vda2, vda3) = ((254, 0), (254, 1), (254, 2), (254, 3));
        let (root, var, crypt) = ((253, 0), (253, 1), (253, 2));
        let (vdb, md0, md0p1) = ((254, 16), (9, 0), (259, 0));
        let sys = fake_sysfs(
            &tmp,
            &[
                ("vda", vda, None, &[]),
                ("vda1", vda1, Some("vda"), &[]),
                ("vda2", vda2, Some("vda"), &[]),
                ("vda3", vda3, Some("vda"), &["dm-0", "dm-1"]),
                ("dm-0", root, None, &[]),
                ("dm-1", var, None, &["dm-2"]),
                ("dm-2", crypt, None, &[]),
                ("vdb", vdb, None, &["md0"]),
                ("md0", md0, None, &[]),
                ("md0p1", md0p1, Some("md0"), &[]),
            ],
        );
        // The whole disk: every LV and what is stacked over them; not the
        // disk's own partitions (the kernel freezes those).
        assert_eq!(stacked_over(&sys, &[vda]), set(&[root, var, crypt]));
        // The PV's partition alone: the same.
        assert_eq!(stacked_over(&sys, &[vda3]), set(&[root, var, crypt]));
        // Another partition: nothing over it.
        assert_eq!(stacked_over(&sys, &[vda2]), set(&[]));
        // An LV in the snapshot too: the kernel freezes it, not what is
        // stacked over it.
        assert_eq!(stacked_over(&sys, &[vda, var]), set(&[root, crypt]));
        // A stacked device's partitions are stacked too.
        assert_eq!(stacked_over(&sys, &[vdb]), set(&[md0, md0p1]));
        assert_eq!(stacked_over(&sys, &[]), set(&[]));
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn mountinfo_mount_points_unescaped_one_per_file_system() {
        let info = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/sysvg-root rw,errors=remount-ro
25 22 254:2 / /boot rw,relatime shared:2 - ext4 /dev/vda2 rw
26 22 253:1 / /var\\040log\\011x\\134y rw,relatime shared:3 - xfs /dev/mapper/sysvg-var rw
27 22 253:1 /lib /srv/bind rw,relatime shared:3 - xfs /dev/mapper/sysvg-var rw
28 22 0:25 / /run rw - tmpfs tmpfs rw
29 22 253:2 / /odd\\777 rw - ext4 /dev/mapper/x rw
";
        let mounts = parse_mountinfo(info);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[2].path, PathBuf::from("/var log\tx\\y"));
        assert_eq!(mounts[2].dev, (253, 1));
        // Not an escape a byte can hold: kept as written.
        assert_eq!(mounts[5].path, PathBuf::from("/odd\\777"));
        let on = mounts_on(&mounts, &set(&[(253, 0), (253, 1)]));
        assert_eq!(
            on,
            [
                Mount {
                    dev: (253, 0),
                    path: "/".into()
                },
                Mount {
                    dev: (253, 1),
                    path: "/var log\tx\\y".into()
                },
            ]
        );
    }
}
