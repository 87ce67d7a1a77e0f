// SPDX-License-Identifier: GPL-2.0

//! The cut a snapshot makes, and what may not slip through it: writes in
//! flight at the take, detach during a take, a device that changed size,
//! image reads during destroy, and file systems on a snapshotted disk's
//! partitions.
//!
//! Disk `blksnap-g` is write-throttled by QEMU (64 KiB/s): the first write
//! passes at once and fills the throttle's bucket, the next one waits for it
//! to drain, so a 128 KiB write after a 128 KiB one stays in flight for
//! about two seconds.

use crate::backup::{opts, same};
use crate::dev::{self, AlignedBuf, SECTOR};
use crate::snap::{
    check_device, disk, e, pattern, random_files, sha256, write_pattern, Rng, Snap, Tracked,
};
use crate::{check_eq, fail, TestResult};
use blksnap::backup::{self, Kind, Manifest};
use blksnap::Tracker;
use nix::errno::Errno;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The tests, in the order they run.
pub const ALL: &[Test] = &[
    (
        "cut_write_in_flight_at_take_stays_in_the_backup_chain",
        in_flight_at_take,
    ),
    ("cut_detach_refused_while_in_a_snapshot", detach_refused),
    ("cut_device_resized_between_backups", resized),
    ("cut_image_reads_during_destroy", reads_during_destroy),
    (
        "cut_whole_disk_freezes_the_file_systems_of_its_partitions",
        partitions_frozen,
    ),
];

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A write of `len` bytes of `fill` at byte `offset` of `dev`, O_DIRECT, in
/// a thread; it returns when the write completed.
struct Write {
    thread: std::thread::JoinHandle<Result<Instant, String>>,
}

impl Write {
    fn start(dev: &Path, offset: u64, len: usize, fill: u8) -> Self {
        let dev = dev.to_path_buf();
        let thread = std::thread::spawn(move || {
            let f = dev::open_direct(&dev, true)?;
            let buf = AlignedBuf::new(len, fill);
            f.write_all_at(buf.as_slice(), offset)
                .map_err(|e| format!("write {len} bytes at {offset}: {e}"))?;
            Ok(Instant::now())
        });
        Self { thread }
    }

    /// Waits for the write; returns when it completed.
    fn done(self) -> Result<Instant, String> {
        self.thread
            .join()
            .map_err(|_| "writer panicked".to_string())?
    }
}

/// Starts a write that stays in flight on the throttled disk: a sacrificial
/// write first, which passes at once and fills the throttle, then the real
/// one, which waits for it. Returns once the second write has been issued.
fn write_in_flight(g: &Path, sacrificial: u64, offset: u64, fill: u8) -> Result<Write, String> {
    dev::write_direct(
        g,
        sacrificial / SECTOR,
        128 * KIB / SECTOR,
        fill.wrapping_add(1),
    )?;
    let w = Write::start(g, offset, (128 * KIB) as usize, fill);
    // Long enough for the write to be submitted, far shorter than the
    // throttle holds it.
    std::thread::sleep(Duration::from_millis(300));
    Ok(w)
}

