// SPDX-License-Identifier: GPL-2.0

//! The guest tests. Disks (set up by tests/qemu/run.sh):
//! - serial `blksnap-a`: 256 MiB, no partition table;
//! - serial `blksnap-b`: 256 MiB, partition 1 at sector 2048 (65536 sectors),
//!   partition 2 at sector 67600 (deliberately not aligned to a CBT block) to
//!   the end.

use crate::dev::{self, SECTOR};
use crate::{check_eq, fail, TestResult};
use blk_snap_logic::uapi::{self, ctl};
use blksnap::{raw, Control, MapKind, SectorRange, Tracker};
use nix::errno::Errno;
use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

type Test = (&'static str, fn() -> TestResult);

/// All tests, in the order they run.
pub const ALL: &[Test] = &[
    ("control_device_version", control_device_version),
    (
        "whole_disk_writes_mark_exact_blocks",
        whole_disk_writes_mark_exact_blocks,
    ),
    ("reads_mark_nothing", reads_mark_nothing),
    (
        "discard_and_write_zeroes_mark_blocks",
        discard_and_write_zeroes_mark_blocks,
    ),
    (
        "partition_tracked_relative_to_its_start",
        partition_tracked_relative_to_its_start,
    ),
    (
        "detach_stops_tracking_reattach_new_generation",
        detach_stops_tracking_reattach_new_generation,
    ),
    ("cbtdirty_marks_exact_blocks", cbtdirty_marks_exact_blocks),
    (
        "snapshot_commands_without_snapshots",
        snapshot_commands_without_snapshots,
    ),
    ("bad_input_attach_detach", bad_input_attach_detach),
    (
        "bad_input_ctl_pointers_and_lengths",
        bad_input_ctl_pointers_and_lengths,
    ),
    (
        "bad_input_cbtmap_and_cbtdirty_ranges",
        bad_input_cbtmap_and_cbtdirty_ranges,
    ),
    (
        "bad_input_without_cap_sys_admin",
        bad_input_without_cap_sys_admin,
    ),
    ("disk_removal_while_attached", disk_removal_while_attached),
    (
        "partition_removal_while_attached",
        partition_removal_while_attached,
    ),
    (
        "module_unload_refused_while_attached",
        module_unload_refused_while_attached,
    ),
    (
        "module_parameters_choose_block_size",
        module_parameters_choose_block_size,
    ),
    (
        "writes_during_attach_detach_cycles",
        writes_during_attach_detach_cycles,
    ),
];

const MIB: u64 = 1 << 20;

fn disk_a() -> Result<PathBuf, String> {
    dev::disk_by_serial("blksnap-a")
}

fn disk_b() -> Result<PathBuf, String> {
    dev::disk_by_serial("blksnap-b")
}

fn e(r: blksnap::Error) -> String {
    r.to_string()
}

/// Attaches the filter and detaches it when dropped.
struct Attached {
    tracker: Tracker,
}

impl Attached {
    fn new(dev: &Path) -> Result<Self, String> {
        let tracker = Tracker::open(dev).map_err(e)?;
        tracker.attach().map_err(e)?;
        Ok(Self { tracker })
    }

    fn info(&self) -> Result<blksnap::CbtInfo, String> {
        self.tracker.cbt_info().map_err(e)
    }

    fn active_map(&self) -> Result<Vec<u8>, String> {
        self.tracker.read_cbt_map(MapKind::Active).map_err(e)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.tracker.detach();
    }
}

/// The blocks of `block_size` bytes touched by `len` bytes at `offset`.
fn blocks(offset: u64, len: u64, block_size: u32) -> impl Iterator<Item = usize> {
    let bs = u64::from(block_size);
    (offset / bs) as usize..=((offset + len - 1) / bs) as usize
}

/// Checks that exactly the blocks in `want` hold `number` and all others 0.
fn check_map(map: &[u8], want: &BTreeSet<usize>, number: u8, what: &str) -> TestResult {
    let mut wrong = Vec::new();
    for (i, &n) in map.iter().enumerate() {
        let expected = if want.contains(&i) { number } else { 0 };
        if n != expected {
            wrong.push(format!("block {i}: {n} (want {expected})"));
        }
    }
    if let Some(&b) = want.iter().find(|&&b| b >= map.len()) {
        wrong.push(format!(
            "expected block {b} beyond the map of {}",
            map.len()
        ));
    }
    if !wrong.is_empty() {
        let n = wrong.len();
        wrong.truncate(12);
        fail!("{what}: {n} wrong bytes: {}", wrong.join(", "));
    }
    Ok(())
}

fn control_device_version() -> TestResult {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(blksnap::CONTROL_PATH).map_err(|e| e.to_string())?;
    if !md.file_type().is_char_device() {
        fail!("{} is not a character device", blksnap::CONTROL_PATH);
    }
    check_eq!(md.mode() & 0o777, 0o600, "mode of the control device");
    let v = Control::open().map_err(e)?.version().map_err(e)?;
    check_eq!(
        (v.major, v.minor, v.revision, v.build),
        (2, 1, 0, 0),
        "interface version"
    );
    Ok(())
}

fn whole_disk_writes_mark_exact_blocks() -> TestResult {
    let disk = disk_a()?;
    let size = dev::size_sectors(&disk)?;
    check_eq!(size, 256 * MIB / SECTOR, "size of {}", disk.display());
    let a = Attached::new(&disk)?;
    check_eq!(
        dev::sysfs_attr(&disk, "filter")?,
        "blksnap",
        "sysfs filter attribute"
    );
    let info = a.info()?;
    check_eq!(info.device_capacity, 256 * MIB, "CBT capacity");
    check_eq!(
        info.block_size,
        65536,
        "CBT block size (64 KiB for 256 MiB)"
    );
    check_eq!(info.block_count, 4096, "CBT block count");
    check_eq!(info.changes_number, 0, "changes number before any snapshot");
    check_map(
        &a.active_map()?,
        &BTreeSet::new(),
        1,
        "map right after attach",
    )?;

    // (sector, sectors): aligned 4 KiB at 0; one 512-byte sector in block 7;
    // 4 KiB crossing the border of blocks 2 and 3; an unaligned odd-sized
    // write; 3 MiB from 10 MiB; the very last sector of the disk.
    let writes: &[(u64, u64)] = &[
        (0, 8),
        (1000, 1),
        (380, 8),
        (64 * 128 - 3, 134),
        (10 * 2048, 3 * 2048),
        (size - 1, 1),
    ];
    let mut want = BTreeSet::new();
    for (i, &(sector, sectors)) in writes.iter().enumerate() {
        dev::write_direct(&disk, sector, sectors, 0xa0 + i as u8)?;
        want.extend(blocks(sector * SECTOR, sectors * SECTOR, info.block_size));
    }
    // Spot checks of the arithmetic above.
    for b in [0, 7, 2, 3, 63, 64, 65, 160, 207, 4095] {
        if !want.contains(&b) {
            fail!("block {b} missing from the expected set");
        }
    }
    check_eq!(want.len(), 1 + 1 + 2 + 3 + 48 + 1, "expected block count");
    check_map(&a.active_map()?, &want, 1, "map after direct writes")?;

    // The data went through unchanged.
    for (i, &(sector, sectors)) in writes.iter().enumerate() {
        let data = dev::read_direct(&disk, sector, sectors)?;
        if data.iter().any(|&b| b != 0xa0 + i as u8) {
            fail!("data of write {i} at sector {sector} did not reach the disk");
        }
    }
    // The snapshot map is untouched: no snapshot was taken.
    let snap = a.tracker.read_cbt_map(MapKind::Snapshot).map_err(e)?;
    check_map(&snap, &BTreeSet::new(), 1, "snapshot map")?;
    Ok(())
}

fn reads_mark_nothing() -> TestResult {
    let disk = disk_a()?;
    let a = Attached::new(&disk)?;
    let size = dev::size_sectors(&disk)?;
    for (sector, sectors) in [(0, 8), (4096, 2048), (size - 8, 8), (12345, 1)] {
        dev::read_direct(&disk, sector, sectors)?;
    }
    // Buffered reads of the whole disk too.
    dev::run(
        "dd",
        &[&format!("if={}", disk.display()), "of=/dev/null", "bs=1M"],
    )?;
    check_map(&a.active_map()?, &BTreeSet::new(), 1, "map after reads")?;
    Ok(())
}

fn discard_and_write_zeroes_mark_blocks() -> TestResult {
    let disk = disk_a()?;
    let a = Attached::new(&disk)?;
    let bs = a.info()?.block_size;
    let mut want = BTreeSet::new();
    // Discard 1 MiB + 4 KiB starting 60 KiB into block 300: blocks 300..=316.
    let (off, len) = (300 * 65536 + 60 * 1024, MIB + 4096);
    dev::discard(&disk, off, len)?;
    want.extend(blocks(off, len, bs));
    // Zero 8 KiB at 100 MiB - 4 KiB: crosses into block 1600.
    let (off, len) = (100 * MIB - 4096, 8192);
    dev::zeroout(&disk, off, len)?;
    want.extend(blocks(off, len, bs));
    check_eq!(want.len(), 17 + 2, "expected blocks");
    check_map(
        &a.active_map()?,
        &want,
        1,
        "map after discard and write zeroes",
    )?;
    let zeroes = dev::read_direct(&disk, (100 * MIB - 4096) / SECTOR, 16)?;
    if zeroes.iter().any(|&b| b != 0) {
        fail!("BLKZEROOUT did not zero the range");
    }
    Ok(())
}

fn partition_tracked_relative_to_its_start() -> TestResult {
    let disk = disk_b()?;
    let (p1, p2) = (dev::partition(&disk, 1), dev::partition(&disk, 2));
    check_eq!(
        dev::sysfs_attr(&p1, "start")?,
        "2048",
        "start of partition 1"
    );
    check_eq!(
        dev::sysfs_attr(&p2, "start")?,
        "67600",
        "start of partition 2"
    );
    let part = Attached::new(&p2)?;
    check_eq!(
        dev::sysfs_attr(&p2, "filter")?,
        "blksnap",
        "partition filter attribute"
    );
    check_eq!(
        dev::sysfs_attr(&disk, "filter")?,
        "",
        "disk filter attribute"
    );
    let whole = Attached::new(&disk)?;
    let p2_size = dev::size_sectors(&p2)?;
    check_eq!(
        part.info()?.device_capacity,
        p2_size * SECTOR,
        "partition capacity"
    );
    let bs = part.info()?.block_size;

    // Writes to partition 2, in partition sectors.
    let writes: &[(u64, u64)] = &[(0, 1), (120, 16), (5000, 8)];
    let (mut want_part, mut want_whole) = (BTreeSet::new(), BTreeSet::new());
    for &(sector, sectors) in writes {
        dev::write_direct(&p2, sector, sectors, 0x5a)?;
        want_part.extend(blocks(sector * SECTOR, sectors * SECTOR, bs));
        want_whole.extend(blocks((67600 + sector) * SECTOR, sectors * SECTOR, bs));
    }
    // Partition-relative: sector 120..136 crosses from block 0 into block 1;
    // on the whole disk the same sectors lie in block 529 only.
    check_eq!(
        want_part.iter().copied().collect::<Vec<_>>(),
        vec![0, 1, 39],
        "expected partition blocks"
    );
    check_eq!(
        want_whole.iter().copied().collect::<Vec<_>>(),
        vec![528, 529, 567],
        "expected disk blocks"
    );
    // A write to partition 1 is seen by the disk's filter only.
    dev::write_direct(&p1, 256, 8, 0x11)?;
    want_whole.extend(blocks((2048 + 256) * SECTOR, 8 * SECTOR, bs));
    // And one to the disk itself, also seen by the disk's filter only.
    dev::write_direct(&disk, 100, 4, 0x22)?;
    want_whole.extend(blocks(100 * SECTOR, 4 * SECTOR, bs));

    check_map(&part.active_map()?, &want_part, 1, "partition 2 map")?;
    check_map(&whole.active_map()?, &want_whole, 1, "whole disk map")?;
    // The data landed where it should: partition sector 120 is disk sector 67720.
    let d = dev::read_direct(&disk, 67600 + 120, 16)?;
    if d.iter().any(|&b| b != 0x5a) {
        fail!("partition write did not land at its disk sectors");
    }
    Ok(())
}

fn detach_stops_tracking_reattach_new_generation() -> TestResult {
    let disk = disk_a()?;
    let t = Tracker::open(&disk).map_err(e)?;
    t.attach().map_err(e)?;
    dev::write_direct(&disk, 0, 8, 1)?;
    let g1 = t.cbt_info().map_err(e)?.generation;
    t.detach().map_err(e)?;
    check_eq!(
        dev::sysfs_attr(&disk, "filter")?,
        "",
        "filter attribute after detach"
    );
    check_eq!(
        t.cbt_info().map_err(|e| e.errno),
        Err(Errno::ENOENT),
        "CBTINFO when not attached"
    );
    dev::write_direct(&disk, 2048, 8, 2)?;
    t.attach().map_err(e)?;
    let info = t.cbt_info().map_err(e)?;
    t.detach().map_err(e)?;
    if info.generation == g1 {
        fail!("re-attach kept generation {g1}");
    }
    check_eq!(info.changes_number, 0, "changes number after re-attach");
    let a = Attached::new(&disk)?;
    check_map(&a.active_map()?, &BTreeSet::new(), 1, "map after re-attach")?;
    Ok(())
}

fn cbtdirty_marks_exact_blocks() -> TestResult {
    let disk = disk_a()?;
    let a = Attached::new(&disk)?;
    let bs = a.info()?.block_size;
    let ranges = [
        SectorRange {
            offset: 0,
            count: 1,
        },
        SectorRange {
            offset: 127,
            count: 2,
        },
        SectorRange {
            offset: 128 * 1000,
            count: 128 * 3,
        },
    ];
    a.tracker.mark_dirty(&ranges).map_err(e)?;
    let mut want = BTreeSet::new();
    for r in ranges {
        want.extend(blocks(r.offset * SECTOR, r.count * SECTOR, bs));
    }
    check_eq!(
        want.iter().copied().collect::<Vec<_>>(),
        vec![0, 1, 1000, 1001, 1002],
        "expected blocks"
    );
    check_map(&a.active_map()?, &want, 1, "map after CBTDIRTY")?;
    // Nothing was taken, so the snapshot map stays clear.
    let snap = a.tracker.read_cbt_map(MapKind::Snapshot).map_err(e)?;
    check_map(&snap, &BTreeSet::new(), 1, "snapshot map after CBTDIRTY")?;
    Ok(())
}

/// Sends a filter command with an arbitrary argument buffer address.
pub(crate) fn raw_ctl(
    dev: &Path,
    name: &str,
    cmd: u32,
    opt: u64,
    optlen: u32,
) -> Result<i32, Errno> {
    let f = std::fs::File::open(dev).map_err(|_| Errno::EBADF)?;
    let mut arg = uapi::BlkfilterCtl {
        name: raw::filter_name(name),
        cmd,
        optlen,
        opt,
    };
    // SAFETY: `arg` is valid; `opt` may be bad on purpose, the kernel checks it.
    unsafe { raw::blkfilter_ctl(f.as_raw_fd(), &mut arg) }
}

fn snapshot_commands_without_snapshots() -> TestResult {
    let disk = disk_a()?;
    let _a = Attached::new(&disk)?;
    // SNAPSHOTINFO: no snapshot, so no error and no image.
    let mut info = [0xffu8; 36];
    raw_ctl(
        &disk,
        "blksnap",
        ctl::SNAPSHOTINFO,
        info.as_mut_ptr() as u64,
        36,
    )
    .map_err(|e| format!("SNAPSHOTINFO: {e}"))?;
    check_eq!(info, [0u8; 36], "SNAPSHOTINFO result");
    // SNAPSHOTADD of an id that does not exist.
    let mut add = [0x42u8; 16];
    check_eq!(
        raw_ctl(
            &disk,
            "blksnap",
            ctl::SNAPSHOTADD,
            add.as_mut_ptr() as u64,
            16
        ),
        Err(Errno::ESRCH),
        "SNAPSHOTADD of an unknown snapshot"
    );
    // COLLECT reports no snapshots.
    let c = Control::open().map_err(e)?;
    let mut arg = uapi::BlksnapSnapshotCollect { count: 5, ids: 0 };
    // SAFETY: `arg` is a valid struct.
    unsafe { raw::blksnap_collect(c.as_raw_fd(), &mut arg) }
        .map_err(|e| format!("COLLECT: {e}"))?;
    check_eq!(arg.count, 0, "COLLECT count");
    Ok(())
}

fn bad_input_attach_detach() -> TestResult {
    let disk = disk_a()?;
    let f = std::fs::File::open(&disk).map_err(|e| e.to_string())?;
    let fd = f.as_raw_fd();
    let attach = |name: &str| {
        let mut arg = uapi::BlkfilterAttach {
            name: raw::filter_name(name),
            ..Default::default()
        };
        // SAFETY: valid argument.
        unsafe { raw::blkfilter_attach(fd, &mut arg) }
    };
    let detach = |name: &str| {
        let mut arg = uapi::BlkfilterDetach {
            name: raw::filter_name(name),
        };
        // SAFETY: valid argument.
        unsafe { raw::blkfilter_detach(fd, &mut arg) }
    };
    check_eq!(
        attach("nosuchfilter"),
        Err(Errno::ENOENT),
        "attach an unknown filter"
    );
    check_eq!(attach(""), Err(Errno::ENOENT), "attach an empty name");
    // A 32-byte name without terminating NUL.
    check_eq!(
        attach(&"x".repeat(32)),
        Err(Errno::ENOENT),
        "attach an unterminated name"
    );
    check_eq!(
        detach("blksnap"),
        Err(Errno::ENOENT),
        "detach when not attached"
    );
    check_eq!(
        raw_ctl(&disk, "blksnap", ctl::CBTINFO, 0, 0),
        Err(Errno::ENOENT),
        "ctl when not attached"
    );
    attach("blksnap").map_err(|e| format!("attach: {e}"))?;
    let r = (|| {
        check_eq!(attach("blksnap"), Err(Errno::EALREADY), "attach twice");
        check_eq!(
            detach("other"),
            Err(Errno::EINVAL),
            "detach another filter's name"
        );
        check_eq!(
            raw_ctl(&disk, "other", ctl::CBTINFO, 0, 0),
            Err(Errno::EINVAL),
            "ctl with another filter's name"
        );
        // A bad address for the ioctl argument itself.
        for cmd in [
            uapi::BLKFILTER_ATTACH,
            uapi::BLKFILTER_DETACH,
            uapi::BLKFILTER_CTL,
        ] {
            // SAFETY: the kernel must reject the unmapped address.
            let r = unsafe { nix::libc::ioctl(fd, cmd as _, 16usize) };
            check_eq!(
                (r, Errno::last()),
                (-1, Errno::EFAULT),
                "ioctl {cmd:#x} with a bad argument address"
            );
        }
        Ok(())
    })();
    detach("blksnap").map_err(|e| format!("detach: {e}"))?;
    r
}

fn bad_input_ctl_pointers_and_lengths() -> TestResult {
    let disk = disk_a()?;
    let _a = Attached::new(&disk)?;
    let bad = 16u64;
    check_eq!(
        raw_ctl(&disk, "blksnap", ctl::CBTINFO, bad, 40),
        Err(Errno::EFAULT),
        "CBTINFO into a bad address"
    );
    let mut buf = [0u8; 64];
    let p = buf.as_mut_ptr() as u64;
    check_eq!(
        raw_ctl(&disk, "blksnap", ctl::CBTINFO, p, 39),
        Err(Errno::EINVAL),
        "CBTINFO with a short buffer"
    );
    check_eq!(
        raw_ctl(&disk, "blksnap", ctl::CBTMAP, p, 15),
        Err(Errno::EINVAL),
        "CBTMAP with a short argument"
    );
    check_eq!(
        raw_ctl(&disk, "blksnap", ctl::CBTMAP, bad, 16),
        Err(Errno::EFAULT),
        "CBTMAP argument at a bad address"
    );
    let mut m = uapi::BlksnapCbtmap {
        offset: 0,
        length: 16,
        buffer: bad,
    };
    check_eq!(
        raw_ctl(&disk, "blksnap", ctl::CBTMAP, &mut m as *mut _ as u64, 16),
        Err(Errno::EFAULT),
        "CBTMAP into a bad buffer"
    );
    check_eq!(
        raw_ctl(&disk, "blksnap", ctl::CBTDIRTY, p, 8),
        Err(Errno::EINVAL),
        "CBTDIRTY with a short argument"
    );
    let mut d = uapi::BlksnapCbtdirty {
        count: 1,
        dirty_sectors: bad,
    };
    check_eq!(
        raw_ctl(&disk, "blksnap", ctl::CBTDIRTY, &mut d as *mut _ as u64, 16),
        Err(Errno::EFAULT),
        "CBTDIRTY ranges at a bad address"
    );
    check_eq!(
        raw_ctl(&disk, "blksnap", 77, p, 64),
        Err(Errno::ENOTTY),
        "unknown filter command"
    );
    let c = Control::open().map_err(e)?;
    // SAFETY: an unknown ioctl; the kernel must reject it.
    let r = unsafe { nix::libc::ioctl(c.as_raw_fd(), 0xc0085699u32 as _, p) };
    check_eq!(
        (r, Errno::last()),
        (-1, Errno::ENOTTY),
        "unknown control ioctl"
    );
    // SAFETY: VERSION into an unmapped address.
    let r = unsafe { nix::libc::ioctl(c.as_raw_fd(), uapi::IOCTL_BLKSNAP_VERSION as _, bad) };
    check_eq!(
        (r, Errno::last()),
        (-1, Errno::EFAULT),
        "VERSION into a bad address"
    );
    Ok(())
}

fn bad_input_cbtmap_and_cbtdirty_ranges() -> TestResult {
    let disk = disk_a()?;
    let a = Attached::new(&disk)?;
    let count = a.info()?.block_count;
    let mut out = vec![0u8; count as usize + 16];
    let read = |offset: u32, length: u32, out: &mut Vec<u8>| {
        let mut m = uapi::BlksnapCbtmap {
            offset,
            length,
            buffer: out.as_mut_ptr() as u64,
        };
        raw_ctl(
            &disk,
            "blksnap",
            ctl::CBTMAP_ACTIVE,
            &mut m as *mut _ as u64,
            16,
        )
    };
    // 0, like every command, as upstream: not the number of bytes read.
    check_eq!(read(0, count, &mut out), Ok(0), "read the whole map");
    check_eq!(read(count, 0, &mut out), Ok(0), "read nothing at the end");
    check_eq!(
        read(count, 1, &mut out),
        Err(Errno::ENODATA),
        "read past the end"
    );
    check_eq!(
        read(1, count, &mut out),
        Err(Errno::ENODATA),
        "read across the end"
    );
    check_eq!(
        read(u32::MAX, 2, &mut out),
        Err(Errno::ENODATA),
        "offset overflow"
    );

    let size = dev::size_sectors(&disk)?;
    let dirty = |ranges: &[uapi::BlksnapSectors], count: u32| {
        let mut d = uapi::BlksnapCbtdirty {
            count,
            dirty_sectors: ranges.as_ptr() as u64,
        };
        raw_ctl(&disk, "blksnap", ctl::CBTDIRTY, &mut d as *mut _ as u64, 16)
    };
    let r = |offset, count| uapi::BlksnapSectors { offset, count };
    check_eq!(
        dirty(&[r(0, 8)], 0),
        Err(Errno::EINVAL),
        "CBTDIRTY with count 0"
    );
    check_eq!(
        dirty(&[r(0, 8)], 1 << 31),
        Err(Errno::E2BIG),
        "CBTDIRTY with a huge count"
    );
    check_eq!(
        dirty(&[r(size, 1)], 1),
        Err(Errno::EINVAL),
        "range past the end"
    );
    check_eq!(
        dirty(&[r(size - 1, 2)], 1),
        Err(Errno::EINVAL),
        "range across the end"
    );
    check_eq!(
        dirty(&[r(u64::MAX, 2)], 1),
        Err(Errno::EINVAL),
        "range overflow"
    );
    check_eq!(dirty(&[r(8, 0)], 1), Err(Errno::EINVAL), "empty range");
    // A bad range anywhere rejects the whole request: nothing is marked.
    check_eq!(
        dirty(&[r(0, 8), r(size, 8)], 2),
        Err(Errno::EINVAL),
        "good then bad range"
    );
    check_map(
        &a.active_map()?,
        &BTreeSet::new(),
        1,
        "map after rejected CBTDIRTY",
    )?;
    check_eq!(dirty(&[r(size - 1, 1)], 1), Ok(0), "the last sector");
    let want: BTreeSet<usize> = [count as usize - 1].into();
    check_map(
        &a.active_map()?,
        &want,
        1,
        "map after marking the last sector",
    )?;
    Ok(())
}

fn bad_input_without_cap_sys_admin() -> TestResult {
    let disk = disk_a()?;
    let f = std::fs::File::open(&disk).map_err(|e| e.to_string())?;
    // Disk b is attached, so that a BLKFILTER_CTL or BLKFILTER_DETACH that
    // skipped the check would succeed instead of failing with ENOENT.
    let disk_b = disk_b()?;
    let attached = Attached::new(&disk_b)?;
    let fb = std::fs::File::open(&disk_b).map_err(|e| e.to_string())?;
    let c = Control::open().map_err(e)?;
    // The child drops root, and with it every capability, but keeps the
    // descriptors opened as root.
    // SAFETY: single-threaded test binary; the child only makes syscalls.
    match unsafe { nix::unistd::fork() }.map_err(|e| e.to_string())? {
        nix::unistd::ForkResult::Child => {
            let nobody = nix::unistd::Uid::from_raw(65534);
            let nogroup = nix::unistd::Gid::from_raw(65534);
            let mut code = 0;
            if nix::unistd::setresgid(nogroup, nogroup, nogroup).is_err()
                || nix::unistd::setresuid(nobody, nobody, nobody).is_err()
            {
                // SAFETY: leaving the forked child without running destructors.
                unsafe { nix::libc::_exit(10) };
            }
            let mut a = uapi::BlkfilterAttach {
                name: raw::filter_name("blksnap"),
                ..Default::default()
            };
            // SAFETY: valid argument.
            if unsafe { raw::blkfilter_attach(f.as_raw_fd(), &mut a) } != Err(Errno::EPERM) {
                code |= 1;
            }
            let mut d = uapi::BlkfilterDetach {
                name: raw::filter_name("blksnap"),
            };
            // SAFETY: valid argument.
            if unsafe { raw::blkfilter_detach(fb.as_raw_fd(), &mut d) } != Err(Errno::EPERM) {
                code |= 2;
            }
            let mut v = uapi::BlksnapVersion::default();
            // SAFETY: valid argument.
            if unsafe { raw::blksnap_version(c.as_raw_fd(), &mut v) } != Err(Errno::EPERM) {
                code |= 4;
            }
            match std::fs::File::open(blksnap::CONTROL_PATH) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EACCES) => {}
                _ => code |= 8,
            }
            let mut info = [0u8; 40];
            let mut ctl_arg = uapi::BlkfilterCtl {
                name: raw::filter_name("blksnap"),
                cmd: ctl::CBTINFO,
                optlen: 40,
                opt: info.as_mut_ptr() as u64,
            };
            // SAFETY: valid argument, `info` has room for 40 bytes.
            if unsafe { raw::blkfilter_ctl(fb.as_raw_fd(), &mut ctl_arg) } != Err(Errno::EPERM) {
                code |= 16;
            }
            // SAFETY: as above.
            unsafe { nix::libc::_exit(code) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).map_err(|e| e.to_string())?;
            check_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "child without CAP_SYS_ADMIN (bits: 1 attach, 2 detach, 4 version, 16 BLKFILTER_CTL not EPERM; 8 control open not EACCES; 10 setuid failed)"
            );
        }
    }
    // The unprivileged attach did not attach anything, the detach did not
    // detach.
    check_eq!(dev::sysfs_attr(&disk, "filter")?, "", "filter attribute");
    check_eq!(
        dev::sysfs_attr(&disk_b, "filter")?,
        "blksnap",
        "filter attribute of disk b"
    );
    attached.info()?;
    Ok(())
}

