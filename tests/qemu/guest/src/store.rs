// SPDX-License-Identifier: GPL-2.0

//! Difference storage kinds, events, overflow and failure, writable images.

use crate::dev::{self, AlignedBuf, SECTOR};
use crate::snap::{
    check_device, disk, e, pattern, pattern_test_with, sha256, write_pattern, Snap, Tracked,
};
use crate::{check_eq, fail, TestResult};
use blksnap::{Control, Event, MapKind, SectorRange};
use nix::errno::Errno;
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

type Test = (&'static str, fn() -> TestResult);

/// The storage tests, in the order they run.
pub const ALL: &[Test] = &[
    ("store_memory_pattern", memory_pattern),
    ("store_devices_pattern", devices_pattern),
    (
        "store_memory_full_corrupts_snapshot_not_origin",
        memory_full,
    ),
    (
        "store_devices_grow_after_low_free_space",
        devices_grow_on_event,
    ),
    ("store_overflow_with_concurrent_writer", overflow_concurrent),
    ("store_io_error_keeps_origin", store_io_error),
    ("image_writes_land_in_the_store", image_writes),
    ("image_ext4_and_xfs_replay_then_fsck", image_journal_replay),
    ("store_bad_input", bad_input),
    ("store_released_when_destroy_returns", released_at_destroy),
];

const MIB_SECTORS: u64 = 2048;

/// Sets the `diff_storage_minimum` module parameter; restores it on drop.
struct StorageMinimum(String);

impl StorageMinimum {
    const PATH: &'static str = "/sys/module/blksnap/parameters/diff_storage_minimum";

    fn set(sectors: u64) -> Result<Self, String> {
        let old = std::fs::read_to_string(Self::PATH).map_err(|e| e.to_string())?;
        std::fs::write(Self::PATH, sectors.to_string()).map_err(|e| e.to_string())?;
        Ok(Self(old.trim().to_string()))
    }
}

impl Drop for StorageMinimum {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

fn memory_pattern() -> TestResult {
    pattern_test_with(|| Snap::memory(64 * MIB_SECTORS), 31, 40)
}

/// A snapshot whose storage is the given ranges of disk d.
fn devices_snap(ranges: &[(u64, u64)]) -> Result<Snap, String> {
    Snap::devices(&disk("blksnap-d")?, ranges)
}

fn devices_pattern() -> TestResult {
    // Two ranges of disk d, 60 MiB in all, with a hole between them.
    pattern_test_with(
        || devices_snap(&[(0, 28 * MIB_SECTORS), (32 * MIB_SECTORS, 32 * MIB_SECTORS)]),
        33,
        12,
    )
}

/// Collects the events of a snapshot that arrive within `ms`.
fn events(snap: &Snap, ms: u32) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = snap.ctl.snapshot_wait_event(&snap.id, ms) {
        out.push(ev);
    }
    out
}

fn memory_full() -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 41)?;
    let snap = Snap::memory(4 * MIB_SECTORS)?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    // 16 MiB of new data: four times what the storage holds.
    write_pattern(&c, 0, 16 * MIB_SECTORS, 42)?;
    let evs = events(&snap, 2000);
    let (major, minor) = dev::major_minor(&c)?;
    // One no_space, whose payload is the size of the whole store.
    let no_space: Vec<&Event> = evs
        .iter()
        .filter(|ev| matches!(ev, Event::NoSpace { .. }))
        .collect();
    check_eq!(
        no_space,
        vec![&Event::NoSpace {
            requested_sectors: 4 * MIB_SECTORS
        }],
        "no_space events of a full 4 MiB memory store (all events: {evs:?})"
    );
    // The errno of the event is positive, as upstream's.
    let corrupted = Event::Corrupted {
        major,
        minor,
        errno: Errno::ENOSPC as i32,
    };
    if !evs.contains(&corrupted) {
        fail!("no corrupted event for {major}:{minor} with ENOSPC: {evs:?}");
    }
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        -(Errno::ENOSPC as i32),
        "SNAPSHOTINFO error"
    );
    // Image reads fail; the origin has every new write.
    match dev::read_direct(&image, 0, 8) {
        Err(err) if err.contains("Input/output error") => {}
        other => fail!("reading the corrupted image: {other:?}, want EIO"),
    }
    check_device(&c, |s| if s < 16 * MIB_SECTORS { 42 } else { 41 })?;
    snap.destroy()
}

