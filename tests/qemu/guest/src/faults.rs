// SPDX-License-Identifier: GPL-2.0

//! Fault injection: the module's allocations fail (`failslab`,
//! `fail_page_alloc`, limited by the stack trace filter to allocations with
//! the module's code on the stack) and its storage's I/O fails
//! (`fail_make_request` on the storage device), at random points of the
//! take, copy-on-write, image reads, storage growth and destroy.
//!
//! Every injected failure must end in a clear errno from the ioctl, or in
//! the snapshot marked corrupted with a `corrupted` event, or in an image
//! read failing; never in a splat, a hang, a wrong image of a snapshot that
//! reports no error, or an origin write lost. Each test prints a table:
//! faults injected by kind and phase, and what each ended in.
//!
//! The ioctl paths (create, attach, add, append, take, destroy) are swept
//! with the per-task `fail-nth`: the Nth allocation of the call fails, for
//! N over all the allocations the call makes (every one of them in `make
//! soak`, evenly spread ones in `make test`). Copy-on-write, image reads
//! and growth run in workers: there the fault attributes fail one
//! allocation at a random point (`probability`, `times` 1).

use crate::dev::{self, AlignedBuf, SECTOR};
use crate::snap::{e, pattern, write_pattern, Rng};
use crate::{fail, TestResult};
use blksnap::{Control, Event, SectorRange, SnapshotId, Tracker};
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

type Test = (&'static str, fn() -> TestResult);

/// The fault injection tests.
pub const ALL: &[Test] = &[
    ("faults_ioctl_paths_fail_nth", ioctl_paths),
    ("faults_cow_image_reads_growth_store_io", async_paths),
];

const DBG: &str = "/sys/kernel/debug";
const MIB_SECTORS: u64 = 2048;

/// A fault attribute in debugfs.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Slab,
    PageAlloc,
    StoreIo,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Slab => "failslab",
            Kind::PageAlloc => "fail_page_alloc",
            Kind::StoreIo => "fail_make_request",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Slab => "slab",
            Kind::PageAlloc => "page alloc",
            Kind::StoreIo => "store I/O",
        }
    }
}

const KINDS: [Kind; 3] = [Kind::Slab, Kind::PageAlloc, Kind::StoreIo];

fn set(kind: Kind, file: &str, value: &str) -> TestResult {
    let p = Path::new(DBG).join(kind.dir()).join(file);
    std::fs::write(&p, value).map_err(|e| format!("{} = {value}: {e}", p.display()))
}

fn get(kind: Kind, file: &str) -> Result<String, String> {
    let p = Path::new(DBG).join(kind.dir()).join(file);
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn times(kind: Kind) -> Result<i64, String> {
    get(kind, "times")?
        .parse()
        .map_err(|e| format!("times of {}: {e}", kind.dir()))
}

/// The kernel's defaults of every attribute, then the ones these tests
/// need: sleeping allocations fail too, of any order, only those made with
/// the module's code on the stack (`require-start`/`require-end` = its
/// text), from any task; nothing fails until armed.
fn setup_attrs(text: (u64, u64)) -> TestResult {
    for k in KINDS {
        for (f, v) in [
            ("probability", "0"),
            ("interval", "1"),
            ("times", "0"),
            ("space", "0"),
            ("verbose", "1"),
            ("task-filter", "N"),
            ("stacktrace-depth", "32"),
            ("require-start", "0"),
            ("require-end", "0xffffffffffffffff"),
            ("reject-start", "0"),
            ("reject-end", "0"),
        ] {
            set(k, f, v)?;
        }
    }
    set(Kind::Slab, "ignore-gfp-wait", "N")?;
    set(Kind::Slab, "cache-filter", "N")?;
    set(Kind::PageAlloc, "ignore-gfp-wait", "N")?;
    set(Kind::PageAlloc, "ignore-gfp-highmem", "N")?;
    set(Kind::PageAlloc, "min-order", "0")?;
    // Not inside kmem_cache_create (the module's bio sets make slab
    // caches): its error path leaks the cache's kobject name (kmemleak),
    // a defect of the kernel's slab code, not of the module.
    let reject = kernel_function("__kmem_cache_create_args")?;
    for k in [Kind::Slab, Kind::PageAlloc] {
        set(k, "require-start", &format!("{:#x}", text.0))?;
        set(k, "require-end", &format!("{:#x}", text.1))?;
        set(k, "reject-start", &format!("{:#x}", reject.0))?;
        set(k, "reject-end", &format!("{:#x}", reject.1))?;
    }
    Ok(())
}

/// The address range of a kernel function: from its symbol to the next
/// one, in /proc/kallsyms.
fn kernel_function(name: &str) -> Result<(u64, u64), String> {
    let syms =
        std::fs::read_to_string("/proc/kallsyms").map_err(|e| format!("/proc/kallsyms: {e}"))?;
    let mut addrs: Vec<(u64, &str)> = syms
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let a = u64::from_str_radix(it.next()?, 16).ok()?;
            let kind = it.next()?;
            let n = it.next()?;
            (matches!(kind, "t" | "T") && it.next().is_none()).then_some((a, n))
        })
        .collect();
    addrs.sort_unstable();
    let i = addrs
        .iter()
        .position(|(_, n)| *n == name)
        .ok_or_else(|| format!("{name} not in /proc/kallsyms"))?;
    let start = addrs[i].0;
    let end = addrs[i + 1..]
        .iter()
        .map(|(a, _)| *a)
        .find(|a| *a > start)
        .ok_or_else(|| format!("no symbol after {name}"))?;
    if start == 0 {
        fail!("{name} at address 0 (kptr_restrict?)");
    }
    Ok((start, end))
}