/// A full backup, then rounds of: a 128 KiB O_DIRECT write in flight while
/// an incremental backup takes its snapshot, and another incremental after
/// it landed. After every round the backup equals the device.
fn in_flight_at_take() -> TestResult {
    let g = disk("blksnap-g")?;
    let dir = dev::scratch().join("inflight-out");
    let _ = std::fs::remove_dir_all(&dir);
    let devices = vec![g.clone()];
    let stop = AtomicBool::new(false);
    let _tracked = Tracked::new(&g)?;
    let report = backup::run(&opts(&devices, &dir, Kind::Full, &stop, false))?;
    let img = dir.join(&Manifest::load(&report.devices[0].manifest)?.image);
    const ROUNDS: u64 = 4;
    for round in 0..ROUNDS {
        let offset = (8 + 6 * round) * MIB + 64 * KIB;
        let fill = 0x40 + round as u8;
        let w = write_in_flight(&g, 60 * MIB + round * 256 * KIB, offset, fill)?;
        let take = Instant::now();
        let first = backup::run(&opts(&devices, &dir, Kind::Incremental, &stop, false))?;
        let landed = w.done()?;
        if landed < take {
            fail!("round {round}: the write landed before the take began: the test proves nothing");
        }
        check_eq!(
            first.devices[0].kind,
            Kind::Incremental,
            "round {round}: first backup kind"
        );
        let second = backup::run(&opts(&devices, &dir, Kind::Incremental, &stop, false))?;
        check_eq!(
            second.devices[0].kind,
            Kind::Incremental,
            "round {round}: second backup kind"
        );
        let (got, want) = (sha256(&img)?, sha256(&g)?);
        if got != want {
            let mut at = [0u8; 1];
            std::fs::File::open(&img)
                .and_then(|f| f.read_exact_at(&mut at, offset))
                .map_err(|e| e.to_string())?;
            let at = at[0];
            fail!(
                "round {round}: the backup differs from the device (the write of {fill:#x} in flight at the take was at byte {offset}; the backup has {at:#x} there)"
            );
        }
        println!(
            "    round {round}: write in flight for {} ms after the take began; backup == device",
            (landed - take).as_millis()
        );
    }
    println!("    {ROUNDS} rounds");
    Ok(())
}

/// The `BLKFILTER_DETACH` errno for `t`, without dropping it.
fn detach_errno(t: &Tracker) -> Result<(), Errno> {
    t.detach().map_err(|e| e.errno)
}