fn devices_grow_on_event() -> TestResult {
    let _min = StorageMinimum::set(8 * MIB_SECTORS)?;
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 51)?;
    // 8 MiB of storage; the event comes when less than 4 MiB are left.
    let snap = devices_snap(&[(0, 8 * MIB_SECTORS)])?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    let id = snap.id;
    let d = disk("blksnap-d")?;
    let watcher = std::thread::spawn(move || -> Result<Vec<Event>, String> {
        let ctl = Control::open().map_err(e)?;
        let mut seen = Vec::new();
        // First too little (128 KiB leaves less than 4 MiB free): the
        // append re-arms the event, which comes again; then the rest of
        // 64 MiB.
        let mut appended = 8 * MIB_SECTORS;
        loop {
            match ctl.snapshot_wait_event(&id, 20_000) {
                Ok(Some(ev @ Event::LowFreeSpace { .. })) => {
                    let count = if appended == 8 * MIB_SECTORS {
                        256
                    } else {
                        64 * MIB_SECTORS - appended
                    };
                    ctl.snapshot_append_storage(
                        &id,
                        &d,
                        &[SectorRange {
                            offset: appended,
                            count,
                        }],
                    )
                    .map_err(e)?;
                    appended += count;
                    seen.push(ev);
                    if appended == 64 * MIB_SECTORS {
                        return Ok(seen);
                    }
                }
                Ok(Some(ev)) => seen.push(ev),
                Ok(None) => {
                    return Err(format!("watcher: no low_free_space in 20 s after {seen:?}"))
                }
                Err(err) => return Err(format!("watcher: {err} after {seen:?}")),
            }
        }
    });
    // Chunk by chunk, 24 MiB: three times the first storage.
    let mut written = 0;
    while written < 24 * MIB_SECTORS {
        write_pattern(&c, written, 512, 52)?;
        written += 512;
    }
    let seen = watcher
        .join()
        .map_err(|_| "watcher panicked".to_string())??;
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        0,
        "snapshot error after the append"
    );
    let rest = events(&snap, 500);
    if rest
        .iter()
        .any(|ev| matches!(ev, Event::Corrupted { .. } | Event::NoSpace { .. }))
    {
        fail!("events after the append: {rest:?}");
    }
    if seen.len() != 2 {
        fail!("want two low_free_space events, one per append: {seen:?}");
    }
    println!("    watcher saw {seen:?} and appended 128 KiB, then the rest of 64 MiB");
    check_device(&image, |_| 51)?;
    check_device(&c, |s| if s < 24 * MIB_SECTORS { 52 } else { 51 })?;
    snap.destroy()
}

fn overflow_concurrent() -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let snap = Snap::memory(2 * MIB_SECTORS)?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    // fio writes and verifies 16 MiB while the storage overflows.
    let fio = std::process::Command::new("fio")
        .args([
            "--name=overflow",
            &format!("--filename={}", c.display()),
            "--rw=randwrite",
            "--bs=16k",
            "--direct=1",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=terse",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("fio: {e}"))?;
    let start = std::time::Instant::now();
    let mut got = None;
    while start.elapsed() < Duration::from_secs(60) {
        match snap.ctl.snapshot_wait_event(&snap.id, 60_000) {
            Ok(Some(ev @ Event::Corrupted { .. })) => {
                got = Some((ev, start.elapsed()));
                break;
            }
            Ok(_) => {}
            Err(err) => fail!("waiting for the corrupted event: {err}"),
        }
    }
    let Some((ev, after)) = got else {
        fail!("no corrupted event within 60 s");
    };
    println!("    {ev:?} after {} ms", after.as_millis());
    let out = fio.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        fail!("fio found the origin's data wrong");
    }
    match dev::read_direct(&image, 0, 8) {
        Err(err) if err.contains("Input/output error") => {}
        other => fail!("reading the overflowed image: {other:?}, want EIO"),
    }
    snap.destroy()
}