/// Everything off, whatever happened: no later test is affected.
struct AttrsOff;

impl Drop for AttrsOff {
    fn drop(&mut self) {
        let _ = set_nth(0);
        for k in KINDS {
            let _ = set(k, "probability", "0");
            let _ = set(k, "times", "0");
        }
        for k in [Kind::Slab, Kind::PageAlloc] {
            let _ = set(k, "ignore-gfp-wait", "Y");
            let _ = set(k, "require-start", "0");
            let _ = set(k, "require-end", "0xffffffffffffffff");
            let _ = set(k, "reject-start", "0");
            let _ = set(k, "reject-end", "0");
        }
        let _ = set(Kind::PageAlloc, "ignore-gfp-highmem", "Y");
        let _ = set(Kind::PageAlloc, "min-order", "1");
    }
}

/// The address range of the module's code: the executable sections of
/// blksnap.ko, where /sys/module/blksnap/sections says they are.
fn module_text() -> Result<(u64, u64), String> {
    let ko = dev::module_path()?;
    let elf = std::fs::read(&ko).map_err(|e| format!("{}: {e}", ko.display()))?;
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        fail!("{} is not a 64-bit ELF file", ko.display());
    }
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(0x28) as usize,
        u16_at(0x3a),
        u16_at(0x3c),
        u16_at(0x3e),
    );
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(sh(shstrndx) + 24) as usize;
    let mut lo = u64::MAX;
    let mut hi = 0;
    let mut names = Vec::new();
    for i in 0..shnum {
        let h = sh(i);
        let flags = u64_at(h + 8);
        let size = u64_at(h + 32);
        if flags & 0x4 == 0 || size == 0 {
            continue;
        }
        let name_off = strtab + u32_at(h);
        let end = elf[name_off..].iter().position(|&b| b == 0).unwrap_or(0);
        let name = String::from_utf8_lossy(&elf[name_off..name_off + end]).to_string();
        if name.starts_with(".init") {
            continue;
        }
        let Ok(addr) = std::fs::read_to_string(format!("/sys/module/blksnap/sections/{name}"))
        else {
            continue;
        };
        let addr = u64::from_str_radix(addr.trim().trim_start_matches("0x"), 16)
            .map_err(|e| format!("section {name}: {e}"))?;
        if addr == 0 {
            fail!("the address of section {name} reads 0 (kptr_restrict?)");
        }
        lo = lo.min(addr);
        hi = hi.max(addr + size);
        names.push(name);
    }
    if hi == 0 {
        fail!(
            "no executable section of {} found in /sys/module/blksnap/sections",
            ko.display()
        );
    }
    println!(
        "    module text {lo:#x}..{hi:#x} ({} KiB: {})",
        (hi - lo) >> 10,
        names.join(" ")
    );
    Ok((lo, hi))
}

