// SPDX-License-Identifier: GPL-2.0

//! Devices and stores whose sizes are not multiples of 4 KiB: the odd-sized
//! disk `blksnap-f` (131073 sectors, so its last 256 KiB chunk has a single
//! sector) snapshotted with every kind of difference storage, and stores on
//! devices with 4 KiB logical sectors.

use crate::dev::{self, SECTOR};
use crate::snap::{check_device, disk, e, pattern, write_pattern, Snap, Tracked};
use crate::{check_eq, fail, TestResult};
use blksnap::{Control, SectorRange};
use nix::errno::Errno;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

type Test = (&'static str, fn() -> TestResult);

/// The odd-size tests, in the order they run.
pub const ALL: &[Test] = &[
    ("odd_memory_store", memory_store),
    ("odd_file_store_on_tmpfs", file_store_tmpfs),
    ("odd_file_store_on_ext4_with_4k_sectors", file_store_ext4_4k),
    ("odd_bdev_store_with_4k_sectors", bdev_store_4k),
    (
        "odd_device_ranges_store_with_4k_sectors",
        device_ranges_store_4k,
    ),
    ("odd_device_ranges_alignment", device_ranges_alignment),
];

const MIB_SECTORS: u64 = 2048;

/// Size of `blksnap-f`.
const ODD_SECTORS: u64 = 131_073;

/// A loop device with 4 KiB logical sectors over a sparse file on the
/// scratch tmpfs, detached and deleted on drop.
struct Loop4k {
    path: PathBuf,
    backing: PathBuf,
}

impl Loop4k {
    fn new(name: &str, bytes: u64) -> Result<Self, String> {
        let backing = dev::scratch().join(format!("{name}.img"));
        let f = std::fs::File::create(&backing).map_err(|e| e.to_string())?;
        f.set_len(bytes).map_err(|e| e.to_string())?;
        drop(f);
        let out = dev::run(
            "losetup",
            &[
                "--find",
                "--show",
                "--sector-size",
                "4096",
                backing.to_str().unwrap(),
            ],
        );
        let out = match out {
            Ok(out) => out,
            Err(err) => {
                let _ = std::fs::remove_file(&backing);
                return Err(err);
            }
        };
        let lo = Self {
            path: PathBuf::from(out.trim()),
            backing,
        };
        check_eq!(
            dev::sysfs_attr(&lo.path, "queue/logical_block_size")?,
            "4096",
            "logical block size of {}",
            lo.path.display()
        );
        Ok(lo)
    }
}

impl Drop for Loop4k {
    fn drop(&mut self) {
        let _ = dev::run("losetup", &["-d", self.path.to_str().unwrap()]);
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// Reads sector `s` of `dev` with a 512-byte O_DIRECT read and checks it
/// holds pattern `seed`.
fn check_sector(dev: &Path, s: u64, seed: u64) -> TestResult {
    let got = dev::read_direct(dev, s, 1)?;
    let mut want = vec![0u8; SECTOR as usize];
    pattern(&mut want, s, seed);
    if got != want {
        let found = u64::from_le_bytes(got[..8].try_into().unwrap());
        fail!(
            "{} sector {s} (512-byte O_DIRECT read): want seed {seed}, found sector {} seed {}",
            dev.display(),
            found & ((1 << 40) - 1),
            (found >> 40) & 0xffff
        );
    }
    Ok(())
}

/// Writes pattern `seed` over each range of `dev` in order, O_DIRECT, and
/// adds the sectors to `written`.
fn write_ranges(
    dev: &Path,
    ranges: &[(u64, u64)],
    seed: u64,
    written: &mut BTreeSet<u64>,
) -> TestResult {
    for &(s, n) in ranges {
        write_pattern(dev, s, n, seed)?;
        written.extend(s..s + n);
    }
    Ok(())
}

/// Writes to the odd disk f, in this order: its last sector (the chunk of
/// one sector is the first one stored), then chunks that are stored after
/// it: 0, 9 and 10, 126 (with a 4 KiB block and these four chunks, the
/// first range of [`device_ranges_store_4k`] is full), 255, and across the
/// last two chunks.
const F_WRITES: &[(u64, u64)] = &[
    (ODD_SECTORS - 1, 1),
    (0, 8),
    (5000, 600),
    (65_000, 1),
    (130_560, 512),
    (131_000, 73),
];

/// Writes to disk c, after f's last chunk was stored.
const C_WRITES: &[(u64, u64)] = &[(0, 512), (1001, 3), (70_000, 2048), (131_071, 1)];

/// The scenario: fill f (odd-sized) and c with patterns, snapshot both with
/// the storage `create` makes, write to f's last sector first, then to
/// other chunks of f and c, and check every sector of the images and the
/// origins, 512-byte O_DIRECT image reads at odd places, and 512-byte
/// O_DIRECT writes through f's image. `after_writes` runs once the writes
/// to the origins are done.
fn odd_scenario(
    create: impl FnOnce() -> Result<Snap, String>,
    seed: u64,
    after_writes: impl FnOnce() -> TestResult,
) -> TestResult {
    let (f, c) = (disk("blksnap-f")?, disk("blksnap-c")?);
    let fsize = dev::size_sectors(&f)?;
    check_eq!(fsize, ODD_SECTORS, "size of blksnap-f");
    let csize = dev::size_sectors(&c)?;
    let (tf, tc) = (Tracked::new(&f)?, Tracked::new(&c)?);
    let (fseed, cseed) = (seed, seed + 100);
    write_pattern(&f, 0, fsize, fseed)?;
    write_pattern(&c, 0, csize, cseed)?;
    let snap = create()?;
    snap.add(&tf.0)?;
    snap.add(&tc.0)?;
    snap.take()?;
    let (imf, imc) = (tf.image()?, tc.image()?);
    check_eq!(dev::size_sectors(&imf)?, fsize, "image size of f");

    let (mut wf, mut wc) = (BTreeSet::new(), BTreeSet::new());
    write_ranges(&f, F_WRITES, fseed + 1, &mut wf)?;
    write_ranges(&c, C_WRITES, cseed + 1, &mut wc)?;
    let errors = (
        tf.0.snapshot_info().map_err(e)?.error_code,
        tc.0.snapshot_info().map_err(e)?.error_code,
    );
    check_eq!(errors, (0, 0), "SNAPSHOTINFO error codes of f and c");
    after_writes()?;

    // Every sector of the images is the old pattern, of the origins the new.
    check_device(&imf, |_| fseed)?;
    check_device(&imc, |_| cseed)?;
    check_device(&f, |s| if wf.contains(&s) { fseed + 1 } else { fseed })?;
    check_device(&c, |s| if wc.contains(&s) { cseed + 1 } else { cseed })?;
    // 512-byte O_DIRECT image reads: the last sector, and odd sectors of
    // stored chunks (parts of 4 KiB blocks of the storage).
    for s in [fsize - 1, fsize - 2, 1, 5001, 5003, 5119, 65_001, 130_999] {
        check_sector(&imf, s, fseed)?;
    }
    for s in [1001, 1003, 70_001, csize - 1] {
        check_sector(&imc, s, cseed)?;
    }

    // 512-byte O_DIRECT writes through f's image: the last sector, an odd
    // sector of a stored chunk, and one of a chunk not stored yet.
    let mut wimg = BTreeSet::new();
    write_ranges(
        &imf,
        &[(fsize - 1, 1), (5003, 1), (100_001, 1)],
        fseed + 2,
        &mut wimg,
    )?;
    for &s in &wimg {
        check_sector(&imf, s, fseed + 2)?;
    }
    check_sector(&imf, fsize - 2, fseed)?;
    check_device(&imf, |s| if wimg.contains(&s) { fseed + 2 } else { fseed })?;
    // The origin has none of it.
    check_device(&f, |s| if wf.contains(&s) { fseed + 1 } else { fseed })?;
    let errors = (
        tf.0.snapshot_info().map_err(e)?.error_code,
        tc.0.snapshot_info().map_err(e)?.error_code,
    );
    check_eq!(
        errors,
        (0, 0),
        "SNAPSHOTINFO error codes after image writes"
    );
    println!(
        "    f: {} sectors written, c: {}, image of f: {}; all checked",
        wf.len(),
        wc.len(),
        wimg.len()
    );
    snap.destroy()
}

fn memory_store() -> TestResult {
    odd_scenario(|| Snap::memory(64 * MIB_SECTORS), 1, || Ok(()))
}

fn file_store_tmpfs() -> TestResult {
    odd_scenario(
        || Snap::create(&dev::scratch(), 64 * MIB_SECTORS),
        3,
        || Ok(()),
    )
}

/// A file store on ext4 on a device with 4 KiB logical sectors, where
/// direct I/O must be aligned to 4 KiB.
fn file_store_ext4_4k() -> TestResult {
    let lo = Loop4k::new("odd-ext4", 256 << 20)?;
    let lo_path = lo.path.to_str().unwrap();
    dev::run("mkfs.ext4", &["-q", "-F", lo_path])?;
    let mnt = dev::scratch().join("odd-ext4");
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    dev::run("mount", &[lo_path, mnt.to_str().unwrap()])?;
    let r = odd_scenario(|| Snap::create(&mnt, 64 * MIB_SECTORS), 5, || Ok(()));
    let u = dev::run("umount", &[mnt.to_str().unwrap()]);
    r?;
    u.map(|_| ())
}

/// A whole loop device with 4 KiB logical sectors as the store.
fn bdev_store_4k() -> TestResult {
    let lo = Loop4k::new("odd-bdev", 32 << 20)?;
    odd_scenario(|| Snap::create(&lo.path, 0), 7, || Ok(()))
}

/// Appends `ranges` of `dev` to the device-range storage of `snap`.
fn append(snap: &Snap, dev: &Path, ranges: &[(u64, u64)]) -> Result<(), Errno> {
    let ranges: Vec<SectorRange> = ranges
        .iter()
        .map(|&(offset, count)| SectorRange { offset, count })
        .collect();
    snap.ctl
        .snapshot_append_storage(&snap.id, dev, &ranges)
        .map_err(|e| e.errno)
}

/// A snapshot with an empty storage of device ranges.
fn devices_snap() -> Result<Snap, String> {
    let ctl = Control::open().map_err(e)?;
    let id = ctl.snapshot_create_devices().map_err(e)?;
    Ok(Snap { id, ctl })
}

/// Device ranges: a first range of a 4 KiB-sector loop device that holds
/// exactly a 4 KiB block and four chunks, then a range of disk d (512-byte
/// sectors) that starts at an odd sector.
fn device_ranges_store_4k() -> TestResult {
    let lo = Loop4k::new("odd-ranges", 32 << 20)?;
    let d = disk("blksnap-d")?;
    let seed = 9;
    odd_scenario(
        || {
            let snap = devices_snap()?;
            append(
                &snap,
                &lo.path,
                &[(8, 8 + 4 * 512), (8 * MIB_SECTORS, 8 * MIB_SECTORS)],
            )
            .map_err(|e| format!("append the 4 KiB-sector ranges: {e}"))?;
            append(&snap, &d, &[(3, 16 * MIB_SECTORS)])
                .map_err(|e| format!("append a range of d: {e}"))?;
            Ok(snap)
        },
        seed,
        || {
            // The 4 KiB block of f's last chunk and four chunks filled the
            // first range; the second range has f's chunk 255, placed on
            // the first 4 KiB block of the range (sector 8, not 3).
            let got = dev::read_direct(&lo.path, 8 * MIB_SECTORS, 512)?;
            let mut want = vec![0u8; 512 * SECTOR as usize];
            pattern(&mut want, 130_560, seed);
            if got != want {
                fail!("the second range does not start with chunk 255 of f");
            }
            Ok(())
        },
    )
}

/// Ranges of a device with 4 KiB logical sectors must be whole logical
/// blocks; of a device with 512-byte sectors, the whole 4 KiB blocks in a
/// range are used, and a range without one is refused.
fn device_ranges_alignment() -> TestResult {
    let lo = Loop4k::new("odd-align", 16 << 20)?;
    let d = disk("blksnap-d")?;
    let snap = devices_snap()?;
    let log_before = dev::run("dmesg", &[])?.lines().count();
    check_eq!(
        append(&snap, &lo.path, &[(4, 2048)]),
        Err(Errno::EINVAL),
        "a range of a 4 KiB-sector device that starts inside a logical block"
    );
    check_eq!(
        append(&snap, &lo.path, &[(8, 2044)]),
        Err(Errno::EINVAL),
        "a range of a 4 KiB-sector device that ends inside a logical block"
    );
    let log = dev::run("dmesg", &[])?;
    let new: Vec<&str> = log.lines().skip(log_before).collect();
    let Some(line) = new
        .iter()
        .find(|l| l.contains("not on logical blocks of 4096 bytes"))
    else {
        fail!("no kernel log line for the refused range: {new:?}");
    };
    println!("    {}", line.split("] ").nth(1).unwrap_or(line));
    check_eq!(
        append(&snap, &lo.path, &[(8, 2048), (4096, 8)]),
        Ok(()),
        "whole logical blocks"
    );
    check_eq!(
        append(&snap, &d, &[(3, 100)]),
        Ok(()),
        "a range of a 512-byte-sector device at an odd sector"
    );
    check_eq!(
        append(&snap, &d, &[(1001, 6)]),
        Err(Errno::EINVAL),
        "a range of a 512-byte-sector device without a whole 4 KiB block"
    );
    snap.destroy()
}
