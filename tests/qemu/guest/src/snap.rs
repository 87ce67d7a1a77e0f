// SPDX-License-Identifier: GPL-2.0

//! Snapshot tests. Disks: `blksnap-c` and `blksnap-d` (64 MiB each) for
//! snapshots, `blksnap-e` (400 MiB) for file systems.

use crate::dev::{self, AlignedBuf, SECTOR};
use crate::{check_eq, fail, TestResult};
use blksnap::{Control, MapKind, SnapshotId, Tracker};
use nix::errno::Errno;
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

type Test = (&'static str, fn() -> TestResult);

/// The snapshot tests, in the order they run.
pub const ALL: &[Test] = &[
    (
        "snapshot_image_keeps_the_pattern_file_store",
        image_keeps_pattern_tmpfile,
    ),
    (
        "snapshot_image_keeps_the_pattern_bdev_store",
        image_keeps_pattern_bdev,
    ),
    ("snapshot_file_store_grows", file_store_grows),
    ("snapshot_two_devices_one_cut", two_devices_one_cut),
    ("snapshot_two_snapshots_at_once", two_snapshots_at_once),
    (
        "snapshot_destroy_while_reading_and_writing",
        destroy_while_busy,
    ),
    ("snapshot_cbt_across_snapshots", cbt_across_snapshots),
    ("snapshot_live_ext4_and_xfs", live_filesystems),
    ("snapshot_bad_input", bad_input),
];

pub(crate) fn e(r: blksnap::Error) -> String {
    r.to_string()
}

pub(crate) fn disk(serial: &str) -> Result<PathBuf, String> {
    dev::disk_by_serial(serial)
}

/// A deterministic pseudo-random generator (xorshift64*).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Fills `buf` with the pattern of `sectors` sectors from `first`: each
/// 8-byte word holds the sector number, the seed and the word's index.
pub(crate) fn pattern(buf: &mut [u8], first: u64, seed: u64) {
    for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
        for (w, word) in sector.chunks_mut(8).enumerate() {
            let v = (first + i as u64) | (seed << 40) | ((w as u64) << 56);
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Writes the pattern `seed` over `count` sectors from `sector`, O_DIRECT.
pub(crate) fn write_pattern(dev: &Path, sector: u64, count: u64, seed: u64) -> TestResult {
    let f = dev::open_direct(dev, true)?;
    let step = 2048u64;
    let mut s = sector;
    while s < sector + count {
        let n = step.min(sector + count - s);
        let mut buf = AlignedBuf::new((n * SECTOR) as usize, 0);
        pattern(buf.as_mut_slice(), s, seed);
        f.write_all_at(buf.as_slice(), s * SECTOR)
            .map_err(|e| format!("write pattern at {s} of {}: {e}", dev.display()))?;
        s += n;
    }
    Ok(())
}

/// Reads the whole device with O_DIRECT and checks every sector against the
/// pattern whose seed `expect` gives for it (0: zeroes).
pub(crate) fn check_device(dev: &Path, expect: impl Fn(u64) -> u64) -> TestResult {
    let sectors = dev::size_sectors(dev)?;
    let f = dev::open_direct(dev, false)?;
    let step = 2048u64;
    let mut want = vec![0u8; (step * SECTOR) as usize];
    let mut s = 0;
    let mut bad = Vec::new();
    while s < sectors {
        let n = step.min(sectors - s);
        let mut buf = AlignedBuf::new((n * SECTOR) as usize, 0);
        f.read_exact_at(buf.as_mut_slice(), s * SECTOR)
            .map_err(|e| format!("read at sector {s} of {}: {e}", dev.display()))?;
        let got = buf.as_slice();
        for i in 0..n {
            let sector = s + i;
            let seed = expect(sector);
            let w = &mut want[..SECTOR as usize];
            if seed == 0 {
                w.fill(0);
            } else {
                pattern(w, sector, seed);
            }
            let g = &got[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
            if g != &*w {
                let found = u64::from_le_bytes(g[..8].try_into().unwrap());
                bad.push(format!(
                    "sector {sector}: want seed {seed}, found sector {} seed {}",
                    found & ((1 << 40) - 1),
                    (found >> 40) & 0xffff
                ));
            }
        }
        s += n;
    }
    if !bad.is_empty() {
        let n = bad.len();
        bad.truncate(5);
        fail!("{}: {n} wrong sectors: {}", dev.display(), bad.join("; "));
    }
    Ok(())
}

/// A snapshot destroyed when dropped.
pub(crate) struct Snap {
    pub(crate) id: SnapshotId,
    pub(crate) ctl: Control,
}

impl Snap {
    pub(crate) fn create(store: &Path, limit_sectors: u64) -> Result<Self, String> {
        let ctl = Control::open().map_err(e)?;
        let id = ctl.snapshot_create(store, limit_sectors).map_err(e)?;
        Ok(Self { id, ctl })
    }

    /// A snapshot whose storage is `ranges` (offset, count in sectors) of
    /// the block device `store`.
    pub(crate) fn devices(store: &Path, ranges: &[(u64, u64)]) -> Result<Self, String> {
        let ctl = Control::open().map_err(e)?;
        let id = ctl.snapshot_create_devices().map_err(e)?;
        let snap = Self { id, ctl };
        let ranges: Vec<blksnap::SectorRange> = ranges
            .iter()
            .map(|&(offset, count)| blksnap::SectorRange { offset, count })
            .collect();
        snap.ctl
            .snapshot_append_storage(&snap.id, store, &ranges)
            .map_err(e)?;
        Ok(snap)
    }

    pub(crate) fn memory(limit_sectors: u64) -> Result<Self, String> {
        let ctl = Control::open().map_err(e)?;
        let id = ctl.snapshot_create_memory(limit_sectors).map_err(e)?;
        Ok(Self { id, ctl })
    }

    pub(crate) fn add(&self, t: &Tracker) -> TestResult {
        t.snapshot_add(&self.id).map_err(e)
    }

    pub(crate) fn take(&self) -> TestResult {
        self.ctl.snapshot_take(&self.id).map_err(e)
    }

    /// Destroys the snapshot. The drop that follows closes the control file
    /// (its second destroy fails quietly with ESRCH).
    pub(crate) fn destroy(self) -> TestResult {
        self.ctl.snapshot_destroy(&self.id).map_err(e)
    }
}

impl Drop for Snap {
    fn drop(&mut self) {
        let _ = self.ctl.snapshot_destroy(&self.id);
    }
}

/// A tracker detached when dropped.
pub(crate) struct Tracked(pub(crate) Tracker);

impl Tracked {
    pub(crate) fn new(dev: &Path) -> Result<Self, String> {
        let t = Tracker::open(dev).map_err(e)?;
        t.attach().map_err(e)?;
        Ok(Self(t))
    }

    /// The image device of the snapshot the device is in.
    pub(crate) fn image(&self) -> Result<PathBuf, String> {
        image_of(&self.0)
    }
}

/// The image device of the snapshot a tracked device is in.
pub(crate) fn image_of(t: &Tracker) -> Result<PathBuf, String> {
    let info = t.snapshot_info().map_err(e)?;
    check_eq!(
        info.error_code,
        0,
        "snapshot error of {}",
        t.path().display()
    );
    if info.image.is_empty() {
        fail!("{} has no image", t.path().display());
    }
    let p = PathBuf::from(format!("/dev/{}", info.image));
    for _ in 0..100 {
        if p.exists() {
            return Ok(p);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fail!("{} did not appear", p.display())
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let _ = self.0.detach();
    }
}

/// Overwrites `n` random ranges (512 B to 4 MiB, unaligned) with pattern
/// `seed`; returns the overwritten sectors.
pub(crate) fn overwrite_random(
    dev: &Path,
    rng: &mut Rng,
    n: usize,
    seed: u64,
) -> Result<BTreeSet<u64>, String> {
    let sectors = dev::size_sectors(dev)?;
    let mut written = BTreeSet::new();
    for _ in 0..n {
        let len = 1 + rng.below(8192);
        let start = rng.below(sectors - len.min(sectors - 1));
        let len = len.min(sectors - start);
        write_pattern(dev, start, len, seed)?;
        written.extend(start..start + len);
    }
    Ok(written)
}

/// The pattern test with a given store.
fn pattern_test(store: &Path, limit: u64, seed: u64) -> TestResult {
    pattern_test_with(|| Snap::create(store, limit), seed, 40)
}

/// The pattern test: fill, snapshot with `create`, overwrite `writes` random
/// ranges, check every sector of the image and of the origin.
pub(crate) fn pattern_test_with(
    create: impl FnOnce() -> Result<Snap, String>,
    seed: u64,
    writes: usize,
) -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, seed)?;
    let snap = create()?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    check_eq!(dev::size_sectors(&image)?, size, "image size");
    check_eq!(
        dev::sysfs_attr(&image, "queue/logical_block_size")?,
        dev::sysfs_attr(&c, "queue/logical_block_size")?,
        "image logical block size"
    );
    // Bios reach the image cut at chunk borders, and as large as a chunk.
    let shift: u32 = std::fs::read_to_string("/sys/module/blksnap/parameters/chunk_minimum_shift")
        .map_err(|e| format!("chunk_minimum_shift: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("chunk_minimum_shift: {e}"))?;
    let chunk_bytes = 1u64 << shift;
    check_eq!(
        dev::sysfs_attr(&image, "queue/chunk_sectors")?,
        (chunk_bytes / SECTOR).to_string(),
        "image chunk_sectors"
    );
    check_eq!(
        dev::sysfs_attr(&image, "queue/optimal_io_size")?,
        chunk_bytes.to_string(),
        "image optimal_io_size"
    );
    check_eq!(
        dev::sysfs_attr(&image, "queue/max_hw_sectors_kb")?,
        (chunk_bytes.max(1 << 20) >> 10).to_string(),
        "image max_hw_sectors_kb"
    );
    let mut rng = Rng(seed * 7919 + 1);
    let written = overwrite_random(&c, &mut rng, writes, seed + 1)?;
    // Every sector of the image is the old pattern, of the origin the new.
    check_device(&image, |_| seed)?;
    check_device(&c, |s| if written.contains(&s) { seed + 1 } else { seed })?;
    // Buffered, unaligned reads of the image.
    let f = std::fs::File::open(&image).map_err(|e| e.to_string())?;
    for _ in 0..20 {
        let off = rng.below(size * SECTOR - 70_000);
        let len = 1 + rng.below(65_536) as usize;
        let mut got = vec![0u8; len];
        f.read_exact_at(&mut got, off)
            .map_err(|e| format!("read image at {off}: {e}"))?;
        let first = off / SECTOR;
        let mut want =
            vec![0u8; ((off + len as u64).div_ceil(SECTOR) - first) as usize * SECTOR as usize];
        pattern(&mut want, first, seed);
        let skip = (off - first * SECTOR) as usize;
        if got != want[skip..skip + len] {
            fail!("buffered read of {len} bytes at {off} differs from the snapshot");
        }
    }
    let info = t.0.snapshot_info().map_err(e)?;
    check_eq!(info.error_code, 0, "snapshot error");
    snap.destroy()?;
    if image.exists() {
        fail!("{} still exists after destroy", image.display());
    }
    check_eq!(
        t.0.snapshot_info().map_err(e)?.image,
        "",
        "image after destroy"
    );
    Ok(())
}

fn image_keeps_pattern_tmpfile() -> TestResult {
    pattern_test(&dev::scratch(), 128 << 11, 3)
}

fn image_keeps_pattern_bdev() -> TestResult {
    pattern_test(&disk("blksnap-d")?, 0, 5)
}

fn file_store_grows() -> TestResult {
    // A 1 MiB file that may grow to 96 MiB in the 1 GiB default steps, which
    // the limit clips.
    let path = &dev::scratch().join("blksnap-store");
    let f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    f.set_len(1 << 20).map_err(|e| e.to_string())?;
    drop(f);
    let r = pattern_test(path, 96 << 11, 9);
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    std::fs::remove_file(path).ok();
    r?;
    check_eq!(len, 96 << 20, "store file size after growing to the limit");
    Ok(())
}

fn two_devices_one_cut() -> TestResult {
    let (c, d) = (disk("blksnap-c")?, disk("blksnap-d")?);
    let (tc, td) = (Tracked::new(&c)?, Tracked::new(&d)?);
    for dev in [&c, &d] {
        dev::write_direct(dev, 0, 8, 0)?;
    }
    // The writer alternates: sequence n goes to c if even, to d if odd, each
    // write done before the next starts.
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, seq, c, d) = (stop.clone(), seq.clone(), c.clone(), d.clone());
        std::thread::spawn(move || -> TestResult {
            let fc = dev::open_direct(&c, true)?;
            let fd = dev::open_direct(&d, true)?;
            let mut buf = AlignedBuf::new(4096, 0);
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                buf.as_mut_slice()[..8].copy_from_slice(&n.to_le_bytes());
                let f = if n.is_multiple_of(2) { &fc } else { &fd };
                f.write_all_at(buf.as_slice(), 0)
                    .map_err(|e| e.to_string())?;
                seq.store(n, Ordering::Relaxed);
                n += 1;
            }
            Ok(())
        })
    };
    while seq.load(Ordering::Relaxed) < 20 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let snap = Snap::create(&dev::scratch(), 64 << 11)?;
    snap.add(&tc.0)?;
    snap.add(&td.0)?;
    snap.take()?;
    let before = seq.load(Ordering::Relaxed);
    std::thread::sleep(std::time::Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    writer.join().map_err(|_| "writer panicked".to_string())??;
    let after = seq.load(Ordering::Relaxed);
    let first = |dev: &Path| -> Result<u64, String> {
        let data = dev::read_direct(dev, 0, 8)?;
        Ok(u64::from_le_bytes(data[..8].try_into().unwrap()))
    };
    let (ic, id) = (first(&tc.image()?)?, first(&td.image()?)?);
    println!("    cut at sequence {ic}/{id}; {before} writes before take returned, {after} in all");
    if ic.abs_diff(id) != 1 {
        fail!("images show c at {ic} and d at {id}: not one cut");
    }
    if ic.max(id) > before + 1 || ic.max(id) == 0 {
        fail!(
            "cut at {} is not between the start and the end of take ({before})",
            ic.max(id)
        );
    }
    if after <= before {
        fail!("the writer made no progress after the snapshot");
    }
    snap.destroy()
}

fn two_snapshots_at_once() -> TestResult {
    let (c, d) = (disk("blksnap-c")?, disk("blksnap-d")?);
    let (tc, td) = (Tracked::new(&c)?, Tracked::new(&d)?);
    write_pattern(&c, 0, dev::size_sectors(&c)?, 11)?;
    write_pattern(&d, 0, dev::size_sectors(&d)?, 13)?;
    let (s1, s2) = (
        Snap::create(&dev::scratch(), 64 << 11)?,
        Snap::create(&dev::scratch(), 64 << 11)?,
    );
    s1.add(&tc.0)?;
    s2.add(&td.0)?;
    // A device belongs to one snapshot only.
    check_eq!(
        tc.0.snapshot_add(&s2.id).map_err(|e| e.errno),
        Err(Errno::EBUSY),
        "adding a device to a second snapshot"
    );
    s1.take()?;
    s2.take()?;
    let ids = Control::open().map_err(e)?.snapshot_collect().map_err(e)?;
    check_eq!(ids.len(), 2, "snapshots listed");
    let (ic, id) = (tc.image()?, td.image()?);
    if ic == id {
        fail!("both snapshots have image {}", ic.display());
    }
    let mut rng = Rng(99);
    overwrite_random(&c, &mut rng, 10, 12)?;
    overwrite_random(&d, &mut rng, 10, 14)?;
    s1.destroy()?;
    // The other snapshot is unaffected.
    overwrite_random(&d, &mut rng, 10, 14)?;
    check_device(&id, |_| 13)?;
    if ic.exists() {
        fail!("{} survived its snapshot", ic.display());
    }
    check_eq!(
        Control::open().map_err(e)?.snapshot_collect().map_err(e)?,
        vec![s2.id],
        "remaining"
    );
    s2.destroy()
}

fn destroy_while_busy() -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 21)?;
    let snap = Snap::create(&dev::scratch(), 64 << 11)?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = std::time::Instant::now();
    // Every read: when it began and ended (ms since t0) and whether it
    // succeeded. A read that succeeds must return the snapshot's data. Four
    // readers, so that reads are in progress at any time.
    let mut expect = vec![0u8; (size * SECTOR) as usize];
    pattern(&mut expect, 0, 21);
    let expect = Arc::new(expect);
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let (stop, image, expect) = (stop.clone(), image.clone(), expect.clone());
            std::thread::spawn(move || -> Result<Vec<(u128, u128, bool)>, String> {
                let f = dev::open_direct(&image, false)?;
                let mut reads = Vec::new();
                let mut buf = AlignedBuf::new(1 << 20, 0);
                let mut off = i << 24;
                while !stop.load(Ordering::Relaxed) {
                    let start = t0.elapsed().as_millis();
                    let r = f.read_exact_at(buf.as_mut_slice(), off);
                    let end = t0.elapsed().as_millis();
                    match r {
                        Ok(()) => {
                            let want = &expect[off as usize..off as usize + (1 << 20)];
                            if buf.as_slice() != want {
                                return Err(format!(
                                    "image read at {off}, from {start} to {end} ms, returned data that is not the snapshot's"
                                ));
                            }
                        }
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                    reads.push((start, end, r.is_ok()));
                    off = (off + (1 << 20)) % (size * SECTOR);
                }
                Ok(reads)
            })
        })
        .collect();
    let writer = {
        let (stop, c) = (stop.clone(), c.clone());
        std::thread::spawn(move || -> Result<BTreeSet<u64>, String> {
            let mut rng = Rng(5);
            let mut written = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                written.extend(overwrite_random(&c, &mut rng, 1, 22)?);
            }
            Ok(written)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let destroy_start = t0.elapsed().as_millis();
    snap.destroy()?;
    let destroy_end = t0.elapsed().as_millis();
    std::thread::sleep(std::time::Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut reads = Vec::new();
    for r in readers {
        reads.extend(r.join().map_err(|_| "reader panicked".to_string())??);
    }
    let written = writer.join().map_err(|_| "writer panicked".to_string())??;
    let ok_before = reads.iter().filter(|r| r.2 && r.1 < destroy_start).count();
    let raced: Vec<_> = reads
        .iter()
        .filter(|r| r.0 < destroy_start && r.1 >= destroy_start)
        .collect();
    let after: Vec<_> = reads.iter().filter(|r| r.0 > destroy_end).collect();
    println!(
        "    {ok_before} image reads succeeded before the destroy; {} were in progress when it began ({} returned the snapshot's data, the others failed); {} began after it and failed; {} sectors written",
        raced.len(),
        raced.iter().filter(|r| r.2).count(),
        after.len(),
        written.len()
    );
    if ok_before == 0 {
        fail!("no image read succeeded before the destroy");
    }
    if raced.is_empty() {
        fail!("no image read was in progress when the destroy began: nothing raced it");
    }
    if after.is_empty() {
        fail!("no image read was tried after the destroy");
    }
    if after.iter().any(|r| r.2) {
        fail!("an image read that began after the destroy succeeded");
    }
    // The origin got every write, the snapshot's end notwithstanding.
    check_device(&c, |s| if written.contains(&s) { 22 } else { 21 })
}

fn cbt_across_snapshots() -> TestResult {
    let c = disk("blksnap-c")?;
    let t = Tracked::new(&c)?;
    let bs = u64::from(t.0.cbt_info().map_err(e)?.block_size);
    let blocks = |ranges: &[(u64, u64)]| -> BTreeSet<usize> {
        ranges
            .iter()
            .flat_map(|&(s, n)| {
                (s * SECTOR / bs) as usize..=((s + n) * SECTOR - 1) as usize / bs as usize
            })
            .collect()
    };
    let take = || -> TestResult {
        let s = Snap::create(&dev::scratch(), 64 << 11)?;
        s.add(&t.0)?;
        s.take()?;
        s.destroy()
    };
    let a = [(0u64, 8u64), (1000, 300), (50_000, 1)];
    for &(s, n) in &a {
        dev::write_direct(&c, s, n, 1)?;
    }
    take()?;
    check_eq!(
        t.0.cbt_info().map_err(e)?.changes_number,
        1,
        "changes number after take 1"
    );
    let b = [(1200u64, 8u64), (90_000, 2048)];
    for &(s, n) in &b {
        dev::write_direct(&c, s, n, 2)?;
    }
    take()?;
    check_eq!(
        t.0.cbt_info().map_err(e)?.changes_number,
        2,
        "changes number after take 2"
    );
    let map = t.0.read_cbt_map(MapKind::Snapshot).map_err(e)?;
    let (ab, bb) = (blocks(&a), blocks(&b));
    let mut wrong = Vec::new();
    for (i, &n) in map.iter().enumerate() {
        let want = if bb.contains(&i) {
            2
        } else if ab.contains(&i) {
            1
        } else {
            0
        };
        if n != want {
            wrong.push(format!("block {i}: {n} (want {want})"));
        }
    }
    if !wrong.is_empty() {
        fail!("snapshot map: {}", wrong.join(", "));
    }
    let changed: BTreeSet<usize> = map
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 1)
        .map(|(i, _)| i)
        .collect();
    check_eq!(changed, bb, "blocks changed between take 1 and take 2");
    Ok(())
}

/// Writes `n` files of random data, `file0` of 1 MiB, `file1` of 2 MiB...,
/// into `dir`, syncs, and returns their names and SHA-256 sums.
pub(crate) fn random_files(dir: &Path, n: usize) -> Result<Vec<(String, String)>, String> {
    let mut sums = Vec::new();
    for i in 0..n {
        let p = dir.join(format!("file{i}"));
        dev::run(
            "dd",
            &[
                "if=/dev/urandom",
                &format!("of={}", p.display()),
                "bs=1M",
                &format!("count={}", i + 1),
                "status=none",
            ],
        )?;
        sums.push((format!("file{i}"), sha256(&p)?));
    }
    dev::run("sync", &[])?;
    Ok(sums)
}

pub(crate) fn sha256(path: &Path) -> Result<String, String> {
    let out = dev::run("sha256sum", &[path.to_str().unwrap()])?;
    Ok(out.split_whitespace().next().unwrap_or("").to_string())
}

fn fs_test(fs: &str, mkfs: &[&str], mount_opts: &str, fsck: &[&str]) -> TestResult {
    let e_disk = disk("blksnap-e")?;
    let dev = e_disk.to_str().unwrap();
    let mut args = mkfs.to_vec();
    args.push(dev);
    dev::run(args[0], &args[1..])?;
    let mnt = dev::scratch().join(format!("mnt-{fs}"));
    let img_mnt = dev::scratch().join(format!("img-{fs}"));
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&img_mnt).map_err(|e| e.to_string())?;
    dev::run("mount", &[dev, mnt.to_str().unwrap()])?;
    let r = (|| {
        let t = Tracked::new(&e_disk)?;
        // Files with known content, checksummed before the snapshot.
        let sums = random_files(&mnt, 4)?;
        let mut fio = std::process::Command::new("fio")
            .args([
                "--name=live",
                &format!("--directory={}", mnt.display()),
                "--rw=randwrite",
                "--bs=4k",
                "--size=16M",
                "--time_based",
                "--runtime=6",
                "--ioengine=psync",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("fio: {e}"))?;
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let snap = Snap::create(&dev::scratch(), 200 << 11)?;
        snap.add(&t.0)?;
        snap.take()?;
        if let Some(line) = dev::run("dmesg", &[])?
            .lines()
            .rev()
            .find(|l| l.contains("frozen for"))
        {
            println!(
                "    {fs} under fio: {}",
                line.split("taken: ").nth(1).unwrap_or(line)
            );
        }
        // Files written after the snapshot must not show in the image.
        std::fs::write(mnt.join("after"), b"after").map_err(|e| e.to_string())?;
        for i in 0..4 {
            dev::run(
                "dd",
                &[
                    "if=/dev/zero",
                    &format!("of={}", mnt.join(format!("file{i}")).display()),
                    "bs=4k",
                    "count=1",
                    "conv=notrunc",
                    "status=none",
                ],
            )?;
        }
        let status = fio.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            fail!("fio failed");
        }
        let image = t.image()?;
        let mut fsck_args = fsck.to_vec();
        let img = image.to_str().unwrap().to_string();
        fsck_args.push(&img);
        if let Err(err) = dev::run(fsck_args[0], &fsck_args[1..]) {
            // A frozen XFS keeps the records that cover its log, which
            // xfs_repair -n reports as unreplayed changes (exit status 1):
            // replaying needs a writable image. Anything else it reports
            // is a real inconsistency.
            let benign = fs == "xfs"
                && err.contains("ALERT: The filesystem has valuable metadata changes in a log")
                && !err.lines().any(|l| {
                    let l = l.to_lowercase();
                    (l.contains("would") || l.contains("corrupt") || l.contains("error"))
                        && !l.contains("log which is being")
                });
            if !benign {
                fail!("fsck of the image: {err}");
            }
            println!("    xfs_repair -n: only the log covering records of the freeze");
        }
        dev::run(
            "mount",
            &["-o", mount_opts, &img, img_mnt.to_str().unwrap()],
        )?;
        let r = (|| {
            for (name, sum) in &sums {
                check_eq!(
                    sha256(&img_mnt.join(name))?,
                    *sum,
                    "{fs}: checksum of {name} in the image"
                );
            }
            if img_mnt.join("after").exists() {
                fail!("{fs}: a file created after the snapshot is in the image");
            }
            Ok(())
        })();
        dev::run("umount", &[img_mnt.to_str().unwrap()])?;
        r?;
        snap.destroy()
    })();
    dev::run("umount", &[mnt.to_str().unwrap()])?;
    r
}

fn live_filesystems() -> TestResult {
    fs_test(
        "ext4",
        &["mkfs.ext4", "-q", "-F"],
        "ro,noload",
        &["fsck.ext4", "-n", "-f"],
    )?;
    if dev::run("which", &["mkfs.xfs"]).is_ok() {
        fs_test(
            "xfs",
            &["mkfs.xfs", "-q", "-f"],
            "ro,norecovery,nouuid",
            &["xfs_repair", "-n", "-v"],
        )?;
        println!("    ext4 and xfs");
    } else {
        println!("    ext4 only: no mkfs.xfs");
    }
    Ok(())
}

fn bad_input() -> TestResult {
    let (c, d) = (disk("blksnap-c")?, disk("blksnap-d")?);
    let ctl = Control::open().map_err(e)?;
    let unknown = SnapshotId([0x5a; 16]);
    check_eq!(
        ctl.snapshot_take(&unknown).map_err(|e| e.errno),
        Err(Errno::ESRCH),
        "take an unknown snapshot"
    );
    check_eq!(
        ctl.snapshot_destroy(&unknown).map_err(|e| e.errno),
        Err(Errno::ESRCH),
        "destroy an unknown snapshot"
    );
    let tc = Tracked::new(&c)?;
    check_eq!(
        tc.0.snapshot_add(&unknown).map_err(|e| e.errno),
        Err(Errno::ESRCH),
        "add to an unknown snapshot"
    );
    check_eq!(
        ctl.snapshot_create(Path::new("/nonexistent/dir"), 1 << 20)
            .map_err(|e| e.errno),
        Err(Errno::ENOENT),
        "a store path that does not exist"
    );
    let ro = &dev::scratch().join("ro");
    std::fs::create_dir_all(ro).map_err(|e| e.to_string())?;
    dev::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "ro,size=1M",
            "none",
            ro.to_str().unwrap(),
        ],
    )?;
    let r = ctl.snapshot_create(ro, 1 << 20).map_err(|e| e.errno);
    dev::run("umount", &[ro.to_str().unwrap()])?;
    check_eq!(
        r,
        Err(Errno::EROFS),
        "a store directory on a read-only file system"
    );
    check_eq!(
        ctl.snapshot_create(&dev::scratch(), 8).map_err(|e| e.errno),
        Err(Errno::EINVAL),
        "a limit smaller than a chunk"
    );
    // The store on a device of the same snapshot.
    let s = Snap::create(&d, 0)?;
    let td = Tracked::new(&d)?;
    check_eq!(
        td.0.snapshot_add(&s.id).map_err(|e| e.errno),
        Err(Errno::EINVAL),
        "store on the snapshotted device"
    );
    s.add(&tc.0)?;
    check_eq!(
        tc.0.snapshot_add(&s.id).map_err(|e| e.errno),
        Err(Errno::EALREADY),
        "add a device twice"
    );
    s.take()?;
    check_eq!(
        ctl.snapshot_take(&s.id).map_err(|e| e.errno),
        Err(Errno::EALREADY),
        "take twice"
    );
    tc.image()?;
    // A bad address for the storage path and for the argument.
    let mut arg = blk_snap_logic::uapi::BlksnapSnapshotCreate {
        diff_storage_limit_sect: 1 << 20,
        diff_storage_filename: 16,
        ..Default::default()
    };
    // SAFETY: the kernel must reject the bad path address.
    let r = unsafe { blksnap::raw::blksnap_create(ctl.as_raw_fd(), &mut arg) };
    check_eq!(r, Err(Errno::EFAULT), "a bad storage path address");
    // SAFETY: the kernel must reject the bad argument address.
    let r = unsafe {
        nix::libc::ioctl(
            ctl.as_raw_fd(),
            blk_snap_logic::uapi::IOCTL_BLKSNAP_SNAPSHOT_TAKE as _,
            16usize,
        )
    };
    check_eq!(
        (r, Errno::last()),
        (-1, Errno::EFAULT),
        "take with a bad argument address"
    );
    // COLLECT sizing: too small a count fills nothing and says how many.
    let mut ids = [blk_snap_logic::uapi::BlksnapUuid::default(); 1];
    let mut col = blk_snap_logic::uapi::BlksnapSnapshotCollect {
        count: 0,
        ids: ids.as_mut_ptr() as u64,
    };
    // SAFETY: valid argument.
    let r = unsafe { blksnap::raw::blksnap_collect(ctl.as_raw_fd(), &mut col) };
    check_eq!(
        (r, col.count, ids[0].b),
        (Err(Errno::ENODATA), 1, [0u8; 16]),
        "COLLECT with count 0"
    );
    s.destroy()
}