fn refcnt() -> Result<u32, String> {
    std::fs::read_to_string("/sys/module/blksnap/refcnt")
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|e| format!("refcnt: {e}"))
}

fn disk_removal_while_attached() -> TestResult {
    check_eq!(refcnt()?, 0, "module references before");
    let mut lo = dev::LoopDev::new("removal", 64 * MIB)?;
    {
        let t = Tracker::open(&lo.path).map_err(e)?;
        t.attach().map_err(e)?;
        dev::write_direct(&lo.path, 8, 8, 0x77)?;
        let map = t.read_cbt_map(MapKind::Active).map_err(e)?;
        check_map(&map, &[0usize].into(), 1, "loop device map")?;
    }
    check_eq!(refcnt()?, 1, "module references while attached");
    lo.remove()?;
    check_eq!(refcnt()?, 0, "module references after the disk was deleted");
    if lo.path.exists() {
        fail!("{} still exists", lo.path.display());
    }
    Ok(())
}

fn partition_removal_while_attached() -> TestResult {
    check_eq!(refcnt()?, 0, "module references before");
    let lo = dev::LoopDev::new("parts", 64 * MIB)?;
    let table = "label: dos\nstart=2048, size=32768, type=83\nstart=34816, type=83\n";
    let mut child = std::process::Command::new("sfdisk")
        .args(["--quiet", "--no-reread", lo.path.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(table.as_bytes())
        .map_err(|e| e.to_string())?;
    if !child.wait().map_err(|e| e.to_string())?.success() {
        fail!("sfdisk failed");
    }
    // udev probes the disk sfdisk wrote and closed; under load it may still
    // have it open (EBUSY for the reread): settle and try again.
    let mut tries = 0;
    loop {
        dev::udev_settle();
        let r = dev::run("partx", &["--add", lo.path.to_str().unwrap()])
            .or_else(|_| dev::run("blockdev", &["--rereadpt", lo.path.to_str().unwrap()]));
        match r {
            Ok(_) => break,
            Err(err) if tries < 20 && err.contains("busy") => tries += 1,
            Err(err) => fail!("{err}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let p1 = dev::partition(&lo.path, 1);
    for _ in 0..50 {
        if p1.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // udev rereads the partition table when a writer of the whole disk
    // closes it (sfdisk here); that drops and re-adds the partitions, so let
    // it finish before attaching.
    dev::udev_settle();
    {
        let t = Tracker::open(&p1).map_err(e)?;
        t.attach().map_err(e)?;
        dev::write_direct(&p1, 0, 8, 0x33)?;
        let map = t.read_cbt_map(MapKind::Active).map_err(e)?;
        check_map(&map, &[0usize].into(), 1, "partition map")?;
    }
    check_eq!(refcnt()?, 1, "module references while attached");
    // udev probes the partition after the write closed it; delpart fails
    // with EBUSY while anyone has it open.
    dev::udev_settle();
    check_eq!(
        dev::sysfs_attr(&p1, "filter")?,
        "blksnap",
        "filter attribute before delpart"
    );
    let mut tries = 0;
    while let Err(err) = dev::run("delpart", &[lo.path.to_str().unwrap(), "1"]) {
        tries += 1;
        if tries == 20 || !err.contains("busy") {
            fail!("{err}");
        }
        dev::udev_settle();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    check_eq!(
        refcnt()?,
        0,
        "module references after the partition was deleted"
    );
    Ok(())
}

fn module_unload_refused_while_attached() -> TestResult {
    let disk = disk_a()?;
    let a = Attached::new(&disk)?;
    match dev::unload_module() {
        Ok(()) => fail!("the module unloaded while attached"),
        Err(e) if e == Errno::EWOULDBLOCK || e == Errno::EBUSY => {}
        Err(e) => fail!("unload while attached failed with {e}, want EWOULDBLOCK"),
    }
    if !dev::module_loaded() {
        fail!("module gone");
    }
    // Tracking still works after the refused unload.
    dev::write_direct(&disk, 0, 1, 9)?;
    check_map(
        &a.active_map()?,
        &[0usize].into(),
        1,
        "map after refused unload",
    )?;
    drop(a);
    dev::unload_module().map_err(|e| format!("unload after detach: {e}"))?;
    if dev::module_loaded() || Path::new(blksnap::CONTROL_PATH).exists() {
        fail!("module or control device still present after unload");
    }
    // Attaching now fails: no such filter.
    let t = Tracker::open(&disk).map_err(e)?;
    check_eq!(
        t.attach().map_err(|e| e.errno),
        Err(Errno::ENOENT),
        "attach without module"
    );
    dev::load_module("")?;
    Ok(())
}

fn module_parameters_choose_block_size() -> TestResult {
    let disk = disk_a()?;
    dev::unload_module().map_err(|e| format!("unload: {e}"))?;
    dev::load_module("tracking_block_minimum_shift=20")?;
    let r = (|| {
        let p = "/sys/module/blksnap/parameters/tracking_block_minimum_shift";
        let value = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
        check_eq!(value.trim(), "20", "parameter");
        {
            let a = Attached::new(&disk)?;
            let info = a.info()?;
            check_eq!(
                (info.block_size, info.block_count),
                (1 << 20, 256),
                "1 MiB blocks"
            );
            dev::write_direct(&disk, 5 * 2048 + 3, 1, 1)?;
            check_map(
                &a.active_map()?,
                &[5usize].into(),
                1,
                "map with 1 MiB blocks",
            )?;
        }
        // Parameters that describe no valid block size make attach fail.
        std::fs::write(p, "8").map_err(|e| e.to_string())?;
        let t = Tracker::open(&disk).map_err(e)?;
        check_eq!(
            t.attach().map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "attach with min shift 8"
        );
        check_eq!(dev::sysfs_attr(&disk, "filter")?, "", "filter attribute");
        Ok(())
    })();
    dev::unload_module().map_err(|e| format!("unload: {e}"))?;
    dev::load_module("")?;
    r
}

fn writes_during_attach_detach_cycles() -> TestResult {
    let disk = disk_a()?;
    // Random direct writes from two jobs, verified afterwards, while the filter
    // is attached and detached over and over.
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=cycle",
            &format!("--filename={}", disk.display()),
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--numjobs=2",
            "--size=64M",
            "--offset_increment=64M",
            "--io_size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--group_reporting",
            "--output-format=terse",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("fio: {e}"))?;
    let t = Tracker::open(&disk).map_err(e)?;
    let mut cycles = 0;
    while fio.try_wait().map_err(|e| e.to_string())?.is_none() {
        t.attach().map_err(e)?;
        std::thread::sleep(std::time::Duration::from_millis(20));
        t.cbt_info().map_err(e)?;
        t.detach().map_err(e)?;
        cycles += 1;
    }
    let out = fio.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        fail!(
            "fio failed (data corrupted?): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if cycles < 3 {
        fail!("only {cycles} attach/detach cycles ran during fio");
    }
    println!("    {cycles} attach/detach cycles during verified random writes");
    // Tracking is exact again once the dust settled.
    let a = Attached::new(&disk)?;
    dev::write_direct(&disk, 128 * 77, 1, 3)?;
    check_map(
        &a.active_map()?,
        &[77usize].into(),
        1,
        "map after the cycles",
    )?;
    Ok(())
}
