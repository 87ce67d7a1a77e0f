// SPDX-License-Identifier: GPL-2.0

//! Concurrency and robustness (issue 10): a deep queue of writes on an image
//! and on its origin, snapshots whose stores are on each other's devices,
//! CBTDIRTY of huge requests under writes, parallel take/destroy loops then
//! unload, the take's error paths under fault injection, and the memory
//! store's limit.
//!
//! Every wait is bounded: a hang ends as a failure, not as a stuck run.
//! Disks: `blksnap-c` and `blksnap-d` (64 MiB each) for snapshots,
//! `blksnap-e` (400 MiB) and partitions of `blksnap-b` for stores.

use crate::dev::{self, AlignedBuf, SECTOR};
use crate::snap::{check_device, disk, e, pattern, write_pattern, Rng, Snap, Tracked};
use crate::{check_eq, fail, TestResult};
use blksnap::{Control, MapKind, SectorRange, Tracker};
use nix::errno::Errno;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The concurrency tests, in the order they run.
pub const ALL: &[Test] = &[
    ("conc_memory_store_limit_bounded", memory_limit),
    ("conc_storage_cycle_refused", storage_cycle_refused),
    (
        "conc_image_iodepth_1024_with_origin_writes",
        image_deep_queue,
    ),
    ("conc_storage_chain_under_writes", storage_chain),
    ("conc_cbtdirty_huge_requests_under_writes", cbtdirty_bounded),
    (
        "conc_parallel_take_destroy_then_rmmod",
        parallel_take_destroy,
    ),
    ("conc_take_error_paths_under_faults", take_faults),
    (
        "conc_nowait_write_behind_a_copy_backlog_fails_with_eagain",
        nowait_backlog,
    ),
    ("conc_stuck_store_gives_way_to_the_origin", stuck_store),
    (
        "conc_slow_store_with_no_write_waiting_keeps_the_snapshot",
        slow_store_keeps,
    ),
    (
        "conc_first_write_waits_for_the_read_of_its_chunk_not_the_store",
        cow_releases_after_read,
    ),
    (
        "conc_io_uring_first_writes_never_fail_with_eagain",
        io_uring_first_writes,
    ),
];

/// Sectors in a MiB.
const MIB: u64 = 2048;

/// Runs `f` on its own thread and waits at most `secs` for it. A thread
/// that does not return is left behind (it may be stuck in the kernel).
fn bounded<T: Send + 'static>(
    what: &str,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .map_err(|_| format!("{what} did not return within {secs} s (hung?)"))
}

/// The kernel log from now on, read record by record from /dev/kmsg.
struct KernelLog(File);

impl KernelLog {
    fn open() -> Result<Self, String> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .map_err(|e| format!("/dev/kmsg: {e}"))?;
        // SAFETY: lseek on a valid descriptor; SEEK_END skips the records
        // logged so far.
        unsafe { nix::libc::lseek(f.as_raw_fd(), 0, nix::libc::SEEK_END) };
        Ok(Self(f))
    }

    /// The messages logged since the last call.
    fn lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if let Some((_, msg)) = rec.split_once(';') {
                        out.push(msg.lines().next().unwrap_or_default().to_string());
                    }
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        out
    }
}

/// Fails if the kernel logged a lockup or a stall.
fn no_lockups(lines: &[String]) -> TestResult {
    const LOCKUPS: &[&str] = &[
        "soft lockup",
        "hard LOCKUP",
        "self-detected stall",
        "rcu_preempt detected stall",
        "rcu_sched detected stall",
        "blocked for more than",
        "hung_task",
    ];
    if let Some(l) = lines.iter().find(|l| LOCKUPS.iter().any(|p| l.contains(p))) {
        fail!("kernel log: {l}");
    }
    Ok(())
}

/// Sets module parameters for the duration of a test.
struct Params(Vec<(String, String)>);

impl Params {
    fn set(values: &[(&str, &str)]) -> Result<Self, String> {
        let mut old = Self(Vec::new());
        for (name, value) in values {
            let p = format!("/sys/module/blksnap/parameters/{name}");
            let was = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
            std::fs::write(&p, value).map_err(|e| format!("{p}: {e}"))?;
            old.0.push((p, was.trim().to_string()));
        }
        Ok(old)
    }
}

impl Drop for Params {
    fn drop(&mut self) {
        for (p, v) in self.0.iter().rev() {
            let _ = std::fs::write(p, v);
        }
    }
}

/// Unloads the module. An image that was just destroyed may still be open
/// for a moment (udev probes new disks), which pins the module: waits for
/// that, up to 30 s. On failure, says who holds the module.
fn unload() -> Result<(), String> {
    let _ = Command::new("udevadm")
        .args(["settle", "--timeout=10"])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match dev::unload_module() {
            Ok(()) => return Ok(()),
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(format!("{e} ({})", module_holders())),
        }
    }
}

/// What holds the module: its reference count, the images that exist and
/// the processes that have an image or the control device open.
fn module_holders() -> String {
    let refcnt = std::fs::read_to_string("/sys/module/blksnap/refcnt").unwrap_or_default();
    let mut open = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = p.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        for fd in std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if t.contains("blk-snap-image") || t.contains("blksnap-control") {
                    open.push(format!("{} ({pid}) has {t}", comm.trim()));
                }
            }
        }
    }
    format!(
        "refcnt {}, images {:?}, open: {:?}",
        refcnt.trim(),
        images(),
        open
    )
}

/// A snapshot with an empty storage of device ranges.
fn devices_snap() -> Result<Snap, String> {
    let ctl = Control::open().map_err(e)?;
    let id = ctl.snapshot_create_devices().map_err(e)?;
    Ok(Snap { id, ctl })
}

/// Appends `ranges` of `dev` to the storage of `snap`.
fn append(snap: &Snap, dev: &Path, ranges: &[(u64, u64)]) -> Result<(), Errno> {
    let ranges: Vec<SectorRange> = ranges
        .iter()
        .map(|&(offset, count)| SectorRange { offset, count })
        .collect();
    snap.ctl
        .snapshot_append_storage(&snap.id, dev, &ranges)
        .map_err(|e| e.errno)
}

// ---------------------------------------------------------------- fio

/// A fio process writing random blocks with verification headers.
struct Fio {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    out: PathBuf,
}

/// What a fio job does.
struct FioJob<'a> {
    name: &'a str,
    dev: &'a Path,
    iodepth: u32,
    bs: &'a str,
    /// Bytes: the region written.
    offset: u64,
    size: u64,
    /// Bytes to write in all.
    io_size: u64,
    seed: u64,
}