/// The calling thread's `fail-nth`: the Nth allocation that may fail, in
/// this task, fails (0: off).
fn set_nth(n: u64) -> TestResult {
    std::fs::write("/proc/thread-self/fail-nth", n.to_string())
        .map_err(|e| format!("fail-nth = {n}: {e}"))
}

fn get_nth() -> Result<u64, String> {
    std::fs::read_to_string("/proc/thread-self/fail-nth")
        .map_err(|e| format!("fail-nth: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("fail-nth: {e}"))
}

/// Faults by kind and phase, and what each ended in.
#[derive(Default)]
struct Table {
    rows: BTreeMap<(Kind, &'static str), Row>,
    failures: Vec<String>,
}

#[derive(Default)]
struct Row {
    rounds: u64,
    injected: u64,
    outcomes: BTreeMap<String, u64>,
}

impl Table {
    fn record(&mut self, kind: Kind, phase: &'static str, injected: bool, outcome: &str) {
        let row = self.rows.entry((kind, phase)).or_default();
        row.rounds += 1;
        if injected {
            row.injected += 1;
            *row.outcomes.entry(outcome.to_string()).or_default() += 1;
        }
    }

    fn fail(&mut self, msg: String) {
        if self.failures.len() < 20 {
            self.failures.push(msg);
        }
    }

    fn print(&self) {
        println!(
            "    {:<11} {:<28} {:>6} {:>8}  ended in",
            "fault", "phase", "rounds", "injected"
        );
        for ((kind, phase), row) in &self.rows {
            let out: Vec<String> = row
                .outcomes
                .iter()
                .map(|(o, n)| format!("{o}: {n}"))
                .collect();
            println!(
                "    {:<11} {:<28} {:>6} {:>8}  {}",
                kind.name(),
                phase,
                row.rounds,
                row.injected,
                out.join(", ")
            );
        }
    }

    fn result(&self) -> TestResult {
        if let Some(f) = self.failures.first() {
            for f in &self.failures {
                println!("    failure: {f}");
            }
            fail!("{} failures, the first: {f}", self.failures.len());
        }
        Ok(())
    }
}

/// The origin of the tests: a loop device of 8 MiB on tmpfs, and what the
/// test wrote where (a pattern seed per sector).
struct Origin {
    lo: dev::LoopDev,
    shadow: Vec<u64>,
    seed: u64,
}

impl Origin {
    fn new(name: &str) -> Result<Self, String> {
        let lo = dev::LoopDev::new(name, 8 << 20)?;
        let sectors = dev::size_sectors(&lo.path)?;
        write_pattern(&lo.path, 0, sectors, 1)?;
        Ok(Self {
            lo,
            shadow: vec![1; sectors as usize],
            seed: 1,
        })
    }

    fn path(&self) -> &Path {
        &self.lo.path
    }

    /// Writes `n` random ranges with a new seed. A failed write is an
    /// origin write lost.
    fn write(&mut self, rng: &mut Rng, n: usize) -> TestResult {
        self.seed += 1;
        let sectors = self.shadow.len() as u64;
        for _ in 0..n {
            let len = 1 + rng.below(1024);
            let start = rng.below(sectors - len);
            write_pattern(&self.lo.path, start, len, self.seed)
                .map_err(|err| format!("an origin write failed: {err}"))?;
            for s in start..start + len {
                self.shadow[s as usize] = self.seed;
            }
        }
        Ok(())
    }

    /// Every sector of the origin is what was written last.
    fn check(&self) -> TestResult {
        let bad = crate::fuzz::compare(&self.lo.path, &self.shadow)?;
        if !bad.is_empty() {
            fail!(
                "the origin lost writes: {}",
                crate::fuzz::mismatch(&self.lo.path, &bad)
            );
        }
        Ok(())
    }
}

/// Destroys every snapshot and detaches a device when dropped: a failed
/// test leaves nothing behind.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = set_nth(0);
        if let Ok(ctl) = Control::open() {
            for id in ctl.snapshot_collect().unwrap_or_default() {
                let _ = ctl.snapshot_destroy(&id);
            }
        }
        if let Ok(t) = Tracker::open(&self.0) {
            let _ = t.detach();
        }
    }
}

/// The image of the origin's snapshot, once its node exists.
fn image_of(t: &Tracker) -> Result<Option<PathBuf>, String> {
    let info = t.snapshot_info().map_err(e)?;
    if info.image.is_empty() {
        return Ok(None);
    }
    let p = PathBuf::from(format!("/dev/{}", info.image));
    for _ in 0..100 {
        if p.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(p))
}

/// The events of a snapshot now.
fn events(ctl: &Control, id: &SnapshotId) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = ctl.snapshot_wait_event(id, 0) {
        out.push(ev);
    }
    out
}