fn detach_refused() -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 81)?;
    let snap = Snap::create(&dev::scratch(), 64 << 11)?;
    snap.add(&t.0)?;
    check_eq!(
        detach_errno(&t.0),
        Err(Errno::EBUSY),
        "detach of a device added to a snapshot"
    );
    snap.take()?;
    check_eq!(
        detach_errno(&t.0),
        Err(Errno::EBUSY),
        "detach of a device in a taken snapshot"
    );
    check_eq!(
        dev::sysfs_attr(&c, "filter")?,
        "blksnap",
        "filter after refused detaches"
    );
    let image = t.image()?;
    write_pattern(&c, 0, 4096, 82)?;
    check_device(&image, |_| 81)?;
    snap.destroy()?;

    // During a take: the take waits for a write in flight on the throttled
    // disk, and the detach comes meanwhile.
    let g = disk("blksnap-g")?;
    let tg = Tracked::new(&g)?;
    let snap = Arc::new(Snap::create(&dev::scratch(), 64 << 11)?);
    snap.add(&tg.0)?;
    let w = write_in_flight(&g, 40 * MIB, 44 * MIB, 0x5c)?;
    let taker = {
        let snap = snap.clone();
        std::thread::spawn(move || -> Result<Instant, String> {
            snap.take()?;
            Ok(Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let detach_at = Instant::now();
    let r = detach_errno(&tg.0);
    let landed = w.done()?;
    let taken = taker.join().map_err(|_| "taker panicked".to_string())??;
    println!(
        "    detach during the take: {r:?}; the take returned {} ms after the detach, the write landed {} ms after it",
        (taken - detach_at).as_millis(),
        landed.saturating_duration_since(detach_at).as_millis()
    );
    check_eq!(
        r,
        Err(Errno::EBUSY),
        "detach while the snapshot is being taken"
    );
    let info = tg.0.snapshot_info().map_err(e)?;
    check_eq!(info.error_code, 0, "snapshot error after the take");
    // The write that was in flight is in the image; later writes are not.
    let image = tg.image()?;
    check_eq!(
        dev::read_direct(&image, 44 * MIB / SECTOR, 1)?[0],
        0x5c,
        "image byte of the write in flight at the take"
    );
    dev::write_direct(&g, 44 * MIB / SECTOR, 8, 0x5d)?;
    check_eq!(
        dev::read_direct(&image, 44 * MIB / SECTOR, 1)?[0],
        0x5c,
        "image byte after a write following the take"
    );
    let snap = Arc::try_unwrap(snap).map_err(|_| "snapshot still shared".to_string())?;
    snap.destroy()?;
    check_eq!(detach_errno(&tg.0), Ok(()), "detach after destroy");
    check_eq!(detach_errno(&t.0), Ok(()), "detach of c after destroy");
    Ok(())
}

/// Resizes a loop device's backing file and tells the loop driver.
fn resize_loop(lo: &dev::LoopDev, bytes: u64) -> TestResult {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(lo.backing())
        .map_err(|e| e.to_string())?;
    f.set_len(bytes).map_err(|e| e.to_string())?;
    drop(f);
    dev::run("losetup", &["-c", lo.path.to_str().unwrap()])?;
    check_eq!(
        dev::size_sectors(&lo.path)? * SECTOR,
        bytes,
        "loop device size after losetup -c"
    );
    Ok(())
}

fn resized() -> TestResult {
    let lo = dev::LoopDev::new("resize", 48 * MIB)?;
    let dir = dev::scratch().join("resize-out");
    let _ = std::fs::remove_dir_all(&dir);
    let devices = vec![lo.path.clone()];
    let stop = AtomicBool::new(false);
    let t = Tracked::new(&lo.path)?;
    write_pattern(&lo.path, 0, 48 * MIB / SECTOR, 91)?;
    let r = backup::run(&opts(&devices, &dir, Kind::Full, &stop, false))?;
    let img = dir.join(&Manifest::load(&r.devices[0].manifest)?.image);
    let generation = t.0.cbt_info().map_err(e)?.generation;
    for (what, bytes, seed) in [("grown", 80 * MIB, 92), ("shrunk", 40 * MIB, 93)] {
        resize_loop(&lo, bytes)?;
        // Writes inside and, once grown, past the old end.
        write_pattern(&lo.path, 0, 2048, seed)?;
        write_pattern(&lo.path, bytes / SECTOR - 4096, 4096, seed)?;
        let r = backup::run(&opts(&devices, &dir, Kind::Incremental, &stop, false))?;
        let o = &r.devices[0];
        let m = Manifest::load(&o.manifest)?;
        let info = t.0.cbt_info().map_err(e)?;
        println!(
            "    {what} to {} MiB: backup {:?}, CBTINFO {} MiB, generation changed: {}",
            bytes >> 20,
            o.kind,
            info.device_capacity >> 20,
            info.generation != generation
        );
        check_eq!(info.device_capacity, bytes, "{what}: CBTINFO capacity");
        check_eq!(m.size, bytes, "{what}: manifest size");
        check_eq!(o.kind, Kind::Full, "{what}: the incremental fell back to");
        same(&img, &lo.path, bytes)?;
        // And the next incremental is a real one again.
        write_pattern(&lo.path, 1 << 14, 64, seed + 10)?;
        let r = backup::run(&opts(&devices, &dir, Kind::Incremental, &stop, false))?;
        check_eq!(
            r.devices[0].kind,
            Kind::Incremental,
            "{what}: the next backup"
        );
        same(&img, &lo.path, bytes)?;
    }
    Ok(())
}

/// Image reads race the destroy of their snapshot while the origin is being
/// overwritten: each read returns the snapshot's data or fails with EIO,
/// never newer data.
fn reads_during_destroy() -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 21)?;
    let snap = Snap::create(&dev::scratch(), 64 << 11)?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    // Readers read the first 8 MiB, which nothing writes before the destroy
    // starts, so that they read from the origin.
    const REGION: u64 = 8 * MIB;
    const READ: usize = 4 * MIB as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let destroying = Arc::new(AtomicBool::new(false));
    // (start, end, ok) of every read, in ms since `t0`.
    let t0 = Instant::now();
    let log = Arc::new(Mutex::new(Vec::<(u128, u128, bool)>::new()));
    let mut readers = Vec::new();
    for i in 0..6u64 {
        let (stop, image, log) = (stop.clone(), image.clone(), log.clone());
        readers.push(std::thread::spawn(move || -> TestResult {
            let f = match dev::open_direct(&image, false) {
                Ok(f) => f,
                Err(_) => return Ok(()),
            };
            let mut buf = AlignedBuf::new(READ, 0);
            let mut want = vec![0u8; READ];
            let mut off = (i * MIB) % (REGION - READ as u64);
            while !stop.load(Ordering::Relaxed) {
                let start = t0.elapsed().as_millis();
                let r = f.read_exact_at(buf.as_mut_slice(), off);
                let end = t0.elapsed().as_millis();
                match r {
                    Ok(()) => {
                        pattern(&mut want, off / SECTOR, 21);
                        if buf.as_slice() != want.as_slice() {
                            let bad = buf
                                .as_slice()
                                .chunks(SECTOR as usize)
                                .zip(want.chunks(SECTOR as usize))
                                .position(|(a, b)| a != b)
                                .unwrap_or(0);
                            return Err(format!(
                                "an image read of {READ} bytes at {off}, from {start} to {end} ms, succeeded with data that is not the snapshot's (sector {} differs)",
                                off / SECTOR + bad as u64,
                            ));
                        }
                        log.lock().unwrap().push((start, end, true));
                    }
                    Err(_) => {
                        log.lock().unwrap().push((start, end, false));
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                off = (off + MIB) % (REGION - READ as u64);
            }
            Ok(())
        }));
    }
    // Writers overwrite that region as soon as the destroy starts.
    let mut writers = Vec::new();
    for i in 0..2u64 {
        let (stop, destroying, c) = (stop.clone(), destroying.clone(), c.clone());
        writers.push(std::thread::spawn(move || -> TestResult {
            let f = dev::open_direct(&c, true)?;
            let mut buf = AlignedBuf::new(64 * KIB as usize, 0);
            let mut rng = Rng(17 + i);
            while !destroying.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
            while !stop.load(Ordering::Relaxed) {
                let s = rng.below(REGION / (64 * KIB)) * 64 * KIB;
                pattern(buf.as_mut_slice(), s / SECTOR, 22);
                f.write_all_at(buf.as_slice(), s)
                    .map_err(|e| format!("origin write at {s}: {e}"))?;
            }
            Ok(())
        }));
    }
    // Let reads succeed first: 1.5 s, or longer on a loaded host, until
    // 4 have succeeded (at most 60 s).
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = Instant::now() + Duration::from_secs(60);
    while log.lock().unwrap().iter().filter(|r| r.2).count() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let destroy_start = t0.elapsed().as_millis();
    destroying.store(true, Ordering::Relaxed);
    snap.destroy()?;
    let destroy_end = t0.elapsed().as_millis();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let mut first_err = None;
    for r in readers.into_iter().chain(writers) {
        if let Err(err) = r.join().map_err(|_| "thread panicked".to_string())? {
            first_err.get_or_insert(err);
        }
    }
    if let Some(err) = first_err {
        fail!("{err}; the destroy ran from {destroy_start} to {destroy_end} ms");
    }
    let log = log.lock().unwrap().clone();
    let ok_before = log.iter().filter(|r| r.2 && r.1 < destroy_start).count();
    // Reads in progress when the destroy began: they race it.
    let raced: Vec<_> = log
        .iter()
        .filter(|r| r.0 < destroy_start && r.1 >= destroy_start)
        .collect();
    let raced_ok = raced.iter().filter(|r| r.2).count();
    let during = log
        .iter()
        .filter(|r| r.0 >= destroy_start && r.0 <= destroy_end)
        .count();
    let failed_after = log.iter().filter(|r| !r.2 && r.0 > destroy_end).count();
    println!(
        "    {ok_before} reads of 4 MiB succeeded before the destroy; {} were in progress when it began ({raced_ok} returned the snapshot's data, {} failed); {during} began during it; {failed_after} failed after it; the destroy took {} ms",
        raced.len(),
        raced.len() - raced_ok,
        destroy_end - destroy_start
    );
    if ok_before == 0 {
        fail!("no image read succeeded before the destroy");
    }
    if raced.is_empty() {
        fail!("no image read was in progress when the destroy began: the test proves nothing");
    }
    if log.iter().any(|r| r.2 && r.0 > destroy_end) {
        fail!("an image read that began after the destroy returned succeeded");
    }
    // The origin is whole: every sector holds one of the two patterns.
    let f = dev::open_direct(&c, false)?;
    let mut buf = AlignedBuf::new(REGION as usize, 0);
    f.read_exact_at(buf.as_mut_slice(), 0)
        .map_err(|e| e.to_string())?;
    let (mut a, mut b) = (vec![0u8; SECTOR as usize], vec![0u8; SECTOR as usize]);
    for (i, s) in buf.as_slice().chunks(SECTOR as usize).enumerate() {
        pattern(&mut a, i as u64, 21);
        pattern(&mut b, i as u64, 22);
        if s != a.as_slice() && s != b.as_slice() {
            fail!("origin sector {i} holds neither pattern");
        }
    }
    drop(t);
    Ok(())
}

/// A snapshot of a whole disk with a mounted ext4 file system on a
/// partition, under a writer: the partition inside the image is a clean,
/// frozen file system.
fn partitions_frozen() -> TestResult {
    let b = disk("blksnap-b")?;
    let part = dev::partition(&b, 2);
    let pdev = part.to_str().unwrap().to_string();
    dev::run("mkfs.ext4", &["-q", "-F", &pdev])?;
    let mnt = dev::scratch().join("part-mnt");
    let img_mnt = dev::scratch().join("part-img");
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&img_mnt).map_err(|e| e.to_string())?;
    dev::run("mount", &[&pdev, mnt.to_str().unwrap()])?;
    let r = (|| {
        let t = Tracked::new(&b)?;
        let sums = random_files(&mnt, 3)?;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, written, mnt) = (stop.clone(), written.clone(), mnt.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if std::fs::write(
                        mnt.join(format!("w{}", i % 16)),
                        i.to_le_bytes().repeat(4096),
                    )
                    .is_ok()
                    {
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        };
        std::thread::sleep(Duration::from_millis(1000));
        let snap = Snap::create(&dev::scratch(), 200 << 11)?;
        snap.add(&t.0)?;
        snap.take()?;
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        writer.join().map_err(|_| "writer panicked".to_string())?;
        println!(
            "    the writer wrote {} files",
            written.load(Ordering::Relaxed)
        );
        let image = t.image()?;
        let start = dev::sysfs_attr(&part, "start")?;
        let sectors = dev::size_sectors(&part)?;
        let lo = dev::run(
            "losetup",
            &[
                "--find",
                "--show",
                "--read-only",
                "--offset",
                &(start.parse::<u64>().map_err(|e| e.to_string())? * SECTOR).to_string(),
                "--sizelimit",
                &(sectors * SECTOR).to_string(),
                image.to_str().unwrap(),
            ],
        )?;
        let lo = lo.trim().to_string();
        let r = (|| {
            let features = dev::run("dumpe2fs", &["-h", &lo])?;
            if let Some(l) = features
                .lines()
                .find(|l| l.starts_with("Filesystem features"))
            {
                if l.contains("needs_recovery") {
                    fail!("the partition's file system in the image needs journal recovery: it was not frozen ({l})");
                }
            }
            dev::run("fsck.ext4", &["-n", "-f", &lo])
                .map_err(|err| format!("fsck -n of the partition in the image: {err}"))?;
            dev::run(
                "mount",
                &["-o", "ro,noload", &lo, img_mnt.to_str().unwrap()],
            )?;
            let r = (|| {
                for (name, sum) in &sums {
                    check_eq!(
                        sha256(&img_mnt.join(name))?,
                        *sum,
                        "checksum of {name} in the image"
                    );
                }
                Ok(())
            })();
            dev::run("umount", &[img_mnt.to_str().unwrap()])?;
            r
        })();
        let _ = dev::run("losetup", &["-d", &lo]);
        r?;
        snap.destroy()
    })();
    dev::run("umount", &[mnt.to_str().unwrap()])?;
    r
}