/// Makes every I/O to `dev` fail while it lives (`fail_make_request`).
struct FailRequests(String);

impl FailRequests {
    fn on(dev: &Path) -> Result<Self, String> {
        let dbg = Path::new("/sys/kernel/debug/fail_make_request");
        for (f, v) in [
            ("probability", "100"),
            ("interval", "1"),
            ("times", "-1"),
            ("verbose", "0"),
        ] {
            std::fs::write(dbg.join(f), v).map_err(|e| format!("{f}: {e}"))?;
        }
        let name = dev.file_name().unwrap().to_string_lossy().to_string();
        std::fs::write(format!("/sys/block/{name}/make-it-fail"), "1")
            .map_err(|e| e.to_string())?;
        Ok(Self(name))
    }
}

impl Drop for FailRequests {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("/sys/block/{}/make-it-fail", self.0), "0");
    }
}

fn store_io_error() -> TestResult {
    let (c, d) = (disk("blksnap-c")?, disk("blksnap-d")?);
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 61)?;
    let snap = Snap::create(&d, 0)?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    {
        let _fail = FailRequests::on(&d)?;
        write_pattern(&c, 0, 4 * MIB_SECTORS, 62)?;
    }
    let err = t.0.snapshot_info().map_err(e)?.error_code;
    check_eq!(
        err,
        -(Errno::EIO as i32),
        "snapshot error after storage I/O errors"
    );
    let evs = events(&snap, 1000);
    if !evs
        .iter()
        .any(|ev| matches!(ev, Event::Corrupted { errno, .. } if *errno == Errno::EIO as i32))
    {
        fail!("no corrupted event with EIO: {evs:?}");
    }
    if dev::read_direct(&image, 0, 8).is_ok() {
        fail!("the image of a corrupted snapshot was readable");
    }
    check_device(&c, |s| if s < 4 * MIB_SECTORS { 62 } else { 61 })?;
    snap.destroy()
}