/// Checks a snapshot after a fault: if the device's snapshot reports an
/// error, its corrupted event came with that errno and the image fails to
/// read with EIO; otherwise the image is the origin at the take. Returns
/// the outcome.
fn check_snapshot(
    ctl: &Control,
    id: &SnapshotId,
    t: &Tracker,
    at_take: &[u64],
) -> Result<String, String> {
    // Let the copies in flight end.
    std::thread::sleep(Duration::from_millis(50));
    let info = t.snapshot_info().map_err(e)?;
    let evs = events(ctl, id);
    let (major, minor) = dev::major_minor(t.path())?;
    if info.error_code != 0 {
        let errno = -info.error_code;
        let want = Event::Corrupted {
            major,
            minor,
            errno,
        };
        if !evs.contains(&want) {
            fail!(
                "snapshot {id} reports error {} but its events are {evs:?}",
                info.error_code
            );
        }
        if let Some(img) = image_of(t)? {
            match dev::read_direct(&img, 0, 8) {
                Err(err) if err.contains("Input/output error") => {}
                other => fail!("reading the image of corrupted snapshot {id}: {other:?}, want EIO"),
            }
        }
        return Ok(format!("corrupted event ({:?})", Errno::from_raw(errno)));
    }
    if let Some(ev) = evs.iter().find(|ev| matches!(ev, Event::Corrupted { .. })) {
        fail!("snapshot {id} reports no error but had event {ev:?}");
    }
    let Some(img) = image_of(t)? else {
        fail!("snapshot {id} reports no error and has no image");
    };
    let bad = crate::fuzz::compare(&img, at_take)?;
    if !bad.is_empty() {
        // An error may have come meanwhile.
        if t.snapshot_info().map_err(e)?.error_code == 0 {
            fail!(
                "snapshot {id} reports no error but its image is wrong: {}",
                crate::fuzz::mismatch(&img, &bad)
            );
        }
    }
    Ok("no effect, image right".into())
}

/// Runs `f` in a thread, at most `secs` seconds: a hang in the kernel
/// becomes a failure (the stuck thread is left behind).
fn bounded(secs: u64, f: fn() -> TestResult) -> TestResult {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let start = std::time::Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                crate::kmsg_poll();
                if start.elapsed() > Duration::from_secs(secs) {
                    fail!(
                        "not done within {secs} s: a hang? {}",
                        dev::blocked_threads()
                    );
                }
            }
            Err(err) => fail!("the test thread died: {err}"),
        }
    }
}

fn ioctl_paths() -> TestResult {
    bounded(if dev::soak() { 3600 } else { 300 }, ioctl_paths_body)
}

fn async_paths() -> TestResult {
    bounded(if dev::soak() { 3600 } else { 300 }, async_paths_body)
}

/// One fail-nth sweep over an ioctl path.
struct Sweep<'a> {
    table: &'a mut Table,
    phase: &'static str,
    /// Errnos the call may fail with when an allocation fails.
    allowed: &'a [Errno],
    max_points: u64,
}