impl Fio {
    /// Starts random O_DIRECT writes with libaio; fio verifies what it wrote
    /// as it goes (`verify_backlog`) and logs every write.
    fn start(job: &FioJob<'_>) -> Result<Self, String> {
        let dir = dev::scratch();
        let log = dir.join(format!("{}.iolog", job.name));
        let out = dir.join(format!("{}.out", job.name));
        let _ = std::fs::remove_file(&log);
        let args = [
            format!("--name={}", job.name),
            format!("--filename={}", job.dev.display()),
            "--ioengine=libaio".into(),
            "--direct=1".into(),
            "--rw=randwrite".into(),
            format!("--bsrange={}", job.bs),
            format!("--iodepth={}", job.iodepth),
            format!("--offset={}", job.offset),
            format!("--size={}", job.size),
            format!("--io_size={}", job.io_size),
            "--runtime=60".into(),
            "--verify=crc32c".into(),
            "--verify_interval=4096".into(),
            "--verify_backlog=128".into(),
            "--verify_fatal=1".into(),
            format!("--randseed={}", job.seed),
            format!("--write_iolog={}", log.display()),
            "--output-format=terse".into(),
        ];
        let outf = File::create(&out).map_err(|e| e.to_string())?;
        let errf = outf.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("fio")
            .args(&args)
            .stdout(Stdio::from(outf))
            .stderr(Stdio::from(errf))
            .spawn()
            .map_err(|e| format!("fio: {e}"))?;
        Ok(Self {
            name: job.name.to_string(),
            child: Some(child),
            log,
            out,
        })
    }