fn image_writes() -> TestResult {
    let c = disk("blksnap-c")?;
    let size = dev::size_sectors(&c)?;
    // The pattern goes in before tracking starts: no CBT block is marked at
    // take, so every mark below comes from a write after it.
    write_pattern(&c, 0, size, 71)?;
    let t = Tracked::new(&c)?;
    let snap = Snap::create(&dev::scratch(), 64 * MIB_SECTORS)?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    check_eq!(dev::sysfs_attr(&image, "ro")?, "0", "image writable");
    check_eq!(
        dev::sysfs_attr(&image, "queue/logical_block_size")?,
        "512",
        "image logical block size"
    );
    // Chunks of 256 KiB (the default for 64 MiB). The origin changes one
    // chunk after the take, which copies it to the store.
    let chunk = 256 * 1024u64;
    let origin_write = (2 * chunk, 16 * SECTOR);
    write_pattern(&c, origin_write.0 / SECTOR, origin_write.1 / SECTOR, 72)?;
    // O_DIRECT writes of less than 4 KiB at 512-byte offsets: each reads,
    // modifies and writes back whole 4 KiB blocks of a chunk in the store.
    let writes: &[(u64, usize, u8, &str)] = &[
        (
            chunk - 1024,
            3072,
            0xa1,
            "3 KiB across the border of chunks 0 and 1",
        ),
        (
            2 * chunk + 5 * 1024,
            1024,
            0xa2,
            "1 KiB in the chunk the origin changed",
        ),
        (
            10 * chunk + 3 * 512,
            512,
            0xa3,
            "one sector inside chunk 10",
        ),
        (
            20 * chunk + 3584,
            1024,
            0xa4,
            "1 KiB across a 4 KiB boundary",
        ),
        (size * SECTOR - 512, 512, 0xa5, "the last sector"),
    ];
    let f = dev::open_direct(&image, true)?;
    for &(off, len, fill, what) in writes {
        let buf = AlignedBuf::new(len, fill);
        f.write_all_at(buf.as_slice(), off)
            .map_err(|e| format!("O_DIRECT write of {what} ({len} bytes at {off}): {e}"))?;
    }
    drop(f);
    let mut expect = vec![0u8; (size * SECTOR) as usize];
    pattern(&mut expect, 0, 71);
    for &(off, len, fill, _) in writes {
        expect[off as usize..off as usize + len].fill(fill);
    }
    let compare = |got: &[u8], how: &str| -> TestResult {
        if let Some(i) = got.iter().zip(&expect).position(|(a, b)| a != b) {
            let near = writes
                .iter()
                .find(|w| (w.0.saturating_sub(4096)..w.0 + w.1 as u64 + 4096).contains(&(i as u64)))
                .map_or("no image write", |w| w.3);
            fail!(
                "{how} read of the image: byte {i} is {:#x}, want {:#x} (near: {near})",
                got[i],
                expect[i]
            );
        }
        Ok(())
    };
    compare(&dev::read_direct(&image, 0, size)?, "O_DIRECT")?;
    // Buffered, from a dropped page cache: 64 KiB around each write.
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| e.to_string())?;
    let f = std::fs::File::open(&image).map_err(|e| e.to_string())?;
    for &(off, len, _, what) in writes {
        let from = off.saturating_sub(32 * 1024);
        let to = (off + len as u64 + 32 * 1024).min(size * SECTOR);
        let mut got = vec![0u8; (to - from) as usize];
        f.read_exact_at(&mut got, from)
            .map_err(|e| format!("buffered read around {what}: {e}"))?;
        let want = &expect[from as usize..to as usize];
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            fail!(
                "buffered read of the image: byte {} is {:#x}, want {:#x} (near: {what})",
                from + i as u64,
                got[i],
                want[i]
            );
        }
    }
    // The origin has none of it.
    check_device(&c, |s| {
        if (origin_write.0 / SECTOR..(origin_write.0 + origin_write.1) / SECTOR).contains(&s) {
            72
        } else {
            71
        }
    })?;
    // The CBT: the map of the snapshot (CBTMAP) marks exactly the blocks
    // written through the image; the active map those and the origin's.
    let bs = u64::from(t.0.cbt_info().map_err(e)?.block_size);
    let blocks = |off: u64, len: u64| (off / bs)..=((off + len - 1) / bs);
    let image_blocks: BTreeSet<u64> = writes
        .iter()
        .flat_map(|&(off, len, _, _)| blocks(off, len as u64))
        .collect();
    let origin_blocks: BTreeSet<u64> = blocks(origin_write.0, origin_write.1).collect();
    let marked = |kind: MapKind| -> Result<BTreeSet<u64>, String> {
        let map = t.0.read_cbt_map(kind).map_err(e)?;
        Ok((0..map.len() as u64)
            .filter(|&b| map[b as usize] != 0)
            .collect())
    };
    check_eq!(
        marked(MapKind::Snapshot)?,
        image_blocks,
        "blocks marked in CBTMAP after the image writes"
    );
    check_eq!(
        marked(MapKind::Active)?,
        &image_blocks | &origin_blocks,
        "blocks marked in the active map (image and origin writes)"
    );
    println!(
        "    image wrote blocks {image_blocks:?}, the origin {origin_blocks:?}: both maps exact"
    );
    snap.destroy()
}