impl Sweep<'_> {
    /// `setup` prepares a state; `call` makes the call under test; `after`
    /// checks the state after the call and returns the outcome (an
    /// outcome of the failed call, or its effect).
    fn run<S>(
        &mut self,
        mut setup: impl FnMut() -> Result<S, String>,
        mut call: impl FnMut(&mut S) -> Result<(), Errno>,
        mut after: impl FnMut(S, Result<(), Errno>) -> Result<String, String>,
    ) -> TestResult {
        // A dry run counts the allocations the call may fail.
        const BIG: u64 = 1 << 30;
        let mut s = setup()?;
        set_nth(BIG)?;
        let r = call(&mut s);
        let left = get_nth()?;
        set_nth(0)?;
        let points = BIG - left;
        if let Err(err) = r {
            fail!("{}: fails without a fault: {err}", self.phase);
        }
        after(s, r)?;
        let step = points.div_ceil(self.max_points).max(1);
        println!(
            "    {}: {points} allocations may fail, trying {}",
            self.phase,
            points.div_ceil(step)
        );
        let mut n = 1;
        while n <= points {
            let mut s = setup()?;
            let before = (times(Kind::Slab)?, times(Kind::PageAlloc)?);
            set_nth(n)?;
            let r = call(&mut s);
            let left = get_nth()?;
            set_nth(0)?;
            let after_t = (times(Kind::Slab)?, times(Kind::PageAlloc)?);
            let kind = if after_t.0 < before.0 {
                Some(Kind::Slab)
            } else if after_t.1 < before.1 {
                Some(Kind::PageAlloc)
            } else {
                None
            };
            let injected = left == 0 && kind.is_some();
            let what = match &r {
                Ok(()) => "0".to_string(),
                Err(err) => format!("{err:?}"),
            };
            if let Err(err) = r {
                if !self.allowed.contains(&err) {
                    self.table.fail(format!(
                        "{}: allocation {n} failed ({kind:?}): the call failed with {err:?}, not a clear errno ({:?})",
                        self.phase, self.allowed
                    ));
                }
            }
            match after(s, r) {
                Ok(outcome) => {
                    let o = if r.is_err() {
                        format!("{what} from the ioctl")
                    } else {
                        outcome
                    };
                    self.table
                        .record(kind.unwrap_or(Kind::Slab), self.phase, injected, &o);
                }
                Err(err) => self.table.fail(format!(
                    "{}: allocation {n} failed ({kind:?}), the call returned {what}: {err}",
                    self.phase
                )),
            }
            n += step;
        }
        Ok(())
    }
}

/// A snapshot of the origin with a memory storage, not taken.
fn added(ctl: &Control, t: &Tracker) -> Result<SnapshotId, String> {
    let id = ctl.snapshot_create_memory(32 * MIB_SECTORS).map_err(e)?;
    t.snapshot_add(&id).map_err(e)?;
    Ok(id)
}