    /// The writes fio made: (offset, length) in bytes.
    fn writes(&self) -> Result<Vec<(u64, u64)>, String> {
        let text = std::fs::read_to_string(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let mut out = Vec::new();
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = w.iter().position(|&x| x == "write") {
                if let (Some(o), Some(l)) = (w.get(i + 1), w.get(i + 2)) {
                    out.push((
                        o.parse().map_err(|_| format!("iolog: {line}"))?,
                        l.parse().map_err(|_| format!("iolog: {line}"))?,
                    ));
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Fio {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
        }
    }
}

/// Writes completed on `devs` so far (`/sys/class/block/*/stat`).
fn writes_done(devs: &[&Path]) -> u64 {
    devs.iter()
        .filter_map(|d| {
            let name = d.file_name()?.to_string_lossy().to_string();
            let stat = std::fs::read_to_string(format!("/sys/class/block/{name}/stat")).ok()?;
            stat.split_whitespace().nth(4)?.parse::<u64>().ok()
        })
        .sum()
}

/// How long the writes on the watched devices may make no progress before
/// fio counts as hung. A slow machine (TCG on a loaded host) only slows
/// them down.
const STALL_SECS: u64 = 30;

/// Waits for every fio; fails if one failed, or if no write completed on
/// `watch` for [`STALL_SECS`] (hung), or after `limit` in all (they are
/// killed).
fn fio_wait(fios: &mut [&mut Fio], watch: &[&Path], limit: Duration) -> TestResult {
    let start = Instant::now();
    let (mut done, mut progress) = (writes_done(watch), Instant::now());
    // fio loads from the host's file system (9p), slowly on the debug
    // kernel when its pages are not cached yet: give the first write time.
    let mut started = false;
    loop {
        let mut running = false;
        for f in fios.iter_mut() {
            let Some(c) = f.child.as_mut() else { continue };
            match c.try_wait().map_err(|e| e.to_string())? {
                Some(status) => {
                    f.child = None;
                    if !status.success() {
                        let out = std::fs::read_to_string(&f.out).unwrap_or_default();
                        fail!("fio {} failed ({status}): {}", f.name, out.trim());
                    }
                }
                None => running = true,
            }
        }
        if !running {
            return Ok(());
        }
        let now = writes_done(watch);
        if now != done {
            (done, progress, started) = (now, Instant::now(), true);
        }
        let patience = if started { STALL_SECS } else { 4 * STALL_SECS };
        let stalled = progress.elapsed() > Duration::from_secs(patience);
        if stalled || start.elapsed() > limit {
            let names: Vec<&str> = fios
                .iter()
                .filter(|f| f.child.is_some())
                .map(|f| f.name.as_str())
                .collect();
            // Where the tasks that wait are, for the log.
            println!("{}", dev::blocked_tasks());
            fail!(
                "fio {} still running after {:.0} s, {} (hung?)",
                names.join(", "),
                start.elapsed().as_secs_f64(),
                if stalled {
                    format!("no write completed for {patience} s")
                } else {
                    format!("{done} writes completed")
                }
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// CRC32C (Castagnoli) without the final inversion, as fio's verify uses.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = t[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// Checks a 4 KiB block that fio wrote at byte `offset`: its verify header
/// (magic, length, offset, header checksum) and its data's CRC32C.
fn fio_block_ok(b: &[u8], offset: u64) -> bool {
    let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    u16_at(0) == 0xacca
        && u32_at(4) == 4096
        && u64_at(16) == offset
        && u32_at(36) == crc32c(&b[..36])
        && u32_at(40) == crc32c(&b[44..4096])
}

/// Checks `bytes` bytes of `dev` from byte `from`: the 4 KiB blocks that
/// `writes` (of fio) cover must hold valid fio blocks, the others the
/// pattern `seed`. Returns the bytes fio wrote there.
fn check_fio_or_pattern(
    dev: &Path,
    writes: &[(u64, u64)],
    from: u64,
    bytes: u64,
    seed: u64,
) -> Result<u64, String> {
    let mut written = std::collections::BTreeSet::new();
    for &(o, l) in writes {
        if o % 4096 != 0 || l % 4096 != 0 {
            fail!("fio wrote {l} bytes at {o}: not whole 4 KiB blocks");
        }
        for b in (o..o + l).step_by(4096) {
            if !written.insert(b) {
                fail!("fio wrote block {b} twice: its verification is ambiguous");
            }
        }
    }
    let f = dev::open_direct(dev, false)?;
    let step = 1u64 << 20;
    let mut buf = AlignedBuf::new(step as usize, 0);
    let mut want = vec![0u8; 4096];
    let (mut bad_fio, mut bad_pattern, mut first_bad) = (0u64, 0u64, None);
    let mut pos = from;
    while pos < from + bytes {
        let n = step.min(from + bytes - pos) as usize;
        f.read_exact_at(&mut buf.as_mut_slice()[..n], pos)
            .map_err(|e| format!("read {} at byte {pos}: {e}", dev.display()))?;
        for (i, b) in buf.as_slice()[..n].chunks(4096).enumerate() {
            let at = pos + (i as u64) * 4096;
            let ok = if written.contains(&at) {
                let ok = fio_block_ok(b, at);
                bad_fio += u64::from(!ok);
                ok
            } else {
                pattern(&mut want[..b.len()], at / SECTOR, seed);
                let ok = b == &want[..b.len()];
                bad_pattern += u64::from(!ok);
                ok
            };
            if !ok && first_bad.is_none() {
                first_bad = Some(at);
            }
        }
        pos += n as u64;
    }
    if let Some(at) = first_bad {
        fail!(
            "{}: {bad_fio} blocks written by fio and {bad_pattern} blocks of the pattern {seed} \
             are wrong (first at byte {at})",
            dev.display()
        );
    }
    Ok(written.len() as u64 * 4096)
}

// ---------------------------------------------------------------- tests

/// A store that stops answering (here a device-mapper device over disk
/// `blksnap-e`, suspended; in life a file system stuck in memory reclaim
/// that waits for the very writes the snapshot holds, see
/// `pressure_swap_on_a_snapshotted_disk`) must not hold the origin's writes
/// for ever: a write lands once its chunk was read; a writer throttled
/// behind the copies (at most one queued) waits, and after
/// `cow_stall_timeout` seconds without a finished copy while it waits the
/// snapshot gives way (ETIMEDOUT, with its event), its pending copies end,
/// the writer goes on, and once the store answers again everything ends
/// cleanly.
fn stuck_store() -> TestResult {
    let c = disk("blksnap-c")?;
    let store = disk("blksnap-e")?;
    let table = format!("0 {} linear {} 0", 64 * MIB, store.display());
    dev::run("dmsetup", &["create", "blksnap-stuck", "--table", &table])?;
    let dm = PathBuf::from("/dev/mapper/blksnap-stuck");
    /// Resumes the device when dropped: before the snapshot (declared
    /// earlier) is destroyed, which waits for its copies.
    struct Resume;
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = dev::run("dmsetup", &["resume", "blksnap-stuck"]);
        }
    }
    let r = (|| {
        let _stall = dev::ModuleParam::set("cow_stall_timeout", "3")?;
        let _queue = dev::ModuleParam::set("chunk_maximum_in_queue", "1")?;
        let t = Tracked::new(&c)?;
        write_pattern(&c, 0, 64 * MIB, 111)?;
        let snap = Snap::devices(&dm, &[(0, 64 * MIB)])?;
        snap.add(&t.0)?;
        snap.take()?;
        // A first chunk copied while the store answers.
        write_pattern(&c, 0, 8, 112)?;
        dev::run("dmsetup", &["suspend", "blksnap-stuck"])?;
        let resume = Resume;
        let at = Instant::now();
        let landed = bounded("a write whose copy is stuck", 60, {
            let c = c.clone();
            move || write_pattern(&c, 8 * MIB, 8, 113).map(|_| Instant::now())
        })?? - at;
        println!(
            "    the write whose copy was stuck landed after {} ms",
            landed.as_millis()
        );
        // A second copy queued: its writer is throttled until the stall is
        // seen.
        let throttled = std::thread::spawn({
            let c = c.clone();
            move || write_pattern(&c, 12 * MIB, 8, 115).map(|_| Instant::now())
        });
        // The stall is seen within the timeout (3 s) and a tick.
        let mut info = t.0.snapshot_info().map_err(e)?;
        for _ in 0..100 {
            if info.error_code != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            info = t.0.snapshot_info().map_err(e)?;
        }
        check_eq!(
            info.error_code,
            -(Errno::ETIMEDOUT as i32),
            "snapshot error after the stall"
        );
        let went_on = throttled
            .join()
            .map_err(|_| "the throttled writer panicked".to_string())??
            - at;
        println!(
            "    the writer throttled behind the stuck copies went on after {} ms",
            went_on.as_millis()
        );
        let (major, minor) = dev::major_minor(&c)?;
        let want = blksnap::Event::Corrupted {
            major,
            minor,
            errno: Errno::ETIMEDOUT as i32,
        };
        let mut evs = Vec::new();
        while let Ok(Some(ev)) = snap.ctl.snapshot_wait_event(&snap.id, 0) {
            evs.push(ev);
        }
        if !evs.contains(&want) {
            fail!("no corrupted event with ETIMEDOUT: {evs:?}");
        }
        drop(resume);
        // The origin has every write; later writes pass at once.
        write_pattern(&c, 16 * MIB, 8, 114)?;
        check_device(&c, |s| match s {
            0..8 => 112,
            _ if (8 * MIB..8 * MIB + 8).contains(&s) => 113,
            _ if (12 * MIB..12 * MIB + 8).contains(&s) => 115,
            _ if (16 * MIB..16 * MIB + 8).contains(&s) => 114,
            _ => 111,
        })?;
        bounded("destroy after the stall", 60, move || snap.destroy())??;
        Ok(())
    })();
    let removed = dev::run("dmsetup", &["remove", "blksnap-stuck"]);
    r?;
    removed.map(|_| ())
}

/// A REQ_NOWAIT write never waits (defect 2): while the copies of a
/// snapshot lag behind (its store on the write-throttled disk `blksnap-g`,
/// at most one copy queued before writers wait), a `pwritev2(RWF_NOWAIT)`
/// O_DIRECT write to a chunk not yet copied fails at once with EAGAIN and
/// changes nothing; the writes that may wait land, and the image keeps the
/// old data.
/// A taken snapshot of `blksnap-c`, filled with the pattern `seed` first,
/// whose store is 32 MiB of the write-throttled disk `blksnap-g` (64 KiB/s
/// after a first write that passes at once): the disk, its tracker, the
/// snapshot and its image.
fn slow_store_snapshot(seed: u64) -> Result<(PathBuf, Tracked, Snap, PathBuf), String> {
    let c = disk("blksnap-c")?;
    let g = disk("blksnap-g")?;
    let t = Tracked::new(&c)?;
    write_pattern(&c, 0, 64 * MIB, seed)?;
    let snap = Snap::devices(&g, &[(0, 32 * MIB)])?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    Ok((c, t, snap, image))
}

fn nowait_backlog() -> TestResult {
    const CHUNK: u64 = 512; // sectors: the 256 KiB chunks of a 64 MiB disk
    let _queue = dev::ModuleParam::set("chunk_maximum_in_queue", "1")?;
    let (c, t, snap, image) = slow_store_snapshot(101)?;
    // Three writes that may wait, to chunks 1, 2 and 3: three copies of
    // 256 KiB to a disk that takes 64 KiB/s (the first passes at once).
    let writers: Vec<_> = (1..=3u64)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || write_pattern(&c, i * CHUNK, 8, 102))
        })
        .collect();
    // Until more than one copy is queued.
    std::thread::sleep(Duration::from_millis(1500));
    let f = dev::open_direct(&c, true)?;
    let mut buf = AlignedBuf::new(4096, 0);
    pattern(buf.as_mut_slice(), 10 * CHUNK, 103);
    let addr = buf.as_mut_slice().as_mut_ptr() as usize;
    let (tx, rx) = std::sync::mpsc::channel();
    let fd = f.as_raw_fd();
    let at = Instant::now();
    std::thread::spawn(move || {
        let iov = nix::libc::iovec {
            iov_base: addr as *mut nix::libc::c_void,
            iov_len: 4096,
        };
        // SAFETY: `iov` points into `buf`, which outlives the call (the
        // test waits for this thread's answer, or fails and leaks it), and
        // `fd` stays open as long.
        let r = unsafe {
            nix::libc::pwritev2(
                fd,
                &iov,
                1,
                (10 * CHUNK * SECTOR) as nix::libc::off_t,
                nix::libc::RWF_NOWAIT,
            )
        };
        let errno = Errno::last();
        let _ = tx.send((r, errno, at.elapsed()));
    });
    let (r, errno, took) = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(x) => x,
        Err(_) => {
            std::mem::forget(buf);
            std::mem::forget(f);
            fail!("the RWF_NOWAIT write did not return within 60 s");
        }
    };
    println!(
        "    RWF_NOWAIT write behind the copy backlog: {} after {} ms",
        if r < 0 {
            format!("{errno:?}")
        } else {
            format!("{r} bytes")
        },
        took.as_millis()
    );
    if took > Duration::from_millis(1000) {
        fail!(
            "a RWF_NOWAIT write waited {} ms for the copies (returned {r}, {errno:?})",
            took.as_millis()
        );
    }
    let nowait_landed = match (r, errno) {
        (4096, _) => true,
        (-1, Errno::EAGAIN) => false,
        _ => fail!("RWF_NOWAIT write: {r} ({errno:?}), want EAGAIN or 4096"),
    };
    for w in writers {
        w.join().map_err(|_| "writer panicked".to_string())??;
    }
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        0,
        "snapshot error"
    );
    check_device(&image, |_| 101)?;
    check_device(&c, |s| {
        let chunk = s / CHUNK;
        if (1..=3).contains(&chunk) && s % CHUNK < 8 {
            102
        } else if chunk == 10 && s % CHUNK < 8 && nowait_landed {
            103
        } else {
            101
        }
    })?;
    drop(buf);
    snap.destroy()
}

