// SPDX-License-Identifier: GPL-2.0

//! Removal of other kinds of devices than virtio disks: a zram device and a
//! loop device, while attached, while part of a taken snapshot, and while
//! they hold a snapshot's store. The snapshot is marked corrupted (or the
//! removal is refused while the store is in use), nothing splats, and the
//! module unloads afterwards.

use crate::dev::{self, SECTOR};
use crate::snap::{check_device, disk, e, write_pattern, Snap, Tracked};
use crate::{check_eq, fail, TestResult};
use blksnap::{Control, Event, SectorRange, Tracker};
use nix::errno::Errno;
use std::path::{Path, PathBuf};
use std::time::Duration;

type Test = (&'static str, fn() -> TestResult);

/// The tests, in the order they run.
pub const ALL: &[Test] = &[
    ("removal_of_a_zram_device", zram),
    ("removal_of_a_loop_device", loop_device),
    (
        "removal_store_stacked_over_a_snapshotted_disk",
        stacked_store,
    ),
    (
        "removal_store_on_a_loop_file_over_a_snapshotted_disk",
        loop_store,
    ),
    (
        "removal_store_on_a_loop_device_over_a_snapshotted_disk",
        loop_over_disk_store,
    ),
];

const MIB: u64 = 1 << 20;

/// A zram device, removed on drop if still there.
struct Zram {
    n: u32,
    path: PathBuf,
    removed: bool,
}

impl Zram {
    fn new(bytes: u64) -> Result<Self, String> {
        let n: u32 = std::fs::read_to_string("/sys/class/zram-control/hot_add")
            .map_err(|e| format!("zram hot_add (is CONFIG_ZRAM on?): {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("zram number: {e}"))?;
        std::fs::write(format!("/sys/block/zram{n}/disksize"), bytes.to_string())
            .map_err(|e| format!("zram{n} disksize: {e}"))?;
        let path = PathBuf::from(format!("/dev/zram{n}"));
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            n,
            path,
            removed: false,
        })
    }

    /// `hot_remove`; returns the errno it failed with. udev's probes open
    /// the device (EBUSY): they are waited for first.
    fn remove(&mut self) -> Result<(), Errno> {
        dev::udev_settle();
        match std::fs::write("/sys/class/zram-control/hot_remove", self.n.to_string()) {
            Ok(()) => {
                self.removed = true;
                Ok(())
            }
            Err(err) => Err(Errno::from_raw(err.raw_os_error().unwrap_or(0))),
        }
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.remove();
        }
    }
}

fn refcnt() -> Result<u32, String> {
    std::fs::read_to_string("/sys/module/blksnap/refcnt")
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|e| format!("refcnt: {e}"))
}

/// The corrupted events of `snap` that arrive within `ms`.
fn corrupted_events(snap: &Snap, ms: u32) -> Vec<(u32, u32, i32)> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = snap.ctl.snapshot_wait_event(&snap.id, ms) {
        if let Event::Corrupted {
            major,
            minor,
            errno,
        } = ev
        {
            out.push((major, minor, errno));
        }
    }
    out
}

/// The origin `dev` of a taken snapshot goes away (`remove`): the snapshot
/// of it is marked corrupted with ENODEV and an event, its image fails
/// reads, and destroy is clean.
fn remove_taken(dev: &Path, remove: impl FnOnce() -> Result<(), String>) -> TestResult {
    let (major, minor) = dev::major_minor(dev)?;
    let t = Tracker::open(dev).map_err(e)?;
    t.attach().map_err(e)?;
    let snap = Snap::memory(16 << 11)?;
    snap.add(&t)?;
    snap.take()?;
    let info = t.snapshot_info().map_err(e)?;
    check_eq!(info.error_code, 0, "snapshot error before the removal");
    let image = PathBuf::from(format!("/dev/{}", info.image));
    dev::write_direct(dev, 0, 8, 0x31)?;
    drop(t);
    remove()?;
    let evs = corrupted_events(&snap, 1000);
    println!("    corrupted events after the removal: {evs:?}");
    if !evs.contains(&(major, minor, Errno::ENODEV as i32)) {
        fail!("no corrupted event with ENODEV for {major}:{minor}: {evs:?}");
    }
    match dev::read_direct(&image, 0, 8) {
        Err(err) if err.contains("Input/output error") => {}
        other => fail!("reading the image of a removed device: {other:?}, want EIO"),
    }
    snap.destroy()
}