fn ioctl_paths_body() -> TestResult {
    let text = module_text()?;
    let _off = AttrsOff;
    setup_attrs(text)?;
    for k in [Kind::Slab, Kind::PageAlloc] {
        set(k, "times", "1000000")?;
    }
    let soak = dev::soak();
    let max_points = dev::env_u64("BLKSNAP_FAULTS_POINTS", if soak { 100_000 } else { 20 });
    let mut table = Table::default();
    let origin = std::cell::RefCell::new(Origin::new("faults-origin")?);
    let t = Tracker::open(origin.borrow().path()).map_err(e)?;
    let _cleanup = Cleanup(origin.borrow().path().to_path_buf());
    let ctl = Control::open().map_err(e)?;
    let scratch = dev::scratch().join("faults");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let d = crate::snap::disk("blksnap-d")?;
    let rng = std::cell::RefCell::new(Rng(0xfa17));
    let enomem: &[Errno] = &[Errno::ENOMEM];

    // Attach: a failed attach leaves the device unattached, and attaching
    // again works.
    Sweep {
        table: &mut table,
        phase: "attach",
        allowed: enomem,
        max_points,
    }
    .run(
        || Ok(()),
        |_| t.attach().map_err(|e| e.errno),
        |_, r| {
            match (r, t.cbt_info()) {
                (Ok(()), Ok(_)) => {}
                (Err(_), Err(err)) if err.errno == Errno::ENOENT => {
                    t.attach().map_err(e)?;
                }
                (r, info) => fail!("after attach returned {r:?}, CBTINFO gives {info:?}"),
            }
            t.detach().map_err(e)?;
            Ok("attached".into())
        },
    )?;
    t.attach().map_err(e)?;

    // Create, with every kind of storage: a failed create leaves no
    // snapshot.
    // A tmpfs inode that cannot be allocated gives ENOSPC (shmem).
    let enomem_enospc: &[Errno] = &[Errno::ENOMEM, Errno::ENOSPC];
    for (phase, which) in [
        ("create: file storage", 0),
        ("create: memory storage", 1),
        ("create: device storage", 2),
    ] {
        Sweep {
            table: &mut table,
            phase,
            allowed: if which == 0 { enomem_enospc } else { enomem },
            max_points,
        }
        .run(
            || Ok(()),
            |_| {
                match which {
                    0 => ctl.snapshot_create(&scratch, 64 * MIB_SECTORS),
                    1 => ctl.snapshot_create_memory(64 * MIB_SECTORS),
                    _ => ctl.snapshot_create_devices(),
                }
                .map(|_| ())
                .map_err(|e| e.errno)
            },
            |_, r| {
                let ids = ctl.snapshot_collect().map_err(e)?;
                let want = usize::from(r.is_ok());
                if ids.len() != want {
                    fail!("after create returned {r:?}, {} snapshots exist", ids.len());
                }
                for id in &ids {
                    ctl.snapshot_destroy(id).map_err(e)?;
                }
                Ok("created".into())
            },
        )?;
    }

    // Append: a failed append leaves the storage as it was; appending the
    // same range again works.
    Sweep {
        table: &mut table,
        phase: "append storage",
        allowed: enomem,
        max_points,
    }
    .run(
        || ctl.snapshot_create_devices().map_err(e),
        |id| {
            ctl.snapshot_append_storage(
                id,
                &d,
                &[SectorRange {
                    offset: 0,
                    count: 16 * MIB_SECTORS,
                }],
            )
            .map_err(|e| e.errno)
        },
        |id, r| {
            let again = ctl.snapshot_append_storage(
                &id,
                &d,
                &[SectorRange {
                    offset: 0,
                    count: 16 * MIB_SECTORS,
                }],
            );
            let res = match (r, again) {
                (Ok(()), Err(err)) if err.errno == Errno::EINVAL => Ok("appended".into()),
                (Err(_), Ok(())) => Ok("appended".into()),
                (r, again) => Err(format!("append returned {r:?}, again: {again:?}")),
            };
            ctl.snapshot_destroy(&id).map_err(e)?;
            res
        },
    )?;

    // Add: a failed add leaves the device out of the snapshot; adding it
    // again works.
    Sweep {
        table: &mut table,
        phase: "add",
        allowed: enomem,
        max_points,
    }
    .run(
        || ctl.snapshot_create_memory(32 * MIB_SECTORS).map_err(e),
        |id| t.snapshot_add(id).map_err(|e| e.errno),
        |id, r| {
            let again = t.snapshot_add(&id);
            let res = match (r, again) {
                (Ok(()), Err(err)) if err.errno == Errno::EALREADY => Ok("added".into()),
                (Err(_), Ok(())) => Ok("added".into()),
                (r, again) => Err(format!("add returned {r:?}, again: {again:?}")),
            };
            ctl.snapshot_destroy(&id).map_err(e)?;
            res
        },
    )?;

    // Take: a take that fails leaves the snapshot untaken, and taking it
    // again works; one that succeeds gives the right image, or a snapshot
    // marked corrupted with its event.
    Sweep {
        table: &mut table,
        phase: "take",
        // An image disk that cannot be added gives add_disk's errno, which
        // is EINVAL for some of its allocations (upstream's take does the
        // same).
        allowed: &[Errno::ENOMEM, Errno::EINVAL],
        max_points,
    }
    .run(
        || added(&ctl, &t),
        |id| ctl.snapshot_take(id).map_err(|e| e.errno),
        |id, r| {
            if r.is_err() {
                // Before the switch the snapshot stays untaken and a retry
                // works; after it, upstream keeps it taken but released:
                // the retry gives EALREADY, and only destroy helps.
                match ctl.snapshot_take(&id) {
                    Ok(()) => {}
                    Err(err) if err.errno == Errno::EALREADY => {
                        let image = t.snapshot_info().map(|i| i.image).unwrap_or_default();
                        ctl.snapshot_destroy(&id).map_err(e)?;
                        if !image.is_empty() {
                            fail!("a take that failed after the switch left image {image}");
                        }
                        origin.borrow().check()?;
                        return Ok("failed after the switch, destroyed".into());
                    }
                    Err(err) => {
                        ctl.snapshot_destroy(&id).map_err(e)?;
                        fail!("take again after a failed take: {err}");
                    }
                }
            }
            let at_take = origin.borrow().shadow.clone();
            origin.borrow_mut().write(&mut rng.borrow_mut(), 4)?;
            let outcome = check_snapshot(&ctl, &id, &t, &at_take);
            origin.borrow().check()?;
            ctl.snapshot_destroy(&id).map_err(e)?;
            outcome
        },
    )?;

    // Destroy: never fails; afterwards the device is in no snapshot and
    // can be detached.
    Sweep {
        table: &mut table,
        phase: "destroy",
        allowed: &[],
        max_points,
    }
    .run(
        || {
            let id = added(&ctl, &t)?;
            ctl.snapshot_take(&id).map_err(e)?;
            origin.borrow_mut().write(&mut rng.borrow_mut(), 2)?;
            Ok(id)
        },
        |id| ctl.snapshot_destroy(id).map_err(|e| e.errno),
        |_, _| {
            let left = ctl.snapshot_collect().map_err(e)?;
            if !left.is_empty() {
                fail!("{} snapshots left after destroy", left.len());
            }
            if !t.snapshot_info().map_err(e)?.image.is_empty() {
                fail!("an image is left after destroy");
            }
            t.detach().map_err(e)?;
            t.attach().map_err(e)?;
            origin.borrow().check()?;
            Ok("destroyed".into())
        },
    )?;

    drop(_off);
    t.detach().map_err(e)?;
    drop(ctl);
    let _ = std::fs::remove_dir_all(&scratch);
    table.print();
    table.result()?;
    // Nothing leaked a reference: the module unloads.
    dev::reload_module("the faults")?;
    Ok(())
}