/// A slow store is not a stuck one: with copies that take longer than
/// `cow_stall_timeout` to store (here 2 s, and 4 s per 256 KiB chunk on the
/// write-throttled disk `blksnap-g`) but no write waiting for them (their
/// chunks were read, the writes went on), the snapshot stays whole and its
/// image keeps the old data.
fn slow_store_keeps() -> TestResult {
    const CHUNK: u64 = 512; // sectors: the 256 KiB chunks of a 64 MiB disk
    let _stall = dev::ModuleParam::set("cow_stall_timeout", "2")?;
    let (c, t, snap, image) = slow_store_snapshot(121)?;
    let start = Instant::now();
    for i in 1..=3u64 {
        write_pattern(&c, i * CHUNK, 8, 122)?;
    }
    println!(
        "    three first writes returned after {} ms",
        start.elapsed().as_millis()
    );
    // The store writes: the first at once, then 4 s each.
    std::thread::sleep(Duration::from_secs(10));
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        0,
        "snapshot error after copies slower than cow_stall_timeout that no write waited for"
    );
    check_device(&image, |_| 121)?;
    snap.destroy()
}

/// The memory store's limit is bounded by half of the RAM.
fn memory_limit() -> TestResult {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no MemTotal in /proc/meminfo")?;
    let ram = kib * 2;
    let ctl = Control::open().map_err(e)?;
    let mut log = KernelLog::open()?;
    for (limit, what) in [
        (ram, "all of the RAM"),
        (ram / 2 + 4096, "a bit more than half of the RAM"),
        (u64::MAX / 2, "2^63 sectors"),
    ] {
        let r = ctl.snapshot_create_memory(limit);
        if let Ok(id) = &r {
            let _ = ctl.snapshot_destroy(id);
        }
        check_eq!(
            r.map(|_| ()).map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "a memory store of {what} ({limit} sectors)"
        );
        let lines = log.lines();
        if !lines.iter().any(|l| l.contains("half of the RAM")) {
            fail!("no log line says why {limit} sectors were refused: {lines:?}");
        }
    }
    // A quarter of the RAM is fine (memory is taken as chunks are stored).
    let id = ctl.snapshot_create_memory(ram / 4).map_err(e)?;
    ctl.snapshot_destroy(&id).map_err(e)?;
    println!(
        "    RAM {} MiB: memory stores above {} MiB refused with EINVAL",
        ram / MIB,
        ram / 2 / MIB
    );
    Ok(())
}

/// Two snapshots whose stores would be on each other's devices: the append
/// or add that closes the cycle is refused with EINVAL and a log line, in
/// either order and through a partition.
fn storage_cycle_refused() -> TestResult {
    let (c, d, b) = (disk("blksnap-c")?, disk("blksnap-d")?, disk("blksnap-b")?);
    let b1 = dev::partition(&b, 1);
    let (tc, td) = (Tracked::new(&c)?, Tracked::new(&d)?);
    let mut log = KernelLog::open()?;
    let logged = |log: &mut KernelLog, what: &str| -> TestResult {
        let lines = log.lines();
        if !lines.iter().any(|l| l.contains("cycle")) {
            fail!("{what}: no log line about the cycle: {lines:?}");
        }
        Ok(())
    };
    {
        // Devices first: A of c, B of d; A's store on d is fine, B's on c
        // closes the cycle.
        let (sa, sb) = (devices_snap()?, devices_snap()?);
        sa.add(&tc.0)?;
        sb.add(&td.0)?;
        check_eq!(append(&sa, &d, &[(0, 16 * MIB)]), Ok(()), "A's store on d");
        check_eq!(
            append(&sb, &c, &[(0, 16 * MIB)]),
            Err(Errno::EINVAL),
            "B's store on c, whose snapshot A has its store on B's d"
        );
        logged(&mut log, "append")?;
        // The refused range was not added: B's store is still empty, and
        // a store elsewhere is fine.
        let e_disk = disk("blksnap-e")?;
        check_eq!(
            append(&sb, &e_disk, &[(0, 16 * MIB)]),
            Ok(()),
            "B's store on e"
        );
        sa.take()?;
        sb.take()?;
        sa.destroy()?;
        sb.destroy()?;
    }
    {
        // Stores first: then the second add closes the cycle.
        let (sa, sb) = (devices_snap()?, devices_snap()?);
        check_eq!(append(&sa, &d, &[(0, 16 * MIB)]), Ok(()), "A's store on d");
        check_eq!(append(&sb, &c, &[(0, 16 * MIB)]), Ok(()), "B's store on c");
        check_eq!(
            tc.0.snapshot_add(&sa.id).map_err(|e| e.errno),
            Ok(()),
            "c to A"
        );
        check_eq!(
            td.0.snapshot_add(&sb.id).map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "d to B, whose store is on c of A, whose store is on d"
        );
        logged(&mut log, "add")?;
        sa.destroy()?;
        sb.destroy()?;
    }
    {
        // Through a partition: A of c with its store on partition 1 of b, B
        // of the whole disk b with its store on c.
        let tb = Tracked::new(&b)?;
        let (sa, sb) = (devices_snap()?, devices_snap()?);
        sa.add(&tc.0)?;
        check_eq!(
            append(&sa, &b1, &[(0, 16 * MIB)]),
            Ok(()),
            "A's store on b1"
        );
        check_eq!(append(&sb, &c, &[(0, 16 * MIB)]), Ok(()), "B's store on c");
        check_eq!(
            tb.0.snapshot_add(&sb.id).map_err(|e| e.errno),
            Err(Errno::EINVAL),
            "b to B, whose store is on c of A, whose store is on b's partition"
        );
        logged(&mut log, "add of a disk")?;
        sa.destroy()?;
        sb.destroy()?;
    }
    Ok(())
}