fn image_journal_replay() -> TestResult {
    for (fs, mkfs, fsck) in [
        (
            "ext4",
            &["mkfs.ext4", "-q", "-F"][..],
            &["fsck.ext4", "-n", "-f"][..],
        ),
        (
            "xfs",
            &["mkfs.xfs", "-q", "-f"][..],
            &["xfs_repair", "-n"][..],
        ),
    ] {
        if dev::run("which", &[mkfs[0]]).is_err() {
            println!("    no {}", mkfs[0]);
            continue;
        }
        let e_disk = disk("blksnap-e")?;
        let dev_path = e_disk.to_str().unwrap().to_string();
        dev::run(mkfs[0], &[&mkfs[1..], &[dev_path.as_str()]].concat())?;
        let mnt = dev::scratch().join(format!("jr-{fs}"));
        let img_mnt = dev::scratch().join(format!("jr-img-{fs}"));
        std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&img_mnt).map_err(|e| e.to_string())?;
        dev::run("mount", &[&dev_path, mnt.to_str().unwrap()])?;
        let r = (|| {
            let t = Tracked::new(&e_disk)?;
            dev::run(
                "dd",
                &[
                    "if=/dev/urandom",
                    &format!("of={}", mnt.join("data").display()),
                    "bs=1M",
                    "count=4",
                    "status=none",
                ],
            )?;
            dev::run("sync", &[])?;
            let sum = sha256(&mnt.join("data"))?;
            let stop = Arc::new(AtomicBool::new(false));
            let churn = {
                let (stop, mnt) = (stop.clone(), mnt.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let _ = std::fs::write(
                            mnt.join(format!("f{}", i % 64)),
                            i.to_le_bytes().repeat(512),
                        );
                        i += 1;
                    }
                })
            };
            std::thread::sleep(Duration::from_millis(500));
            let snap = Snap::create(&dev::scratch(), 200 * MIB_SECTORS)?;
            snap.add(&t.0)?;
            snap.take()?;
            stop.store(true, Ordering::Relaxed);
            churn.join().map_err(|_| "churn panicked".to_string())?;
            let image = t.image()?;
            let img = image.to_str().unwrap().to_string();
            // A read-write mount replays the journal into the store.
            let opts = if fs == "xfs" { "nouuid" } else { "rw" };
            dev::run("mount", &["-o", opts, &img, img_mnt.to_str().unwrap()])?;
            let r = sha256(&img_mnt.join("data"));
            std::fs::write(img_mnt.join("written-on-image"), b"x").map_err(|e| e.to_string())?;
            dev::run("umount", &[img_mnt.to_str().unwrap()])?;
            check_eq!(r?, sum, "{fs}: checksum in the image");
            dev::run(fsck[0], &[&fsck[1..], &[img.as_str()]].concat())
                .map_err(|err| format!("{fs}: fsck of the image after the replay: {err}"))?;
            if mnt.join("written-on-image").exists() {
                fail!("{fs}: a file written on the image appeared on the origin");
            }
            snap.destroy()
        })();
        dev::run("umount", &[mnt.to_str().unwrap()])?;
        r?;
        println!("    {fs}: image mounted read-write, replayed, fsck clean");
    }
    Ok(())
}