/// The phases that run in workers, with the storage each uses.
#[derive(Clone, Copy, Debug)]
enum Phase {
    Cow,
    ImageReads,
    Growth,
}

fn async_paths_body() -> TestResult {
    let text = module_text()?;
    let _off = AttrsOff;
    setup_attrs(text)?;
    let soak = dev::soak();
    let rounds = dev::env_u64("BLKSNAP_FAULTS_ROUNDS", if soak { 40 } else { 2 });
    let seed = dev::seed("BLKSNAP_FAULTS_SEED", 0xfa17_5eed);
    println!("    {rounds} rounds per fault kind and phase, seed {seed:#x} (replay: BLKSNAP_FAULTS_SEED={seed:#x} BLKSNAP_FAULTS_ROUNDS={rounds})");
    let mut rng = Rng(seed);
    let mut table = Table::default();
    let mut origin = Origin::new("faults-async")?;
    let t = Tracker::open(origin.path()).map_err(e)?;
    let _cleanup = Cleanup(origin.path().to_path_buf());
    t.attach().map_err(e)?;
    let ctl = Control::open().map_err(e)?;
    let scratch = dev::scratch().join("faults");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let d = crate::snap::disk("blksnap-d")?;
    let dname = d.file_name().unwrap().to_string_lossy().to_string();
    // The file storage grows by one chunk at a time.
    let _step = dev::ModuleParam::set("diff_storage_minimum", "512")?;
    let combos = [
        (Kind::Slab, Phase::Cow),
        (Kind::PageAlloc, Phase::Cow),
        (Kind::StoreIo, Phase::Cow),
        (Kind::Slab, Phase::ImageReads),
        (Kind::PageAlloc, Phase::ImageReads),
        (Kind::StoreIo, Phase::ImageReads),
        (Kind::Slab, Phase::Growth),
        (Kind::PageAlloc, Phase::Growth),
    ];
    for round in 0..rounds {
        for (kind, phase) in combos {
            let name = match phase {
                Phase::Cow => "copy-on-write",
                Phase::ImageReads => "image reads",
                Phase::Growth => "storage growth",
            };
            // The storage: on disk d for store I/O faults, a file that
            // grows for growth, memory otherwise.
            let id = match (kind, phase) {
                (Kind::StoreIo, _) => ctl.snapshot_create(&d, 0),
                (_, Phase::Growth) => ctl.snapshot_create(&scratch, 64 * MIB_SECTORS),
                _ => ctl.snapshot_create_memory(32 * MIB_SECTORS),
            }
            .map_err(e)?;
            let snap = crate::snap::Snap {
                id,
                ctl: Control::open().map_err(e)?,
            };
            t.snapshot_add(&id).map_err(e)?;
            ctl.snapshot_take(&id).map_err(e)?;
            let at_take = origin.shadow.clone();
            if let Phase::ImageReads = phase {
                origin.write(&mut rng, 8)?;
            }
            // Arm: one failure, at a random point.
            let p = 5 + rng.below(46);
            set(kind, "times", "1")?;
            set(kind, "probability", &p.to_string())?;
            if kind == Kind::StoreIo {
                std::fs::write(format!("/sys/block/{dname}/make-it-fail"), "1")
                    .map_err(|e| e.to_string())?;
            }
            let mut reads = BTreeMap::new();
            let r = match phase {
                Phase::Cow | Phase::Growth => origin.write(&mut rng, 8),
                Phase::ImageReads => {
                    read_image(&t, &at_take, &mut reads, &mut table, round)?;
                    Ok(())
                }
            };
            set(kind, "probability", "0")?;
            if kind == Kind::StoreIo {
                std::fs::write(format!("/sys/block/{dname}/make-it-fail"), "0")
                    .map_err(|e| e.to_string())?;
            }
            let injected = times(kind)? == 0;
            set(kind, "times", "0")?;
            if let Err(err) = r {
                table.fail(format!("{name}, {} fault: {err}", kind.name()));
            }
            let outcome = match check_snapshot(&ctl, &id, &t, &at_take) {
                Ok(o) => o,
                Err(err) => {
                    table.fail(format!(
                        "round {round}, {name}, {} fault (injected: {injected}): {err}",
                        kind.name()
                    ));
                    "wrong".into()
                }
            };
            // A failed read is what the fault ended in, unless the
            // snapshot was marked corrupted.
            let outcome = if reads.is_empty() || outcome.starts_with("corrupted") {
                outcome
            } else {
                reads.keys().cloned().collect::<Vec<_>>().join(", ")
            };
            table.record(kind, name, injected, &outcome);
            if let Err(err) = origin.check() {
                table.fail(format!(
                    "round {round}, {name}, {} fault: {err}",
                    kind.name()
                ));
            }
            snap.destroy()?;
            crate::kmsg_poll();
        }
    }
    drop(_off);
    t.detach().map_err(e)?;
    drop(ctl);
    drop(_step);
    let _ = std::fs::remove_dir_all(&scratch);
    table.print();
    table.result()?;
    dev::reload_module("the faults")?;
    Ok(())
}