/// fio with 1024 random writes in flight on a snapshot image and 64 on its
/// origin at the same time. fio verifies as it goes; afterwards every block
/// of both is checked: what fio wrote (header and checksum), else the
/// pattern of the snapshot.
fn image_deep_queue() -> TestResult {
    let (c, ed) = (disk("blksnap-c")?, disk("blksnap-e")?);
    let size = dev::size_sectors(&c)?;
    let seed = 41;
    write_pattern(&c, 0, size, seed)?;
    // 16 KiB chunks: 4096 of them, so that copies go on all along, and an
    // image write often finds its chunk being copied for an origin write.
    let _p = Params::set(&[("chunk_minimum_shift", "14")])?;
    let t = Tracked::new(&c)?;
    let snap = devices_snap()?;
    check_eq!(append(&snap, &ed, &[(0, 160 * MIB)]), Ok(()), "store on e");
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    let bytes = size * SECTOR;
    let start = Instant::now();
    let mut fi = Fio::start(&FioJob {
        name: "image",
        dev: &image,
        iodepth: 1024,
        bs: "4k-4k",
        offset: 0,
        size: bytes,
        io_size: 8 << 20,
        seed: 1,
    })?;
    // The origin's writes start once the image's fill the queues.
    std::thread::sleep(Duration::from_secs(1));
    let mut fo = Fio::start(&FioJob {
        name: "origin",
        dev: &c,
        iodepth: 64,
        bs: "4k-4k",
        offset: 0,
        size: bytes,
        io_size: 4 << 20,
        seed: 2,
    })?;
    // Image writes land on e, the store.
    fio_wait(
        &mut [&mut fi, &mut fo],
        &[&image, &c, &ed],
        Duration::from_secs(240),
    )?;
    let took = start.elapsed().as_secs_f64();
    let wi = check_fio_or_pattern(&image, &fi.writes()?, 0, bytes, seed)?;
    let wo = check_fio_or_pattern(&c, &fo.writes()?, 0, bytes, seed)?;
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        0,
        "snapshot error"
    );
    println!(
        "    {} KiB through the image (iodepth 1024) and {} KiB to the origin (iodepth 64) \
         in {took:.1} s; every block of both verified",
        wi >> 10,
        wo >> 10
    );
    snap.destroy()
}

/// A snapshot of c whose store is on d, and a snapshot of d: every copy of
/// the first writes to d and waits for a copy of the second. Small chunks, a
/// long copy queue and 512 writes in flight on c (one copy each) make more
/// copies of the first wait at once than a workqueue runs (256).
fn storage_chain() -> TestResult {
    let (c, d) = (disk("blksnap-c")?, disk("blksnap-d")?);
    let size = dev::size_sectors(&c)?;
    let half = dev::size_sectors(&d)? / 2;
    let (sc, sd) = (51, 52);
    write_pattern(&c, 0, size, sc)?;
    write_pattern(&d, 0, 2 * half, sd)?;
    let _p = Params::set(&[
        ("chunk_minimum_shift", "14"),
        ("chunk_maximum_in_queue", "4096"),
    ])?;
    let (tc, td) = (Tracked::new(&c)?, Tracked::new(&d)?);
    // B: d, stored in memory. A: c, stored on the upper half of d.
    let sb = Snap::memory(64 * MIB)?;
    sb.add(&td.0)?;
    let sa = devices_snap()?;
    check_eq!(append(&sa, &d, &[(half, half)]), Ok(()), "A's store on d");
    sa.add(&tc.0)?;
    sb.take()?;
    sa.take()?;
    let (ia, ib) = (tc.image()?, td.image()?);
    let start = Instant::now();
    let mut fc = Fio::start(&FioJob {
        name: "chain-c",
        dev: &c,
        iodepth: 512,
        bs: "4k-4k",
        offset: 0,
        size: size * SECTOR,
        io_size: 4 << 20,
        seed: 3,
    })?;
    // Not in A's store.
    let mut fd = Fio::start(&FioJob {
        name: "chain-d",
        dev: &d,
        iodepth: 64,
        bs: "4k-4k",
        offset: 0,
        size: half * SECTOR,
        io_size: 2 << 20,
        seed: 4,
    })?;
    fio_wait(&mut [&mut fc, &mut fd], &[&c, &d], Duration::from_secs(240))?;
    let took = start.elapsed().as_secs_f64();
    check_eq!(tc.0.snapshot_info().map_err(e)?.error_code, 0, "error of A");
    check_eq!(td.0.snapshot_info().map_err(e)?.error_code, 0, "error of B");
    // Both images hold their snapshot; the image of d also where A's store
    // now is.
    check_device(&ia, |_| sc)?;
    check_device(&ib, |_| sd)?;
    let wc = check_fio_or_pattern(&c, &fc.writes()?, 0, size * SECTOR, sc)?;
    let wd = check_fio_or_pattern(&d, &fd.writes()?, 0, half * SECTOR, sd)?;
    println!(
        "    {} KiB to c and {} KiB to d in {took:.1} s with 16 KiB chunks; both images exact",
        wc >> 10,
        wd >> 10
    );
    sa.destroy()?;
    sb.destroy()
}