/// A snapshot of disk c whose store is `store` (a whole block device): the
/// store's device cannot be removed while the snapshot uses it (`remove`
/// fails), the snapshot stays right, and after destroy it can.
fn store_device_busy(
    store: &Path,
    try_remove: &mut dyn FnMut() -> Result<(), String>,
) -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 101)?;
    let ctl = Control::open().map_err(e)?;
    let id = ctl.snapshot_create_devices().map_err(e)?;
    let snap = Snap { id, ctl };
    let sectors = dev::size_sectors(store)?;
    snap.ctl
        .snapshot_append_storage(
            &snap.id,
            store,
            &[SectorRange {
                offset: 0,
                count: sectors,
            }],
        )
        .map_err(e)?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    write_pattern(&c, 0, 4 * MIB / SECTOR, 102)?;
    if try_remove().is_ok() {
        fail!("the store's device was removed while the snapshot used it");
    }
    write_pattern(&c, 8 * MIB / SECTOR, 4 * MIB / SECTOR, 102)?;
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        0,
        "snapshot error after the refused removal"
    );
    check_device(&image, |_| 101)?;
    snap.destroy()?;
    try_remove().map_err(|err| format!("removal after destroy: {err}"))
}

/// The module's reference count once the objects of earlier tests are
/// gone: a destroyed snapshot's image and work items let go of the module
/// a moment after destroy returns. Waits up to 10 s for no reference.
fn settled_refcnt() -> Result<u32, String> {
    for _ in 0..100 {
        if refcnt()? == 0 {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let n = refcnt()?;
    println!("    {n} module references left by earlier tests");
    Ok(n)
}

/// Waits up to 10 s for the module's reference count to come back to
/// `want`.
fn refcnt_settles(want: u32, what: &str) -> TestResult {
    for _ in 0..100 {
        if refcnt()? == want {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check_eq!(refcnt()?, want, "{what} (after 10 s)");
    Ok(())
}

fn zram() -> TestResult {
    let base = settled_refcnt()?;
    // Attached, then removed.
    let mut z = Zram::new(64 * MIB)?;
    {
        let t = Tracker::open(&z.path).map_err(e)?;
        t.attach().map_err(e)?;
    }
    check_eq!(refcnt()?, base + 1, "module references while attached");
    check_eq!(z.remove(), Ok(()), "hot_remove of an attached zram");
    check_eq!(refcnt()?, base, "module references after removal");
    // In a taken snapshot.
    let mut z = Zram::new(64 * MIB)?;
    let path = z.path.clone();
    remove_taken(&path, || {
        z.remove().map_err(|err| format!("hot_remove: {err}"))
    })?;
    refcnt_settles(base, "module references after the snapshot")?;
    // Holding a snapshot's store.
    let mut z = Zram::new(32 * MIB)?;
    let path = z.path.clone();
    let mut tries = Vec::new();
    store_device_busy(&path, &mut || {
        let r = z.remove();
        tries.push(r);
        r.map_err(|err| err.to_string())
    })?;
    println!("    hot_remove of the store's zram: {tries:?}");
    check_eq!(
        tries.first(),
        Some(&Err(Errno::EBUSY)),
        "hot_remove of a store in use"
    );
    unload_and_reload()
}

fn loop_device() -> TestResult {
    let base = settled_refcnt()?;
    let mut lo = dev::LoopDev::new("rm-taken", 64 * MIB)?;
    let path = lo.path.clone();
    remove_taken(&path, || lo.remove())?;
    refcnt_settles(base, "module references after the snapshot")?;
    let mut lo = dev::LoopDev::new("rm-store", 32 * MIB)?;
    let path = lo.path.clone();
    store_device_busy(&path, &mut || lo.remove())?;
    unload_and_reload()
}

/// The module unloads now that nothing uses it, and is loaded again.
pub(crate) fn unload_and_reload() -> TestResult {
    dev::unload_module().map_err(|err| format!("rmmod after the removals: {err}"))?;
    dev::load_module("")
}

/// A store on a device-mapper device stacked over a snapshotted disk would
/// write to that disk with every chunk it stores: refused with EINVAL, as a
/// store on the disk itself is, whether it is the whole device, appended
/// ranges or a file on a file system there.
fn stacked_store() -> TestResult {
    let c = disk("blksnap-c")?;
    let sectors = dev::size_sectors(&c)?;
    let table = format!("0 {sectors} linear {} 0", c.display());
    dev::run("dmsetup", &["create", "blksnap-stack", "--table", &table])?;
    let dm = PathBuf::from("/dev/mapper/blksnap-stack");
    let mnt = dev::scratch().join("stack-mnt");
    let r = (|| {
        let t = Tracked::new(&c)?;
        // The whole dm device as the store.
        let s = Snap::create(&dm, 0)?;
        check_eq!(
            t.0.snapshot_add(&s.id).map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "adding a disk to a snapshot whose store is a dm device over it"
        );
        s.destroy()?;
        // Ranges of the dm device, appended after the disk was added.
        let ctl = Control::open().map_err(e)?;
        let s = Snap {
            id: ctl.snapshot_create_devices().map_err(e)?,
            ctl,
        };
        s.add(&t.0)?;
        check_eq!(
            s.ctl
                .snapshot_append_storage(
                    &s.id,
                    &dm,
                    &[SectorRange {
                        offset: 0,
                        count: 8192,
                    }]
                )
                .map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "appending ranges of a dm device over a snapshotted disk"
        );
        s.destroy()?;
        // A file on a file system on the dm device.
        let dmp = dm.to_str().unwrap();
        dev::run("mkfs.ext4", &["-q", "-F", dmp])?;
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        dev::run("mount", &[dmp, mnt.to_str().unwrap()])?;
        let r = (|| {
            let s = Snap::create(&mnt, 64 << 11)?;
            check_eq!(
                t.0.snapshot_add(&s.id).map_err(|e| e.errno),
                Err(Errno::EINVAL),
                "adding a disk to a snapshot whose store file is on a dm device over it"
            );
            s.destroy()
        })();
        dev::run("umount", &[mnt.to_str().unwrap()])?;
        r
    })();
    let removed = dev::run("dmsetup", &["remove", "blksnap-stack"]);
    r?;
    removed.map(|_| ())
}

/// A store on a loop device whose backing file lives on a file system on a
/// snapshotted disk: each chunk the snapshot stores is written to that disk
/// again (at the take, the thaw's superblock write waits for a copy whose
/// store write waits for the thaw). The tools see through the loop device
/// and refuse it before they ask the kernel; the kernel follows the loop
/// device to its backing file and refuses it too.
fn loop_store() -> TestResult {
    let c = disk("blksnap-c")?;
    let cp = c.to_str().unwrap().to_string();
    dev::run("mkfs.ext4", &["-q", "-F", &cp])?;
    let mnt = dev::scratch().join("loopstore-mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    dev::run("mount", &[&cp, mnt.to_str().unwrap()])?;
    let file = mnt.join("store.img");
    let mut lo = None;
    let r = (|| {
        dev::run("fallocate", &["-l", "40M", file.to_str().unwrap()])?;
        let l = dev::run("losetup", &["--find", "--show", file.to_str().unwrap()])?;
        let l = PathBuf::from(l.trim());
        lo = Some(l.clone());
        // What the tools see under the loop device.
        let stack = blksnap::stack::underlying(&l)?;
        let cdev = blksnap::stack::device_of(&c)?;
        if !blksnap::stack::reaches(&stack, cdev) {
            fail!(
                "the stack under {} ({stack:?}) misses {cp} {cdev:?}",
                l.display()
            );
        }
        // The tools refuse it before the kernel is asked.
        let devices = [c.clone()];
        let stop = std::sync::atomic::AtomicBool::new(false);
        let dir = dev::scratch().join("loopstore-backup");
        let mut o = crate::backup::opts(&devices, &dir, blksnap::backup::Kind::Full, &stop, false);
        o.store = &l;
        match blksnap::backup::run(&o) {
            Ok(_) => fail!(
                "a backup of {cp} with its store on {} over it ran",
                l.display()
            ),
            Err(m) if m.contains("in the snapshot") => println!("    blksnapctl: {m}"),
            Err(m) => fail!("the backup failed for another reason: {m}"),
        }
        // The kernel refuses it too: the whole loop device, ranges of it.
        let t = Tracked::new(&c)?;
        let s = Snap::create(&l, 0)?;
        check_eq!(
            t.0.snapshot_add(&s.id).map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "adding a disk to a snapshot whose store is a loop device over a file on it"
        );
        s.destroy()?;
        let ctl = Control::open().map_err(e)?;
        let s = Snap {
            id: ctl.snapshot_create_devices().map_err(e)?,
            ctl,
        };
        s.add(&t.0)?;
        check_eq!(
            s.ctl
                .snapshot_append_storage(
                    &s.id,
                    &l,
                    &[SectorRange {
                        offset: 0,
                        count: 8192,
                    }]
                )
                .map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "appending ranges of a loop device over a file on a snapshotted disk"
        );
        s.destroy()?;
        Ok(())
    })();
    if let Some(l) = lo {
        let _ = dev::run("losetup", &["-d", l.to_str().unwrap()]);
    }
    let um = dev::run("umount", &[mnt.to_str().unwrap()]);
    r?;
    um.map(|_| ())
}

/// A loop device whose backing file is a snapshotted disk itself: a store
/// there is refused like one on the disk.
fn loop_over_disk_store() -> TestResult {
    let d = disk("blksnap-d")?;
    let l = dev::run("losetup", &["--find", "--show", d.to_str().unwrap()])?;
    let l = PathBuf::from(l.trim());
    let r = (|| {
        let t = Tracked::new(&d)?;
        let s = Snap::create(&l, 0)?;
        check_eq!(
            t.0.snapshot_add(&s.id).map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "adding a disk to a snapshot whose store is a loop device over that disk"
        );
        s.destroy()
    })();
    let removed = dev::run("losetup", &["-d", l.to_str().unwrap()]);
    r?;
    removed.map(|_| ())
}