fn bad_input() -> TestResult {
    let (c, d) = (disk("blksnap-c")?, disk("blksnap-d")?);
    let ctl = Control::open().map_err(e)?;
    let r = |offset, count| SectorRange { offset, count };
    let dsize = dev::size_sectors(&d)?;
    let snap = Snap {
        id: ctl.snapshot_create_devices().map_err(e)?,
        ctl: Control::open().map_err(e)?,
    };
    let append = |ranges: &[SectorRange]| {
        ctl.snapshot_append_storage(&snap.id, &d, ranges)
            .map_err(|e| e.errno)
    };
    check_eq!(
        append(&[r(0, 100), r(50, 100)]),
        Err(Errno::EINVAL),
        "overlapping ranges"
    );
    check_eq!(
        append(&[r(dsize - 10, 20)]),
        Err(Errno::EINVAL),
        "a range past the end"
    );
    check_eq!(
        append(&[r(u64::MAX, 2)]),
        Err(Errno::EINVAL),
        "a range that overflows"
    );
    check_eq!(append(&[r(8, 0)]), Err(Errno::EINVAL), "an empty range");
    check_eq!(append(&[r(0, 1024)]), Ok(()), "a good range");
    check_eq!(
        append(&[r(512, 1024)]),
        Err(Errno::EINVAL),
        "a range overlapping an earlier one"
    );
    let unknown = blksnap::SnapshotId([0x33; 16]);
    check_eq!(
        ctl.snapshot_append_storage(&unknown, &d, &[r(4096, 8)])
            .map_err(|e| e.errno),
        Err(Errno::ESRCH),
        "append to an unknown snapshot"
    );
    // The store on a device of the snapshot.
    let t = Tracked::new(&c)?;
    snap.add(&t.0)?;
    check_eq!(
        ctl.snapshot_append_storage(&snap.id, &c, &[r(0, 8)])
            .map_err(|e| e.errno),
        Err(Errno::EINVAL),
        "storage on the snapshotted device"
    );
    // Raw requests: huge counts and bad addresses.
    let path = std::ffi::CString::new(d.to_str().unwrap()).unwrap();
    let ranges = [blk_snap_logic::uapi::BlksnapSectors {
        offset: 8192,
        count: 8,
    }];
    let raw = |count: u32, path_ptr: u64, ranges_ptr: u64| {
        let arg = blk_snap_logic::uapi::BlksnapSnapshotAppendStorage {
            id: blk_snap_logic::uapi::BlksnapUuid { b: snap.id.0 },
            bdev_path: path_ptr,
            count,
            reserved: 0,
            ranges: ranges_ptr,
        };
        // SAFETY: bad addresses on purpose; the kernel must check them.
        unsafe { blksnap::raw::blksnap_append_storage(ctl.as_raw_fd(), &arg) }.map(|_| ())
    };
    check_eq!(
        raw(1 << 30, path.as_ptr() as u64, ranges.as_ptr() as u64),
        Err(Errno::E2BIG),
        "a huge count"
    );
    check_eq!(
        raw(0, path.as_ptr() as u64, ranges.as_ptr() as u64),
        Err(Errno::EINVAL),
        "a count of 0"
    );
    check_eq!(
        raw(1, 16, ranges.as_ptr() as u64),
        Err(Errno::EFAULT),
        "a bad path address"
    );
    check_eq!(
        raw(1, path.as_ptr() as u64, 16),
        Err(Errno::EFAULT),
        "a bad ranges address"
    );
    // Storage kinds.
    let file_snap = Snap::create(&dev::scratch(), 64 * MIB_SECTORS)?;
    check_eq!(
        ctl.snapshot_append_storage(&file_snap.id, &d, &[r(8192, 8)])
            .map_err(|e| e.errno),
        Err(Errno::EINVAL),
        "append to a file storage"
    );
    file_snap.destroy()?;
    check_eq!(
        ctl.snapshot_create_memory(0).map_err(|e| e.errno),
        Err(Errno::EINVAL),
        "memory without a limit"
    );
    let mut arg = blk_snap_logic::uapi::BlksnapSnapshotCreateStorage {
        kind: 99,
        ..Default::default()
    };
    // SAFETY: valid argument.
    let res = unsafe { blksnap::raw::blksnap_create_storage(ctl.as_raw_fd(), &mut arg) };
    check_eq!(res, Err(Errno::EINVAL), "an unknown storage kind");
    // Events: a timeout (ENOENT, as upstream: "no event"), and a waiter
    // woken by destroy.
    check_eq!(
        ctl.snapshot_wait_event(&snap.id, 100).map_err(|e| e.errno),
        Ok(None),
        "waiting with no event"
    );
    // The command's watcher stops after --timeout seconds without one.
    let start = std::time::Instant::now();
    check_eq!(
        dev::run(
            "blksnapctl",
            &["snapshot", "watch", &snap.id.to_string(), "--timeout", "1"]
        ),
        Ok(String::new()),
        "snapshot watch --timeout 1 with no event"
    );
    if start.elapsed() > Duration::from_secs(5) {
        fail!("snapshot watch --timeout 1 took {:?}", start.elapsed());
    }
    let id = snap.id;
    let waiter = std::thread::spawn(move || {
        Control::open()
            .map_err(e)
            .map(|c| c.snapshot_wait_event(&id, 30_000).map_err(|e| e.errno))
    });
    std::thread::sleep(Duration::from_millis(300));
    snap.destroy()?;
    let woke = waiter.join().map_err(|_| "waiter panicked".to_string())??;
    check_eq!(
        woke,
        Err(Errno::ESRCH),
        "a waiter when its snapshot is destroyed"
    );
    // The image buffer is used: a raw event wait on an unknown snapshot.
    let mut buf = AlignedBuf::new(4096, 0);
    buf.as_mut_slice()[..16].copy_from_slice(&[0x44; 16]);
    // SAFETY: a page-sized buffer; the kernel fills what it writes.
    let r = unsafe {
        nix::libc::ioctl(
            ctl.as_raw_fd(),
            blk_snap_logic::uapi::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT as _,
            buf.as_mut_slice().as_mut_ptr(),
        )
    };
    check_eq!(
        (r, Errno::last()),
        (-1, Errno::ESRCH),
        "waiting on an unknown snapshot"
    );
    Ok(())
}