/// Writes 4 KiB blocks at random places of a device until stopped, and
/// records the worst latency of a write.
struct Writer {
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    count: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Writer {
    fn start(dev: &Path) -> Result<Self, String> {
        let f = dev::open_direct(dev, true)?;
        let blocks = dev::size_sectors(dev)? / 8;
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let count = Arc::new(AtomicU64::new(0));
        let (s, w, n) = (stop.clone(), worst_us.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let buf = AlignedBuf::new(4096, 0x5a);
            let mut rng = Rng(12345);
            while !s.load(Ordering::Relaxed) {
                let at = rng.below(blocks) * 4096;
                let t0 = Instant::now();
                f.write_all_at(buf.as_slice(), at)
                    .map_err(|e| format!("write at {at}: {e}"))?;
                w.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                n.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        Ok(Self {
            stop,
            worst_us,
            count,
            thread: Some(thread),
        })
    }

    /// The worst latency since the last call, in ms.
    fn take_worst_ms(&self) -> f64 {
        self.worst_us.swap(0, Ordering::Relaxed) as f64 / 1000.0
    }

    fn finish(mut self) -> TestResult {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !t.is_finished() {
            if Instant::now() > deadline {
                fail!("the writer did not stop within 30 s (a write hangs)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join().map_err(|_| "writer panicked".to_string())?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// CBTDIRTY with 65536 ranges, at 512-byte tracking blocks, while a writer
/// writes to the device: first random overlapping ranges, then 65536 times
/// the whole device. Each completes in bounded time with the exact map, the
/// writes go on meanwhile, and no lockup is logged.
fn cbtdirty_bounded() -> TestResult {
    let c = disk("blksnap-c")?;
    unload().map_err(|e| format!("unload: {e}"))?;
    dev::load_module("tracking_block_minimum_shift=9")?;
    let r = cbtdirty_with_small_blocks(&c);
    let unloaded = unload().map_err(|e| format!("unload after the test: {e}"));
    dev::load_module("")?;
    r.and(unloaded)
}

/// The longest a write may wait while CBTDIRTY runs. The map lock is held
/// for a bounded number of blocks at a time (microseconds of work), so a
/// write waits for at most one such hold; what remains is the scheduling
/// noise of two emulated CPUs under TCG, whose worst write latency without
/// CBTDIRTY is printed as the baseline (tens to a few hundred ms). The old
/// code held the lock for all 2^33 block updates: minutes.
const WORST_WRITE_MS: f64 = 2000.0;

/// CBTDIRTY returns within this.
const CBTDIRTY_SECS: u64 = 60;

fn cbtdirty_with_small_blocks(c: &Path) -> TestResult {
    let size = dev::size_sectors(c)?;
    let t = Tracked::new(c)?;
    let info = t.0.cbt_info().map_err(e)?;
    check_eq!(
        (info.block_size, u64::from(info.block_count)),
        (512, size),
        "512-byte blocks"
    );
    // A snapshot, destroyed at once, makes CBTDIRTY mark the snapshot's map
    // (CBTMAP) with number 1, which writes never touch: the map can be
    // checked exactly while the writer runs.
    let s = Snap::memory(8 * MIB)?;
    s.add(&t.0)?;
    s.take()?;
    s.destroy()?;
    check_eq!(
        t.0.read_cbt_map(MapKind::Snapshot)
            .map_err(e)?
            .iter()
            .filter(|&&b| b != 0)
            .count(),
        0,
        "blocks marked in CBTMAP before CBTDIRTY"
    );
    let mut log = KernelLog::open()?;
    let w = Writer::start(c)?;
    std::thread::sleep(Duration::from_secs(2));
    let baseline = w.take_worst_ms();
    let tracker = Arc::new(Tracker::open(c).map_err(e)?);
    let mark = |ranges: Vec<SectorRange>, what: &'static str| -> Result<f64, String> {
        let tr = tracker.clone();
        let start = Instant::now();
        bounded(what, CBTDIRTY_SECS, move || tr.mark_dirty(&ranges))?
            .map_err(|e| format!("{what}: {e}"))?;
        Ok(start.elapsed().as_secs_f64())
    };
    // 1: random ranges of up to 4096 sectors, overlapping many times over.
    let mut rng = Rng(777);
    let mut want = vec![0u8; size as usize];
    let ranges: Vec<SectorRange> = (0..65536)
        .map(|_| {
            let count = 1 + rng.below(4096);
            let offset = rng.below(size - count + 1);
            want[offset as usize..(offset + count) as usize].fill(1);
            SectorRange { offset, count }
        })
        .collect();
    let t1 = mark(ranges, "CBTDIRTY of 65536 random ranges")?;
    let w1 = w.take_worst_ms();
    let map = t.0.read_cbt_map(MapKind::Snapshot).map_err(e)?;
    if let Some(b) = (0..map.len()).find(|&b| map[b] != want[b]) {
        fail!(
            "CBTMAP after the random ranges: block {b} is {}, want {}",
            map[b],
            want[b]
        );
    }
    // 2: the whole device, 65536 times.
    let whole = vec![
        SectorRange {
            offset: 0,
            count: size
        };
        65536
    ];
    let t2 = mark(whole, "CBTDIRTY of 65536 whole-device ranges")?;
    let w2 = w.take_worst_ms();
    let writes = w.count.load(Ordering::Relaxed);
    w.finish()?;
    let map = t.0.read_cbt_map(MapKind::Snapshot).map_err(e)?;
    if let Some(b) = map.iter().position(|&x| x != 1) {
        fail!(
            "CBTMAP after the whole-device ranges: block {b} is {}, want 1",
            map[b]
        );
    }
    let active = t.0.read_cbt_map(MapKind::Active).map_err(e)?;
    if let Some(b) = active.iter().position(|&x| x != 2) {
        fail!(
            "active map after the whole-device ranges: block {b} is {}, want 2",
            active[b]
        );
    }
    println!(
        "    CBTDIRTY: random ranges {t1:.2} s, whole device x65536 {t2:.2} s; \
         worst write {w1:.0} ms and {w2:.0} ms (baseline {baseline:.0} ms, bound \
         {WORST_WRITE_MS:.0} ms), {writes} writes"
    );
    if w1.max(w2) > WORST_WRITE_MS {
        fail!(
            "a write waited {:.0} ms during CBTDIRTY (bound {WORST_WRITE_MS:.0} ms, \
             baseline {baseline:.0} ms)",
            w1.max(w2)
        );
    }
    no_lockups(&log.lines())
}

/// Two threads create, add, take, read and destroy snapshots of c and d,
/// 200 rounds each; then the module unloads promptly. The image names are
/// reused all the time: a name must be free only once its disk is gone.
fn parallel_take_destroy() -> TestResult {
    const ROUNDS: usize = 200;
    /// A round takes well under a second; none may take this long.
    const STALL_SECS: u64 = 30;
    let (c, d) = (disk("blksnap-c")?, disk("blksnap-d")?);
    let failed = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let loops: Vec<_> = [c, d]
        .into_iter()
        .map(|dev| {
            let (failed, done) = (failed.clone(), done.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let t = Tracked::new(&dev)?;
                let first = dev::read_direct(&dev, 0, 8)?;
                for round in 0..ROUNDS {
                    if failed.load(Ordering::Relaxed) {
                        return Ok(round);
                    }
                    let r = (|| -> TestResult {
                        let s = Snap::memory(8 * MIB)?;
                        s.add(&t.0)?;
                        s.take()?;
                        let image = t.image()?;
                        check_eq!(
                            dev::read_direct(&image, 0, 8)?,
                            first,
                            "first 4 KiB of {}",
                            image.display()
                        );
                        s.destroy()
                    })();
                    if let Err(err) = r {
                        failed.store(true, Ordering::Relaxed);
                        fail!("{} round {round}: {err}", dev.display());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(ROUNDS)
            })
        })
        .collect();
    let (mut last, mut progress) = (0, Instant::now());
    while !loops.iter().all(|l| l.is_finished()) {
        let now = done.load(Ordering::Relaxed);
        if now != last {
            (last, progress) = (now, Instant::now());
        }
        if progress.elapsed() > Duration::from_secs(STALL_SECS) {
            fail!("no take/destroy round ended in {STALL_SECS} s after {last} rounds (hung?)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rounds = 0;
    let mut errors = Vec::new();
    for l in loops {
        match l.join().map_err(|_| "a loop panicked".to_string())? {
            Ok(n) => rounds += n,
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        fail!("{}", errors.join("; "));
    }
    let loops_s = start.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let unloaded = bounded("rmmod", 60, unload)?;
    unloaded.map_err(|e| format!("rmmod after the loops: {e}"))?;
    let unload_s = t0.elapsed().as_secs_f64();
    dev::load_module("")?;
    println!("    {rounds} rounds in {loops_s:.1} s; rmmod took {unload_s:.2} s");
    Ok(())
}

/// Fault injection for the calling thread: the `n`-th fault point it
/// passes fails (/proc/thread-self/fail-nth), sleeping allocations included.
/// The file stays open: opening it would pass a fault point itself.
struct Faults {
    old: Vec<(String, String)>,
    nth: File,
}

impl Faults {
    fn setup() -> Result<Self, String> {
        let nth = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/thread-self/fail-nth")
            .map_err(|e| format!("the kernel has no fault injection: fail-nth: {e}"))?;
        let mut f = Self {
            old: Vec::new(),
            nth,
        };
        for (file, value) in [
            ("failslab/ignore-gfp-wait", "N"),
            ("failslab/verbose", "0"),
            ("fail_page_alloc/ignore-gfp-wait", "N"),
            ("fail_page_alloc/verbose", "0"),
        ] {
            let p = format!("/sys/kernel/debug/{file}");
            let was = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
            std::fs::write(&p, value).map_err(|e| format!("{p}: {e}"))?;
            f.old.push((p, was.trim().to_string()));
        }
        Ok(f)
    }

    fn set_nth(&self, n: u32) -> TestResult {
        self.nth
            .write_at(n.to_string().as_bytes(), 0)
            .map(|_| ())
            .map_err(|e| format!("fail-nth: {e}"))
    }

    /// True if the fault was injected (the count ran down); disarms it.
    fn fired(&self) -> Result<bool, String> {
        let mut buf = [0u8; 32];
        let n = self
            .nth
            .read_at(&mut buf, 0)
            .map_err(|e| format!("fail-nth: {e}"))?;
        let v = String::from_utf8_lossy(&buf[..n]).to_string();
        let left: u32 = v.trim().parse().map_err(|_| format!("fail-nth: {v}"))?;
        self.set_nth(0)?;
        Ok(left == 0)
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        let _ = self.set_nth(0);
        for (p, v) in self.old.iter().rev() {
            let _ = std::fs::write(p, v);
        }
    }
}

/// Image devices that exist.
fn images() -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("blk-snap-image"))
                .collect()
        })
        .unwrap_or_default()
}

/// Each allocation of a take in turn fails, while a writer writes to the
/// device: the take fails (with ENOMEM, mostly) or succeeds, the writes all complete
/// (none fails, none is lost), no image slot leaks, and the snapshot can be
/// destroyed.
fn take_faults() -> TestResult {
    const MAX_POINTS: u32 = 400;
    let c = disk("blksnap-c")?;
    let blocks = dev::size_sectors(&c)? / 8;
    let seed = 61;
    write_pattern(&c, 0, blocks * 8, seed)?;
    let t = Tracked::new(&c)?;
    if !images().is_empty() {
        fail!("images exist before the test: {:?}", images());
    }
    // The writer: 4 KiB blocks, each filled with its number and a
    // generation, remembered in a shadow map.
    let shadow = Arc::new(Mutex::new(vec![0u32; blocks as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let writer = {
        let (shadow, stop, count) = (shadow.clone(), stop.clone(), count.clone());
        let f = dev::open_direct(&c, true)?;
        std::thread::spawn(move || -> TestResult {
            let mut buf = AlignedBuf::new(4096, 0);
            let mut rng = Rng(4242);
            let mut gen = 0u32;
            while !stop.load(Ordering::Relaxed) {
                gen += 1;
                let b = rng.below(blocks);
                fill_block(buf.as_mut_slice(), b, gen);
                f.write_all_at(buf.as_slice(), b * 4096)
                    .map_err(|e| format!("write of block {b} (generation {gen}): {e}"))?;
                shadow.lock().unwrap()[b as usize] = gen;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let faults = Faults::setup()?;
    let (mut failed, mut ok_anyway, mut corrupted, mut points, mut tried) = (0, 0, 0, 0, 0);
    let mut errnos = std::collections::BTreeMap::new();
    let result = (|| -> TestResult {
        // Every point of the first 32 (the checks before anything is set
        // up), then every `step`th: every 16th in `make test` (a take has
        // about 280 points, 4 s each), every 2nd in `make soak`;
        // `BLKSNAP_FAULT_STEP=1` tries them all.
        let step: u32 = std::env::var("BLKSNAP_FAULT_STEP")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&s| s > 0)
            .unwrap_or(if dev::soak() { 2 } else { 16 });
        for n in (1..=MAX_POINTS).filter(|n| *n <= 32 || n % step == 0) {
            if writer.is_finished() {
                fail!("the writer stopped at fault point {n}");
            }
            let s = Snap::memory(32 * MIB)?;
            s.add(&t.0)?;
            faults.set_nth(n)?;
            let r = s.ctl.snapshot_take(&s.id).map_err(|e| e.errno);
            let fired = faults.fired()?;
            points = n;
            tried += 1;
            match r {
                Ok(()) => {
                    let info = t.0.snapshot_info().map_err(e)?;
                    // The writes held during the take go on in the taking
                    // thread: a copy-on-write that finds no memory there
                    // marks the snapshot corrupted (ENOMEM); the write goes
                    // on to the device all the same.
                    let code = info.error_code;
                    check_eq!(
                        (code == 0 || code == -12, info.image.as_str()),
                        (true, "blk-snap-image0"),
                        "state after a take that succeeded (fault point {n}, error {code})"
                    );
                    corrupted += u32::from(code != 0);
                    if !fired {
                        // Past the last fault point of a take.
                        s.destroy()?;
                        break;
                    }
                    ok_anyway += 1;
                }
                Err(errno) => {
                    if !fired {
                        fail!("take failed with {errno} without an injected fault");
                    }
                    // Mostly ENOMEM; a failed allocation inside the block
                    // layer (adding the image disk) may give another errno.
                    failed += 1;
                    *errnos.entry(format!("{errno:?}")).or_insert(0) += 1;
                    if !images().is_empty() {
                        fail!(
                            "fault point {n}: a take that failed with {errno} left images {:?}",
                            images()
                        );
                    }
                }
            }
            // The writes go on, whatever happened.
            let before = count.load(Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(10);
            while count.load(Ordering::Relaxed) < before + 2 {
                if writer.is_finished() {
                    break;
                }
                if Instant::now() > deadline {
                    fail!("fault point {n}: the writes stopped (held for good?)");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            s.destroy()
                .map_err(|err| format!("destroy after fault point {n}: {err}"))?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while !images().is_empty() {
                if Instant::now() > deadline {
                    fail!("fault point {n}: images left after destroy: {:?}", images());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // udev's probe may still hold the deleted image open, and its
            // number stays in use until that last opener is gone: wait for
            // it, so that a leaked number shows as a take getting image1.
            dev::udev_settle();
            if n == MAX_POINTS {
                fail!("a take has more than {MAX_POINTS} fault points?");
            }
        }
        Ok(())
    })();
    drop(faults);
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !writer.is_finished() {
        if Instant::now() > deadline {
            fail!("the writer hangs; before: {result:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let written = writer.join().map_err(|_| "writer panicked".to_string())?;
    result?;
    written?;
    // Every write is on the device, and nothing else changed.
    let shadow = shadow.lock().unwrap();
    let f = dev::open_direct(&c, false)?;
    let mut buf = AlignedBuf::new(4096, 0);
    let mut want = vec![0u8; 4096];
    for b in 0..blocks {
        f.read_exact_at(buf.as_mut_slice(), b * 4096)
            .map_err(|e| e.to_string())?;
        match shadow[b as usize] {
            0 => pattern(&mut want, b * 8, seed),
            gen => fill_block(&mut want, b, gen),
        }
        if buf.as_slice() != &want[..] {
            fail!(
                "block {b} of the origin is not what was written last (generation {})",
                shadow[b as usize]
            );
        }
    }
    println!(
        "    {points} fault points, {tried} tried: {failed} takes failed ({errnos:?}), {ok_anyway} succeeded \
         anyway ({corrupted} of them corrupted by a failed copy-on-write); {} writes, all on \
         the device",
        count.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Fills a 4 KiB block with its number and a generation.
fn fill_block(buf: &mut [u8], block: u64, gen: u32) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = block | (u64::from(gen) << 32) | ((i as u64) << 56);
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// Copy-on-write holds the first write to a chunk only until the chunk's old
/// data is in memory; storing it goes on behind the write. The store is on
/// the write-throttled disk `blksnap-g` (64 KiB/s: a 256 KiB chunk takes 4 s
/// to store, after a first write that passes at once): a 4 KiB write to a
/// chunk not copied yet returns in well under that. An image read of the
/// chunk meanwhile waits until it is stored and returns the old data.
fn cow_releases_after_read() -> TestResult {
    const CHUNK: u64 = 512; // sectors: the 256 KiB chunks of a 64 MiB disk
    let (c, t, snap, image) = slow_store_snapshot(111)?;
    // Spends the store's write that passes the throttle at once.
    write_pattern(&c, CHUNK, 8, 112)?;
    let at = Instant::now();
    write_pattern(&c, 4 * CHUNK, 8, 112)?;
    let took = at.elapsed();
    let at = Instant::now();
    let got = dev::read_direct(&image, 4 * CHUNK, CHUNK)?;
    let read_took = at.elapsed();
    println!(
        "    first write to a chunk: {} ms; image read of it while it is stored: {} ms",
        took.as_millis(),
        read_took.as_millis()
    );
    let mut want = vec![0u8; (CHUNK * SECTOR) as usize];
    pattern(&mut want, 4 * CHUNK, 111);
    if got != want {
        fail!("the image read of a chunk being stored differs from the snapshot");
    }
    let mut want = vec![0u8; (8 * SECTOR) as usize];
    pattern(&mut want, 4 * CHUNK, 112);
    check_eq!(
        dev::read_direct(&c, 4 * CHUNK, 8)? == want,
        true,
        "the write landed on the origin"
    );
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        0,
        "snapshot error"
    );
    if took > Duration::from_secs(2) {
        fail!(
            "the first write to a chunk took {} ms: it waited for the store, not only for the read",
            took.as_millis()
        );
    }
    snap.destroy()
}

/// io_uring submits O_DIRECT writes with REQ_NOWAIT first and retries from a
/// worker only an EAGAIN it gets while submitting. A first write to a chunk
/// must therefore not be held with REQ_NOWAIT still set: resubmitted later
/// from a copy's worker, a 1 MiB bio that the disk must split (or that finds
/// no free tag) fails with EAGAIN, and that error reached the program
/// (`make bench` found it). fio writes the whole device once, 1 MiB at
/// iodepth 8 with io_uring, then reads it back to verify; the image keeps
/// the old data.
fn io_uring_first_writes() -> TestResult {
    let c = disk("blksnap-c")?;
    let size = dev::size_sectors(&c)?;
    // Every 1 MiB bio must be split on its way to the disk: the split of a
    // REQ_NOWAIT bio fails with EAGAIN.
    let limit = dev::sysfs_dir(&c).join("queue/max_sectors_kb");
    let old_limit = std::fs::read_to_string(&limit).map_err(|e| e.to_string())?;
    std::fs::write(&limit, "64").map_err(|e| format!("{}: {e}", limit.display()))?;
    let r = io_uring_first_writes_on(&c, size);
    let _ = std::fs::write(&limit, old_limit.trim());
    r
}

fn io_uring_first_writes_on(c: &Path, size: u64) -> TestResult {
    let c = c.to_path_buf();
    let t = Tracked::new(&c)?;
    write_pattern(&c, 0, size, 121)?;
    let snap = Snap::create(&dev::scratch(), 2 * size)?;
    snap.add(&t.0)?;
    snap.take()?;
    let image = t.image()?;
    let name = c.display().to_string();
    let out = dev::run(
        "fio",
        &[
            "--name=first",
            &format!("--filename={name}"),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    if let Err(e) = out {
        let first = e
            .lines()
            .find(|l| l.contains("error") || l.contains("Resource"))
            .unwrap_or("")
            .to_string();
        fail!("fio io_uring first writes failed: {first}");
    }
    check_eq!(
        t.0.snapshot_info().map_err(e)?.error_code,
        0,
        "snapshot error"
    );
    check_device(&image, |_| 121)?;
    snap.destroy()
}