/// Reads the whole image in pieces of 64 KiB: a piece read must be the
/// origin at the take, or fail with EIO (counted in `reads`).
fn read_image(
    t: &Tracker,
    at_take: &[u64],
    reads: &mut BTreeMap<String, u64>,
    table: &mut Table,
    round: u64,
) -> TestResult {
    let Some(img) = image_of(t)? else {
        fail!("no image");
    };
    let f: File = dev::open_direct(&img, false)?;
    let step = 128u64;
    let sectors = at_take.len() as u64;
    let mut want = vec![0u8; SECTOR as usize];
    let mut s = 0;
    while s < sectors {
        let mut buf = AlignedBuf::new((step * SECTOR) as usize, 0);
        match f.read_exact_at(buf.as_mut_slice(), s * SECTOR) {
            Ok(()) => {
                for (i, got) in buf.as_slice().chunks(SECTOR as usize).enumerate() {
                    let sector = s + i as u64;
                    pattern(&mut want, sector, at_take[sector as usize]);
                    if got != want.as_slice() && t.snapshot_info().map_err(e)?.error_code == 0 {
                        table.fail(format!(
                            "round {round}: image read at sector {sector} succeeded with wrong data"
                        ));
                        return Ok(());
                    }
                }
            }
            Err(err) => {
                let name = match err.raw_os_error() {
                    Some(n) => format!("{:?}", Errno::from_raw(n)),
                    None => err.to_string(),
                };
                // A bio that cannot be served for want of memory ends with
                // BLK_STS_RESOURCE, which read(2) reports as ENOMEM.
                if name != "EIO" && name != "ENOMEM" {
                    table.fail(format!(
                        "round {round}: an image read failed with {name}, not EIO or ENOMEM"
                    ));
                }
                *reads
                    .entry(format!("image read failed ({name})"))
                    .or_default() += 1;
            }
        }
        s += step;
    }
    Ok(())
}