/// Bytes used on the file system at `dir`, from df.
fn used_bytes(dir: &Path) -> Result<u64, String> {
    let out = dev::run("df", &["-B1", "--output=used", dir.to_str().unwrap()])?;
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("df: {out}"))
}

/// A snapshot of disk c with `create`'s store, 24 MiB overwritten after the
/// take; returns the snapshot and its image, open, as a backup agent that
/// is still reading it holds it.
fn snapshot_with_24_mib_stored(
    t: &Tracked,
    seed: u64,
    create: &dyn Fn() -> Result<Snap, String>,
) -> Result<(Snap, std::fs::File), String> {
    let snap = create()?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    let f = dev::open_direct(&image, false)?;
    write_pattern(t.0.path(), 0, 24 * MIB_SECTORS, seed)?;
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        0,
        "snapshot error after 24 MiB of copy-on-write"
    );
    Ok((snap, f))
}

/// A destroyed snapshot's storage is free when destroy returns, even while
/// an agent still holds its image open: the next snapshot can use the same
/// file system or device at once. (The demo's two 1 GiB file stores on a
/// 1.2 GiB tmpfs failed with ENOSPC when the first one's space was freed
/// only as its image's last user let go.)
fn released_at_destroy() -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 61)?;
    // File stores in a 40 MiB tmpfs: two 24 MiB stores fit one at a time.
    let small = dev::mount_tmpfs(&dev::scratch().join("release"), "40M")?;
    let r = (|| {
        let create = || Snap::create(&small, 32 * MIB_SECTORS);
        let base = used_bytes(&small)?;
        let (snap, open_image) = snapshot_with_24_mib_stored(&t, 62, &create)?;
        let held = used_bytes(&small)? - base;
        snap.destroy()?;
        let after = used_bytes(&small)? - base;
        println!("    file store: {held} bytes used before destroy, {after} right after");
        if held < 24 << 20 {
            fail!("the store held {held} bytes for 24 MiB of copy-on-write");
        }
        check_eq!(
            after,
            0,
            "bytes of the store still used when destroy returned"
        );
        // The image still open reads nothing any more (its disk is gone:
        // no data, or an error).
        let mut buf = dev::AlignedBuf::new(4096, 0);
        match open_image.read_at(buf.as_mut_slice(), 0) {
            Ok(0) | Err(_) => {}
            other => fail!("a read of the destroyed snapshot's image: {other:?}, want none"),
        }
        drop(open_image);
        // The next snapshot on the same file system stores as much again.
        let (snap, open_image) = snapshot_with_24_mib_stored(&t, 63, &create)?;
        drop(open_image);
        check_device(&t.image()?, |s| if s < 24 * MIB_SECTORS { 62 } else { 61 })?;
        snap.destroy()
    })();
    dev::run("umount", &[small.to_str().unwrap()])?;
    r?;
    // A whole block device as the store: free for the next snapshot's
    // exclusive open when destroy returns.
    let d = disk("blksnap-d")?;
    let create = || Snap::create(&d, 0);
    let (snap, open_image) = snapshot_with_24_mib_stored(&t, 64, &create)?;
    snap.destroy()?;
    let (snap, open_image2) = snapshot_with_24_mib_stored(&t, 65, &create)
        .map_err(|err| format!("a snapshot on the store device of the one destroyed: {err}"))?;
    drop((open_image, open_image2));
    check_device(&t.image()?, |s| if s < 24 * MIB_SECTORS { 64 } else { 61 })?;
    snap.destroy()
}
