// SPDX-License-Identifier: GPL-2.0

//! The ioctl fuzzer: threads throw random and mutated arguments at
//! `/dev/blksnap-control` and at `BLKFILTER_*` on several block devices,
//! while snapshots are created, taken and destroyed underneath, a writer
//! writes to the fuzzed devices, and signals interrupt the callers.
//!
//! Every call must return 0 or an errno of the set its command documents
//! (an errno histogram per command is printed); a verifier keeps a pattern
//! on a loop device the fuzzing threads never write, takes snapshots of it
//! with valid calls at random points and checks every image against it.
//!
//! The run is seeded: `BLKSNAP_FUZZ_SEED` replays a run (each thread's
//! sequence of calls follows from the seed and the thread's number),
//! `BLKSNAP_FUZZ_CALLS` sets the number of calls (100,000 with a fixed seed
//! in `make test`; 1,000,000 with a fresh seed in `make soak`) and `BLKSNAP_FUZZ_THREADS` the number of fuzzing threads.
//! A failure names the call and its arguments, so that it can be replayed
//! alone.

use crate::dev::{self, AlignedBuf, SECTOR};
use crate::snap::{disk, e, pattern, Rng};
use crate::{fail, TestResult};
use blk_snap_logic::uapi::{self, ctl};
use blksnap::{Control, Tracker};
use nix::errno::Errno;
use nix::libc;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The fuzzer tests.
pub const ALL: &[Test] = &[("fuzz_ioctls", fuzz_ioctls)];

/// The commands, as the histogram names them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
enum Op {
    Version,
    Create,
    Destroy,
    Take,
    Collect,
    WaitEvent,
    CreateStorage,
    AppendStorage,
    UnknownIoctl,
    Attach,
    Detach,
    CbtInfo,
    CbtMap,
    CbtMapActive,
    CbtDirty,
    SnapshotAdd,
    SnapshotInfo,
    CbtFine,
    UnknownCmd,
    CbtPersist,
    CbtSave,
}

use Errno::*;

/// A command: its name, its weight among the fuzzing calls, and
/// the errnos the interface documents for it (include/uapi/linux/*.h, the
/// README, and open(2) for the commands that open a path).
struct OpInfo {
    op: Op,
    name: &'static str,
    weight: u64,
    allowed: &'static [Errno],
}

const OPS: &[OpInfo] = &[
    OpInfo {
        op: Op::Version,
        name: "VERSION",
        weight: 50,
        allowed: &[EFAULT],
    },
    OpInfo {
        op: Op::Create,
        name: "SNAPSHOT_CREATE",
        weight: 20,
        allowed: &[
            EFAULT,
            EINVAL,
            ENOMEM,
            ENOENT,
            ENOTDIR,
            ENAMETOOLONG,
            ELOOP,
            EACCES,
            EROFS,
            EISDIR,
            ENXIO,
            ENODEV,
            EOPNOTSUPP,
            EBUSY,
            ENOTBLK,
            ENOSPC,
            E2BIG,
        ],
    },
    OpInfo {
        op: Op::Destroy,
        name: "SNAPSHOT_DESTROY",
        weight: 45,
        allowed: &[EFAULT, ESRCH],
    },
    OpInfo {
        op: Op::Take,
        name: "SNAPSHOT_TAKE",
        weight: 45,
        allowed: &[
            EFAULT, ESRCH, EALREADY, ENODEV, EINVAL, ENOMEM, ETIMEDOUT, EINTR,
        ],
    },
    OpInfo {
        op: Op::Collect,
        name: "SNAPSHOT_COLLECT",
        weight: 40,
        allowed: &[EFAULT, ENODATA, ENOMEM],
    },
    OpInfo {
        op: Op::WaitEvent,
        name: "SNAPSHOT_WAIT_EVENT",
        weight: 50,
        allowed: &[EFAULT, ENOENT, EINTR, ESRCH],
    },
    OpInfo {
        op: Op::CreateStorage,
        name: "SNAPSHOT_CREATE_STORAGE",
        weight: 25,
        allowed: &[EFAULT, EINVAL, ENOMEM, E2BIG],
    },
    OpInfo {
        op: Op::AppendStorage,
        name: "SNAPSHOT_APPEND_STORAGE",
        weight: 40,
        allowed: &[
            EFAULT,
            EINVAL,
            E2BIG,
            ESRCH,
            ENOMEM,
            ENOENT,
            ENOTDIR,
            ENAMETOOLONG,
            ELOOP,
            EACCES,
            EROFS,
            ENXIO,
            ENODEV,
            EBUSY,
            ENOTBLK,
        ],
    },
    OpInfo {
        op: Op::UnknownIoctl,
        name: "control: unknown ioctl",
        weight: 70,
        allowed: &[ENOTTY],
    },
    OpInfo {
        op: Op::Attach,
        name: "BLKFILTER_ATTACH",
        weight: 30,
        allowed: &[EFAULT, ENOENT, EALREADY, EBUSY, ENODEV, ENOMEM],
    },
    OpInfo {
        op: Op::Detach,
        name: "BLKFILTER_DETACH",
        weight: 25,
        allowed: &[EFAULT, ENOENT, EINVAL, EBUSY, ENODEV],
    },
    OpInfo {
        op: Op::CbtInfo,
        name: "CTL CBTINFO",
        weight: 80,
        allowed: &[EFAULT, ENOENT, EINVAL, ENODEV],
    },
    OpInfo {
        op: Op::CbtMap,
        name: "CTL CBTMAP",
        weight: 80,
        allowed: &[EFAULT, ENOENT, EINVAL, ENODEV, ENODATA, ENOMEM],
    },
    OpInfo {
        op: Op::CbtMapActive,
        name: "CTL CBTMAP_ACTIVE",
        weight: 60,
        allowed: &[EFAULT, ENOENT, EINVAL, ENODEV, ENODATA, ENOMEM],
    },
    OpInfo {
        op: Op::CbtDirty,
        name: "CTL CBTDIRTY",
        weight: 90,
        allowed: &[EFAULT, ENOENT, EINVAL, ENODEV, E2BIG, ENOMEM],
    },
    OpInfo {
        op: Op::SnapshotAdd,
        name: "CTL SNAPSHOTADD",
        weight: 80,
        allowed: &[
            EFAULT, ENOENT, EINVAL, ENODEV, ESRCH, EALREADY, EBUSY, ENOMEM, EPERM,
        ],
    },
    OpInfo {
        op: Op::SnapshotInfo,
        name: "CTL SNAPSHOTINFO",
        weight: 80,
        allowed: &[EFAULT, ENOENT, EINVAL, ENODEV],
    },
    OpInfo {
        op: Op::CbtFine,
        name: "CTL CBTFINE",
        weight: 60,
        allowed: &[EFAULT, ENOENT, EINVAL, ENODEV, ENODATA, ENOMEM],
    },
    OpInfo {
        op: Op::UnknownCmd,
        name: "CTL unknown command",
        weight: 50,
        allowed: &[ENOTTY, EFAULT, ENOENT, EINVAL, ENODEV],
    },
    // No state device is open during the fuzzing (none is opened: it
    // would format a test disk): registration fails with ENXIO at best.
    OpInfo {
        op: Op::CbtPersist,
        name: "CTL CBTPERSIST",
        weight: 30,
        allowed: &[EFAULT, ENOENT, EINVAL, ENODEV, ENXIO],
    },
    OpInfo {
        op: Op::CbtSave,
        name: "control: CBT_SAVE",
        weight: 20,
        allowed: &[EFAULT, ENXIO],
    },
];

fn info(op: Op) -> &'static OpInfo {
    &OPS[op as usize]
}

/// Outcome counts of one command: 0 for success, else the errno.
type Hist = Vec<BTreeMap<i32, u64>>;

fn new_hist() -> Hist {
    vec![BTreeMap::new(); OPS.len()]
}

/// Formats a histogram row: `0=N EFAULT=N ...`.
fn hist_row(row: &BTreeMap<i32, u64>) -> String {
    row.iter()
        .map(|(k, n)| {
            if *k == 0 {
                format!("ok={n}")
            } else {
                format!("{:?}={n}", Errno::from_raw(*k))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// State shared by the threads of a run.
struct Shared {
    seed: u64,
    stop: AtomicBool,
    /// Fuzzing calls started, and the number to make.
    issued: AtomicU64,
    total: u64,
    /// Snapshot ids seen: created by anyone, or listed by COLLECT.
    pool: Mutex<Vec<[u8; 16]>>,
    /// The verifier's current snapshot: kept out of the pool most of the
    /// time, so that most of its rounds run undisturbed.
    verifier_id: Mutex<Option<[u8; 16]>>,
    failures: Mutex<Vec<String>>,
    failure_count: AtomicU64,
    hist: Mutex<Hist>,
    /// Time spent in each command, in microseconds.
    micros: Mutex<Vec<u64>>,
    /// Per thread: calls done, and the command in progress (index + 1).
    progress: Vec<AtomicU64>,
    current: Vec<AtomicUsize>,
}

impl Shared {
    fn fail(&self, msg: String) {
        self.failure_count.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(msg);
        }
    }

    fn add_id(&self, id: [u8; 16]) {
        if id == [0; 16] {
            return;
        }
        let mut pool = self.pool.lock().unwrap();
        if pool.contains(&id) {
            return;
        }
        if pool.len() >= 64 {
            pool.remove(0);
        }
        pool.push(id);
    }

    /// Records the outcome of `op` in `hist`; an errno outside the
    /// documented set, or a positive return, is a failure.
    fn record(
        &self,
        hist: &mut Hist,
        who: &str,
        op: Op,
        r: i64,
        errno: Errno,
        desc: &dyn Fn() -> String,
    ) {
        let key = if r == 0 { 0 } else { errno as i32 };
        *hist[op as usize].entry(key).or_default() += 1;
        let i = info(op);
        if r > 0 {
            self.fail(format!("{who}: {} returned {r}, not 0: {}", i.name, desc()));
        } else if r < 0 && !i.allowed.contains(&errno) {
            self.fail(format!(
                "{who}: {} failed with {errno:?}, not an errno it documents: {}",
                i.name,
                desc()
            ));
        }
    }
}

/// A fuzzed block device.
struct FuzzDev {
    path: PathBuf,
    file: File,
    sectors: u64,
    blocks: u32,
}

const PAGE: usize = 4096;
/// The read-write part of a thread's arena.
const RW: usize = 1 << 20;

/// Memory that only the kernel and the fuzzer's raw writes touch: `RW`
/// bytes read-write, then an unmapped guard page, a read-only page, and
/// another guard page. Every address given to the kernel points here (or
/// nowhere), so that whatever the kernel writes lands in the arena or
/// faults on a guard page; no Rust object lives in it.
struct Arena {
    base: usize,
}

impl Arena {
    fn new() -> Result<Self, String> {
        let len = RW + 3 * PAGE;
        // SAFETY: an anonymous private mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let base = p as usize;
        // SAFETY: the pages are inside the mapping just made.
        unsafe {
            libc::mprotect((base + RW) as *mut _, PAGE, libc::PROT_NONE);
            libc::mprotect((base + RW + PAGE) as *mut _, PAGE, libc::PROT_READ);
            libc::mprotect((base + RW + 2 * PAGE) as *mut _, PAGE, libc::PROT_NONE);
        }
        Ok(Self { base })
    }

    fn guard(&self) -> u64 {
        (self.base + RW) as u64
    }

    fn ro(&self) -> u64 {
        (self.base + RW + PAGE) as u64
    }

    /// Writes `data` at `addr` if it is in the arena: the part before a
    /// guard page; into the read-only page by unprotecting it for a moment.
    fn write(&self, addr: u64, data: &[u8]) {
        let a = addr as usize;
        if a >= self.base && a < self.base + RW {
            let n = data.len().min(self.base + RW - a);
            // SAFETY: `a..a + n` is inside the read-write part of the arena,
            // which no Rust object uses.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), a as *mut u8, n) };
        } else if a >= self.base + RW + PAGE && a < self.base + RW + 2 * PAGE {
            let ro = self.base + RW + PAGE;
            let n = data.len().min(ro + PAGE - a);
            // SAFETY: the read-only page of the arena, made writable while
            // it is written.
            unsafe {
                libc::mprotect(ro as *mut _, PAGE, libc::PROT_READ | libc::PROT_WRITE);
                std::ptr::copy_nonoverlapping(data.as_ptr(), a as *mut u8, n);
                libc::mprotect(ro as *mut _, PAGE, libc::PROT_READ);
            }
        }
    }

    /// Reads `n` bytes at `addr` if they are all in the read-write part.
    fn read(&self, addr: u64, n: usize) -> Option<Vec<u8>> {
        let a = addr as usize;
        if a < self.base || a + n > self.base + RW {
            return None;
        }
        let mut out = vec![0u8; n];
        // SAFETY: inside the read-write part of the arena.
        unsafe { std::ptr::copy_nonoverlapping(a as *const u8, out.as_mut_ptr(), n) };
        Some(out)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.base as *mut _, RW + 3 * PAGE) };
    }
}

/// Addresses that are never user memory of this process.
const BAD_ADDRESSES: &[u64] = &[
    0,
    8,
    0xfff,
    0xffff_8880_0000_0000,
    0xffff_ffff_8100_0000,
    0xffff_ffff_ff60_0000,
    0xffff_c900_0000_0000,
    0x0000_8000_0000_0000,
    0x8000_0000_0000_0000,
    0x0000_7fff_ffff_f000,
    u64::MAX,
    u64::MAX - 15,
];

/// The paths a snapshot's storage may be given: valid and invalid ones.
struct Paths {
    /// A directory on tmpfs: an unnamed file there.
    dir: Vec<u8>,
    /// A regular file on tmpfs.
    file: Vec<u8>,
    /// Devices the fuzzer's snapshots may use as storage.
    store_devs: Vec<Vec<u8>>,
    /// The fuzzed devices themselves.
    fuzzed: Vec<Vec<u8>>,
    /// Paths that cannot be a storage.
    bad: Vec<Vec<u8>>,
}

/// One fuzzing thread.
struct Fuzzer {
    t: usize,
    who: String,
    rng: Rng,
    arena: Arena,
    sh: Arc<Shared>,
    devs: Arc<Vec<FuzzDev>>,
    paths: Arc<Paths>,
    ctl: File,
    hist: Hist,
    micros: Vec<u64>,
    weights: u64,
}

impl Fuzzer {
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.rng.below(n)
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    /// Places `data` (and room for `room` bytes the kernel may write) and
    /// returns its address: mostly valid, sometimes at the very end of the
    /// arena, straddling the guard page, in the read-only page, misaligned,
    /// or a bad address.
    fn place(&mut self, data: &[u8], room: usize) -> u64 {
        let need = data.len().max(room).max(1);
        let base = self.arena.base as u64;
        let addr = match self.rng.below(100) {
            0..=79 => {
                let max = RW.saturating_sub(need) as u64;
                let off = self.below(max + 1) & !7;
                base + off
            }
            80..=83 => base + (RW - need.min(RW)) as u64,
            84..=87 => {
                if need > 1 {
                    self.arena.guard() - 1 - self.below(need as u64 - 1)
                } else {
                    self.arena.guard()
                }
            }
            88..=90 => self.arena.ro() + self.below((PAGE - need.min(PAGE)) as u64 + 1),
            91..=93 => {
                let max = RW.saturating_sub(need + 8) as u64;
                base + (self.below(max + 1) | 1)
            }
            94 => self.arena.guard() + self.below(PAGE as u64),
            _ => BAD_ADDRESSES[self.below(BAD_ADDRESSES.len() as u64) as usize],
        };
        self.arena.write(addr, data);
        addr
    }

    /// A 32-bit value near `natural` or at an edge.
    fn u32_near(&mut self, natural: u32) -> u32 {
        match self.rng.below(12) {
            0 => 0,
            1 => 1,
            2 => natural.wrapping_sub(1),
            3 => natural.wrapping_add(1),
            4 => u32::MAX,
            5 => 1 << self.rng.below(32),
            6 => self.rng.next() as u32,
            7 => natural.wrapping_mul(2),
            _ => natural,
        }
    }

    /// A 64-bit value near `natural` or at an edge.
    fn u64_near(&mut self, natural: u64) -> u64 {
        match self.rng.below(14) {
            0 => 0,
            1 => 1,
            2 => natural.wrapping_sub(1),
            3 => natural.wrapping_add(1),
            4 => u64::MAX,
            5 => 1 << self.rng.below(64),
            6 => self.rng.next(),
            7 => u64::from(u32::MAX),
            8 => i64::MAX as u64,
            9 => u64::MAX - self.below(4096),
            _ => natural,
        }
    }

    /// A snapshot id: mostly one that exists or existed, sometimes zero,
    /// random or one byte off.
    fn id(&mut self) -> [u8; 16] {
        let r = self.rng.below(100);
        let pick = {
            let pool = self.sh.pool.lock().unwrap();
            if pool.is_empty() {
                None
            } else {
                Some(pool[self.rng.below(pool.len() as u64) as usize])
            }
        };
        match (r, pick) {
            (0..=74, Some(id)) => id,
            (75..=84, Some(mut id)) => {
                let i = self.below(16) as usize;
                id[i] ^= 1 << self.below(8);
                id
            }
            (85..=92, _) => [0; 16],
            _ => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&self.rng.next().to_le_bytes());
                id[8..].copy_from_slice(&self.rng.next().to_le_bytes());
                id
            }
        }
    }

    /// A filter name, NUL-padded to 32 bytes: mostly "blksnap".
    fn filter_name(&mut self) -> [u8; 32] {
        let mut n = [0u8; 32];
        let s: &[u8] = match self.rng.below(100) {
            0..=84 => b"blksnap",
            85 => b"blksnapx",
            86 => b"BLKSNAP",
            87 => b"blksna",
            88 => b"",
            89 => b"blksnap ",
            90 => {
                // "blksnap", a NUL, then garbage: the same name.
                n[..7].copy_from_slice(b"blksnap");
                for b in n[8..].iter_mut() {
                    *b = self.rng.next() as u8;
                }
                return n;
            }
            91..=93 => {
                // 32 bytes without a NUL.
                n[..7].copy_from_slice(b"blksnap");
                n[7..].fill(b'x');
                return n;
            }
            _ => {
                for b in n.iter_mut() {
                    *b = self.rng.next() as u8;
                }
                return n;
            }
        };
        n[..s.len()].copy_from_slice(s);
        n
    }

    /// A NUL-terminated storage path (or something that is not one).
    fn path(&mut self, for_append: bool) -> Vec<u8> {
        let p = self.paths.clone();
        let pick = |v: &Vec<Vec<u8>>, r: &mut Rng| v[r.below(v.len() as u64) as usize].clone();
        let mut s = match (for_append, self.rng.below(100)) {
            (false, 0..=34) => p.dir.clone(),
            (false, 35..=39) => p.file.clone(),
            (false, 40..=54) | (true, 0..=69) => pick(&p.store_devs, &mut self.rng),
            (_, 55..=58) | (true, 70..=73) => pick(&p.fuzzed, &mut self.rng),
            (_, 59..=60) => {
                // A long path: a component longer than NAME_MAX, or a
                // path of PATH_MAX bytes without a NUL.
                let n = if self.chance(50) { 300 } else { 5000 };
                let mut v = b"/run/".to_vec();
                v.resize(n, b'a');
                if n > 4096 {
                    return v;
                }
                v
            }
            (_, 61..=62) => {
                // Random bytes.
                let n = 1 + self.below(64) as usize;
                (0..n).map(|_| self.rng.next() as u8 | 1).collect()
            }
            _ => pick(&p.bad, &mut self.rng),
        };
        s.push(0);
        s
    }

    /// Runs one ioctl and records its outcome.
    fn call(&mut self, op: Op, fd: i32, req: u64, arg: u64, desc: &dyn Fn() -> String) -> i64 {
        self.sh.current[self.t].store(op as usize + 1, Ordering::Relaxed);
        let start = Instant::now();
        // SAFETY: `arg` points into the arena or nowhere: the kernel checks
        // it, and whatever it writes lands in the arena or faults.
        let r = unsafe { libc::ioctl(fd, req as _, arg) } as i64;
        let errno = Errno::last();
        self.micros[op as usize] += start.elapsed().as_micros() as u64;
        self.sh.current[self.t].store(0, Ordering::Relaxed);
        self.sh.progress[self.t].fetch_add(1, Ordering::Relaxed);
        let who = format!("{} (seed {:#x})", self.who, self.sh.seed);
        self.sh.record(&mut self.hist, &who, op, r, errno, desc);
        r
    }

    fn pick_op(&mut self) -> Op {
        let mut r = self.below(self.weights);
        for i in OPS {
            if r < i.weight {
                return i.op;
            }
            r -= i.weight;
        }
        Op::Version
    }

    fn dev(&mut self) -> usize {
        self.below(self.devs.len() as u64) as usize
    }

    fn one(&mut self) {
        let op = self.pick_op();
        match op {
            Op::Version => self.version(),
            Op::Create => self.create(),
            Op::Destroy => self.id_command(op, uapi::IOCTL_BLKSNAP_SNAPSHOT_DESTROY),
            Op::Take => self.id_command(op, uapi::IOCTL_BLKSNAP_SNAPSHOT_TAKE),
            Op::Collect => self.collect(),
            Op::WaitEvent => self.wait_event(),
            Op::CreateStorage => self.create_storage(),
            Op::AppendStorage => self.append_storage(),
            Op::UnknownIoctl => self.unknown_ioctl(),
            Op::CbtSave => {
                let arg = self.place(&[], 16);
                let fd = self.ctl.as_raw_fd();
                self.call(
                    Op::CbtSave,
                    fd,
                    uapi::IOCTL_BLKSNAP_CBT_SAVE as u64,
                    arg,
                    &|| format!("arg {arg:#x}"),
                );
            }
            Op::Attach => self.attach(),
            Op::Detach => self.detach(),
            _ => self.filter_ctl(op),
        }
    }

    fn version(&mut self) {
        let arg = self.place(&[], 8);
        let fd = self.ctl.as_raw_fd();
        self.call(
            Op::Version,
            fd,
            uapi::IOCTL_BLKSNAP_VERSION as u64,
            arg,
            &|| format!("arg {arg:#x}"),
        );
    }

    fn create(&mut self) {
        let limit = match self.rng.below(10) {
            0..=5 => (1 + self.below(128)) * 2048,
            _ => self.u64_near(512),
        };
        let path = self.path(false);
        let path_ptr = self.place(&path, 0);
        let mut s = Vec::with_capacity(32);
        s.extend_from_slice(&limit.to_le_bytes());
        s.extend_from_slice(&path_ptr.to_le_bytes());
        s.extend_from_slice(&[0xa5; 16]);
        let arg = self.place(&s, 32);
        let fd = self.ctl.as_raw_fd();
        let shown = String::from_utf8_lossy(&path[..path.len().min(80)]).to_string();
        let r = self.call(
            Op::Create,
            fd,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_CREATE as u64,
            arg,
            &|| format!("limit {limit}, path {shown:?} at {path_ptr:#x}, arg {arg:#x}"),
        );
        if r == 0 {
            if let Some(id) = self.arena.read(arg + 16, 16) {
                self.sh.add_id(id.try_into().unwrap());
            }
        }
    }

    fn id_command(&mut self, op: Op, req: u32) {
        let id = self.id();
        let arg = self.place(&id, 16);
        let fd = self.ctl.as_raw_fd();
        self.call(op, fd, req as u64, arg, &|| {
            format!("id {}, arg {arg:#x}", blksnap::uuid_string(&id))
        });
    }

    fn collect(&mut self) {
        let n = self.sh.pool.lock().unwrap().len() as u32;
        let count = self.u32_near(n + 8);
        let ids = if self.chance(25) {
            0
        } else {
            let room = (count as usize).saturating_mul(16).min(RW);
            self.place(&[], room)
        };
        let mut s = Vec::with_capacity(16);
        s.extend_from_slice(&count.to_le_bytes());
        s.extend_from_slice(&[0u8; 4]);
        s.extend_from_slice(&ids.to_le_bytes());
        let arg = self.place(&s, 16);
        let fd = self.ctl.as_raw_fd();
        let r = self.call(
            Op::Collect,
            fd,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_COLLECT as u64,
            arg,
            &|| format!("count {count}, ids {ids:#x}, arg {arg:#x}"),
        );
        if r == 0 && ids != 0 {
            let Some(c) = self.arena.read(arg, 4) else {
                return;
            };
            let got = u32::from_le_bytes(c.try_into().unwrap()).min(64) as usize;
            if let Some(buf) = self.arena.read(ids, got * 16) {
                let skip = *self.sh.verifier_id.lock().unwrap();
                for id in buf.chunks(16) {
                    let id: [u8; 16] = id.try_into().unwrap();
                    // The verifier's snapshot joins the pool rarely: most of
                    // its rounds must run undisturbed to verify something.
                    if Some(id) == skip && !self.chance(1) {
                        continue;
                    }
                    self.sh.add_id(id);
                }
            }
        }
    }

    fn wait_event(&mut self) {
        let id = self.id();
        // Mostly a poll; sometimes a wait that ends by an event, the
        // timeout, the destroy of the snapshot or a signal.
        let timeout: u32 = match self.rng.below(100) {
            0..=84 => 0,
            85..=94 => 1 + self.below(10) as u32,
            95..=98 => 50 + self.below(150) as u32,
            _ => u32::MAX - self.below(2) as u32,
        };
        let mut s = vec![0u8; 20];
        s[..16].copy_from_slice(&id);
        s[16..20].copy_from_slice(&timeout.to_le_bytes());
        let arg = self.place(&s, uapi::BLKSNAP_EVENT_SIZE);
        let fd = self.ctl.as_raw_fd();
        self.call(
            Op::WaitEvent,
            fd,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT as u64,
            arg,
            &|| {
                format!(
                    "id {}, timeout {timeout} ms, arg {arg:#x}",
                    blksnap::uuid_string(&id)
                )
            },
        );
    }

    fn create_storage(&mut self) {
        let kind = match self.rng.below(10) {
            0..=4 => uapi::storage::MEMORY,
            5..=7 => uapi::storage::DEVICES,
            _ => self.u32_near(3),
        };
        let flags = if self.chance(85) { 0 } else { self.u32_near(1) };
        let limit = match self.rng.below(10) {
            0..=5 => (1 + self.below(64)) * 2048,
            _ => self.u64_near(512),
        };
        let mut s = Vec::with_capacity(32);
        s.extend_from_slice(&kind.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        s.extend_from_slice(&limit.to_le_bytes());
        s.extend_from_slice(&[0x5a; 16]);
        let arg = self.place(&s, 32);
        let fd = self.ctl.as_raw_fd();
        let r = self.call(
            Op::CreateStorage,
            fd,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE as u64,
            arg,
            &|| format!("kind {kind}, flags {flags:#x}, limit {limit}, arg {arg:#x}"),
        );
        if r == 0 {
            if let Some(id) = self.arena.read(arg + 16, 16) {
                self.sh.add_id(id.try_into().unwrap());
            }
        }
    }

    /// Sector ranges on a device of `sectors` sectors: mostly valid (whole
    /// 4 KiB blocks inside the device), sometimes not.
    fn ranges(&mut self, n: usize, sectors: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(n * 16);
        for _ in 0..n {
            let (off, count) = if self.chance(85) {
                let count = (1 + self.below(2048)) * 8;
                let off = self.below(sectors.saturating_sub(count) / 8 + 1) * 8;
                (off, count)
            } else {
                (self.u64_near(sectors), self.u64_near(8))
            };
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        out
    }

    fn append_storage(&mut self) {
        let id = self.id();
        let path = self.path(true);
        let path_ptr = self.place(&path, 0);
        let count = match self.rng.below(10) {
            0..=6 => 1 + self.below(4) as u32,
            _ => self.u32_near(uapi::APPEND_MAX_RANGES),
        };
        let reserved = if self.chance(90) { 0 } else { self.u32_near(1) };
        // Devices of up to 400 MiB.
        let n = (count as usize).min(2048);
        let ranges = self.ranges(n, 819_200);
        let ranges_ptr = self.place(&ranges, 0);
        let mut s = Vec::with_capacity(40);
        s.extend_from_slice(&id);
        s.extend_from_slice(&path_ptr.to_le_bytes());
        s.extend_from_slice(&count.to_le_bytes());
        s.extend_from_slice(&reserved.to_le_bytes());
        s.extend_from_slice(&ranges_ptr.to_le_bytes());
        let arg = self.place(&s, 40);
        let fd = self.ctl.as_raw_fd();
        let shown = String::from_utf8_lossy(&path[..path.len().min(80)]).to_string();
        let first: Vec<u64> = ranges
            .chunks(8)
            .take(4)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        self.call(
            Op::AppendStorage,
            fd,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE as u64,
            arg,
            &|| {
                format!(
                    "id {}, path {shown:?}, count {count}, reserved {reserved}, ranges {first:?}... at {ranges_ptr:#x}, arg {arg:#x}",
                    blksnap::uuid_string(&id)
                )
            },
        );
    }

    fn unknown_ioctl(&mut self) {
        // Type 'V', a number or an encoding the module does not know.
        let known = [0u64, 1, 2, 3, 4, 5, 64, 65, 66, 67];
        let nr = loop {
            let nr = self.below(256);
            if !known.contains(&nr) || self.chance(30) {
                break nr;
            }
        };
        let dir = self.below(4);
        let size = if self.chance(50) {
            [0u64, 8, 16, 32, 40, 4096][self.below(6) as usize]
        } else {
            self.below(1 << 14)
        };
        let mut req = (dir << 30) | (size << 16) | ((uapi::BLKSNAP as u64) << 8) | nr;
        let real = [
            uapi::IOCTL_BLKSNAP_VERSION,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_CREATE,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_DESTROY,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_TAKE,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_COLLECT,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE,
            uapi::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE,
            uapi::IOCTL_BLKSNAP_CBT_STATE_DEVICE,
            uapi::IOCTL_BLKSNAP_CBT_SAVE,
        ];
        if real.contains(&(req as u32)) {
            req ^= 1 << 16;
        }
        let arg = self.place(&[], 64);
        let fd = self.ctl.as_raw_fd();
        self.call(Op::UnknownIoctl, fd, req, arg, &|| {
            format!("request {req:#x}, arg {arg:#x}")
        });
    }

    fn attach(&mut self) {
        let d = self.dev();
        let name = self.filter_name();
        let opt = self.place(&[], 0);
        let optlen = self.u32_near(0);
        let mut s = Vec::with_capacity(48);
        s.extend_from_slice(&name);
        s.extend_from_slice(&opt.to_le_bytes());
        s.extend_from_slice(&optlen.to_le_bytes());
        s.extend_from_slice(&[0u8; 4]);
        let arg = self.place(&s, 48);
        let fd = self.devs[d].file.as_raw_fd();
        let p = self.devs[d].path.clone();
        self.call(Op::Attach, fd, uapi::BLKFILTER_ATTACH as u64, arg, &|| {
            format!(
                "{}: name {:?}, opt {opt:#x}, optlen {optlen}, arg {arg:#x}",
                p.display(),
                String::from_utf8_lossy(&name)
            )
        });
    }

    fn detach(&mut self) {
        let d = self.dev();
        let name = self.filter_name();
        let arg = self.place(&name, 32);
        let fd = self.devs[d].file.as_raw_fd();
        let p = self.devs[d].path.clone();
        self.call(Op::Detach, fd, uapi::BLKFILTER_DETACH as u64, arg, &|| {
            format!(
                "{}: name {:?}, arg {arg:#x}",
                p.display(),
                String::from_utf8_lossy(&name)
            )
        });
    }

    /// `BLKFILTER_CTL` with one of the blksnap commands, or an unknown one.
    fn filter_ctl(&mut self, op: Op) {
        let d = self.dev();
        let (sectors, blocks) = (self.devs[d].sectors, self.devs[d].blocks);
        let (cmd, opt, natural, what): (u32, u64, u32, String) = match op {
            Op::CbtInfo => (ctl::CBTINFO, self.place(&[], 40), 40, String::new()),
            Op::SnapshotInfo => (ctl::SNAPSHOTINFO, self.place(&[], 36), 36, String::new()),
            Op::CbtMap | Op::CbtMapActive => {
                let (offset, length) = if self.chance(75) {
                    let off = self.below(u64::from(blocks)) as u32;
                    let len = self.below(u64::from(blocks - off) + 1) as u32;
                    (off, len)
                } else {
                    (self.u32_near(blocks), self.u32_near(blocks))
                };
                let buf = self.place(&[], (length as usize).min(RW));
                let mut s = Vec::with_capacity(16);
                s.extend_from_slice(&offset.to_le_bytes());
                s.extend_from_slice(&length.to_le_bytes());
                s.extend_from_slice(&buf.to_le_bytes());
                let cmd = if op == Op::CbtMap {
                    ctl::CBTMAP
                } else {
                    ctl::CBTMAP_ACTIVE
                };
                (
                    cmd,
                    self.place(&s, 16),
                    16,
                    format!("offset {offset}, length {length}, buffer {buf:#x} (map of {blocks} blocks)"),
                )
            }
            Op::CbtDirty => {
                let (count, n, ranges) = if self.rng.below(20000) == 0 {
                    // The most ranges, each the whole device: a lot of
                    // work for one call.
                    let mut r = Vec::with_capacity(65536 * 16);
                    for _ in 0..65536 {
                        r.extend_from_slice(&0u64.to_le_bytes());
                        r.extend_from_slice(&sectors.to_le_bytes());
                    }
                    (65536u32, 65536usize, r)
                } else {
                    let count = match self.rng.below(10) {
                        0..=6 => 1 + self.below(16) as u32,
                        7 => 1 + self.below(4096) as u32,
                        _ => self.u32_near(uapi::CBTDIRTY_MAX_COUNT),
                    };
                    let n = (count as usize).min(4096);
                    let mut r = Vec::with_capacity(n * 16);
                    for _ in 0..n {
                        let (off, cnt) = if self.chance(85) {
                            let cnt = 1 + self.below(4096.min(sectors));
                            (self.below(sectors - cnt + 1), cnt)
                        } else {
                            (self.u64_near(sectors), self.u64_near(1))
                        };
                        r.extend_from_slice(&off.to_le_bytes());
                        r.extend_from_slice(&cnt.to_le_bytes());
                    }
                    (count, n, r)
                };
                let ranges_ptr = self.place(&ranges, 0);
                let mut s = Vec::with_capacity(16);
                s.extend_from_slice(&count.to_le_bytes());
                s.extend_from_slice(&[0u8; 4]);
                s.extend_from_slice(&ranges_ptr.to_le_bytes());
                let first: Vec<u64> = ranges
                    .chunks(8)
                    .take(4)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (
                    ctl::CBTDIRTY,
                    self.place(&s, 16),
                    16,
                    format!("count {count} ({n} ranges written), ranges {first:?}... at {ranges_ptr:#x} ({sectors} sectors)"),
                )
            }
            Op::CbtFine => {
                // Fine blocks of 4 KiB (the test disks' logical blocks are
                // at most that).
                let fine = sectors.div_ceil(8);
                let (offset, count) = if self.chance(75) {
                    let off = self.below(fine);
                    (off, self.below((fine - off + 1).min(1 << 16)))
                } else {
                    (self.u64_near(fine), self.u64_near(1 << 24))
                };
                let buf = self.place(&[], (count as usize).min(RW));
                let mut s = Vec::with_capacity(48);
                s.push(self.rng.next() as u8);
                s.push(self.rng.next() as u8);
                if self.chance(90) {
                    s.extend_from_slice(&[0u8; 6]);
                } else {
                    s.extend_from_slice(&self.rng.next().to_le_bytes()[..6]);
                }
                s.extend_from_slice(&offset.to_le_bytes());
                s.extend_from_slice(&count.to_le_bytes());
                s.extend_from_slice(&buf.to_le_bytes());
                s.extend_from_slice(&[0u8; 16]);
                (
                    ctl::CBTFINE,
                    self.place(&s, 48),
                    48,
                    format!("since {}, offset {offset}, count {count}, buffer {buf:#x} ({fine} fine blocks)", s[0]),
                )
            }
            Op::CbtPersist => {
                let mut s = Vec::with_capacity(88);
                let n = self.below(70) as usize;
                for i in 0..64 {
                    s.push(if i < n {
                        b'a' + (self.below(26) as u8)
                    } else {
                        0
                    });
                }
                let flags = if self.chance(90) {
                    0
                } else {
                    self.rng.next() as u32
                };
                s.extend_from_slice(&flags.to_le_bytes());
                s.extend_from_slice(&[0u8; 20]);
                (
                    ctl::CBTPERSIST,
                    self.place(&s, 88),
                    88,
                    format!("id of {n} bytes, flags {flags:#x}"),
                )
            }
            Op::SnapshotAdd => {
                let id = self.id();
                (
                    ctl::SNAPSHOTADD,
                    self.place(&id, 16),
                    16,
                    format!("id {}", blksnap::uuid_string(&id)),
                )
            }
            _ => {
                let cmd = loop {
                    let c = match self.rng.below(4) {
                        0 => self.below(256) as u32,
                        1 => 131 + self.below(16) as u32,
                        _ => self.rng.next() as u32,
                    };
                    if !matches!(c, 0..=4 | 128..=130) {
                        break c;
                    }
                };
                let len = self.below(64) as usize;
                (cmd, self.place(&[], len), len as u32, String::new())
            }
        };
        let optlen = if self.chance(80) {
            natural
        } else {
            self.u32_near(natural)
        };
        let name = self.filter_name();
        let mut s = Vec::with_capacity(48);
        s.extend_from_slice(&name);
        s.extend_from_slice(&cmd.to_le_bytes());
        s.extend_from_slice(&optlen.to_le_bytes());
        s.extend_from_slice(&opt.to_le_bytes());
        let arg = self.place(&s, 48);
        let fd = self.devs[d].file.as_raw_fd();
        let p = self.devs[d].path.clone();
        self.call(op, fd, uapi::BLKFILTER_CTL as u64, arg, &|| {
            format!(
                "{}: name {:?}, cmd {cmd}, optlen {optlen}, opt {opt:#x}, arg {arg:#x}; {what}",
                p.display(),
                String::from_utf8_lossy(&name)
            )
        });
    }
}

/// Counters of the helper threads.
#[derive(Default)]
struct Counts {
    churn_cycles: AtomicU64,
    churn_taken: AtomicU64,
    churn_calls: AtomicU64,
    image_reads: AtomicU64,
    writes: AtomicU64,
    signals: AtomicU64,
    verified: AtomicU64,
    disturbed: AtomicU64,
    disturbed_by: Mutex<BTreeMap<String, u64>>,
    janitor: AtomicU64,
}

/// The errno of a library call, for the histogram.
fn lib_result<T>(r: &Result<T, blksnap::Error>) -> (i64, Errno) {
    match r {
        Ok(_) => (0, Errno::UnknownErrno),
        Err(err) => (-1, err.errno),
    }
}

/// Creates, fills, takes and destroys snapshots of the fuzzed devices with
/// valid calls, so that the fuzzing threads find live snapshots with
/// devices, images and copies going on.
fn churn(
    sh: Arc<Shared>,
    devs: Arc<Vec<FuzzDev>>,
    dir: PathBuf,
    store: PathBuf,
    counts: Arc<Counts>,
) {
    let mut rng = Rng(sh.seed ^ 0xc4u64.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut hist = new_hist();
    let who = format!("churn (seed {:#x})", sh.seed);
    let Ok(ctl) = Control::open() else {
        sh.fail("churn: cannot open the control device".into());
        return;
    };
    while !sh.stop.load(Ordering::Relaxed) {
        let kind = rng.below(3);
        let (r, op) = match kind {
            0 => (
                ctl.snapshot_create_memory((8 + rng.below(56)) * 2048),
                Op::CreateStorage,
            ),
            1 => (ctl.snapshot_create(&dir, 64 * 2048), Op::Create),
            _ => (ctl.snapshot_create_devices(), Op::CreateStorage),
        };
        let (rv, en) = lib_result(&r);
        sh.record(&mut hist, &who, op, rv, en, &|| {
            format!("create, kind {kind}")
        });
        counts.churn_calls.fetch_add(1, Ordering::Relaxed);
        let Ok(id) = r else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        sh.add_id(id.0);
        if kind == 2 {
            let off = rng.below(64) * 8192;
            let r = ctl.snapshot_append_storage(
                &id,
                &store,
                &[blksnap::SectorRange {
                    offset: off,
                    count: 65536,
                }],
            );
            let (rv, en) = lib_result(&r);
            sh.record(&mut hist, &who, Op::AppendStorage, rv, en, &|| {
                format!("append {}: 65536 sectors at {off}", store.display())
            });
        }
        for _ in 0..1 + rng.below(3) {
            let d = &devs[rng.below(devs.len() as u64) as usize];
            let Ok(t) = Tracker::open(&d.path) else {
                continue;
            };
            if rng.below(2) == 0 {
                let _ = t.attach();
            }
            let r = t.snapshot_add(&id);
            let (rv, en) = lib_result(&r);
            sh.record(&mut hist, &who, Op::SnapshotAdd, rv, en, &|| {
                format!("add {} to {id}", d.path.display())
            });
        }
        let r = ctl.snapshot_take(&id);
        let (rv, en) = lib_result(&r);
        sh.record(&mut hist, &who, Op::Take, rv, en, &|| format!("take {id}"));
        if r.is_ok() {
            counts.churn_taken.fetch_add(1, Ordering::Relaxed);
            // Read a little of the images while copies go on.
            for d in devs.iter() {
                let Ok(t) = Tracker::open(&d.path) else {
                    continue;
                };
                let Ok(info) = t.snapshot_info() else {
                    continue;
                };
                if info.image.is_empty() {
                    continue;
                }
                if let Ok(f) = dev::open_direct(Path::new(&format!("/dev/{}", info.image)), false) {
                    let mut buf = AlignedBuf::new(65536, 0);
                    let off = rng.below(d.sectors / 128) * 65536;
                    let _ = f.read_exact_at(buf.as_mut_slice(), off);
                    counts.image_reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        let r = ctl.snapshot_wait_event(&id, 0);
        let (rv, en) = lib_result(&r);
        sh.record(&mut hist, &who, Op::WaitEvent, rv, en, &|| {
            format!("wait {id}")
        });
        let r = ctl.snapshot_destroy(&id);
        let (rv, en) = lib_result(&r);
        sh.record(&mut hist, &who, Op::Destroy, rv, en, &|| {
            format!("destroy {id}")
        });
        counts.churn_calls.fetch_add(4, Ordering::Relaxed);
        counts.churn_cycles.fetch_add(1, Ordering::Relaxed);
    }
    let mut all = sh.hist.lock().unwrap();
    for (a, b) in all.iter_mut().zip(hist) {
        for (k, n) in b {
            *a.entry(k).or_default() += n;
        }
    }
}

/// Writes to the fuzzed devices all the time: copies on write go on while
/// the snapshots of the fuzzed devices are taken and destroyed. A write
/// that fails is an origin write lost.
fn writer(sh: Arc<Shared>, devs: Arc<Vec<FuzzDev>>, counts: Arc<Counts>) {
    let mut rng = Rng(sh.seed ^ 0x77);
    let files: Vec<File> = devs
        .iter()
        .filter_map(|d| dev::open_direct(&d.path, true).ok())
        .collect();
    if files.len() != devs.len() {
        sh.fail("writer: cannot open the fuzzed devices".into());
        return;
    }
    let mut buf = AlignedBuf::new(65536, 0);
    while !sh.stop.load(Ordering::Relaxed) {
        let i = rng.below(devs.len() as u64) as usize;
        // From 1 MiB to 16 MiB: never the partition table of disk b (a
        // new one would make udev drop and re-create its partitions, which
        // detaches the filter from them and ends every later test that uses
        // them).
        let region = (16 << 20).min(devs[i].sectors * SECTOR) / 65536;
        let off = (16 + rng.below(region.saturating_sub(16).max(1))) * 65536;
        buf.as_mut_slice().fill(rng.next() as u8);
        if let Err(err) = files[i].write_all_at(buf.as_slice(), off) {
            sh.fail(format!(
                "writer: a write of 64 KiB at {off} of {} failed: {err}",
                devs[i].path.display()
            ));
        }
        counts.writes.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The pattern device's expected contents: a pattern seed per sector.
pub(crate) fn compare(dev: &Path, want: &[u64]) -> Result<Vec<String>, String> {
    let f = dev::open_direct(dev, false)?;
    let step = 2048u64;
    let mut bad = Vec::new();
    let mut expect = vec![0u8; SECTOR as usize];
    let mut s = 0u64;
    let sectors = want.len() as u64;
    while s < sectors {
        let n = step.min(sectors - s);
        let mut buf = AlignedBuf::new((n * SECTOR) as usize, 0);
        f.read_exact_at(buf.as_mut_slice(), s * SECTOR)
            .map_err(|e| format!("read at sector {s} of {}: {e}", dev.display()))?;
        for (i, got) in buf.as_slice().chunks(SECTOR as usize).enumerate() {
            let sector = s + i as u64;
            pattern(&mut expect, sector, want[sector as usize]);
            if got != expect.as_slice() {
                if bad.len() < 5 {
                    let w = u64::from_le_bytes(got[..8].try_into().unwrap());
                    bad.push(format!(
                        "sector {sector}: want seed {}, found sector {} seed {}",
                        want[sector as usize],
                        w & ((1 << 40) - 1),
                        (w >> 40) & 0xffff
                    ));
                } else {
                    bad.push(String::new());
                }
            }
        }
        s += n;
    }
    Ok(bad)
}

pub(crate) fn mismatch(dev: &Path, bad: &[String]) -> String {
    let shown: Vec<&str> = bad
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.as_str())
        .collect();
    format!(
        "{}: {} wrong sectors: {}",
        dev.display(),
        bad.len(),
        shown.join("; ")
    )
}

/// Takes snapshots of the pattern device with valid calls at random points
/// of the run, writes new data to it, and checks the image against the
/// pattern at the take and the device against the new one.
fn verifier(sh: Arc<Shared>, p: PathBuf, dir: PathBuf, counts: Arc<Counts>) {
    let r = (|| -> TestResult {
        let mut rng = Rng(sh.seed ^ 0x5eed);
        let sectors = dev::size_sectors(&p)?;
        let mut shadow = vec![1u64; sectors as usize];
        crate::snap::write_pattern(&p, 0, sectors, 1)?;
        let t = Tracker::open(&p).map_err(e)?;
        t.attach().map_err(e)?;
        let ctl = Control::open().map_err(e)?;
        let mut round = 0u64;
        while !sh.stop.load(Ordering::Relaxed) {
            round += 1;
            std::thread::sleep(Duration::from_millis(rng.below(200)));
            let id = ctl.snapshot_create(&dir, 1 << 21).map_err(e)?;
            *sh.verifier_id.lock().unwrap() = Some(id.0);
            let disturbed = |what: &str| {
                counts.disturbed.fetch_add(1, Ordering::Relaxed);
                *counts
                    .disturbed_by
                    .lock()
                    .unwrap()
                    .entry(what.to_string())
                    .or_default() += 1;
            };
            // EBUSY: the device is still in the previous snapshot, which a
            // fuzzing thread is destroying (its id left COLLECT, so our own
            // destroy got ESRCH, but the teardown has not let go of the
            // device yet). It must let go within seconds.
            let mut add = t.snapshot_add(&id);
            for _ in 0..100 {
                match &add {
                    Err(err) if err.errno == EBUSY => {
                        std::thread::sleep(Duration::from_millis(50));
                        add = t.snapshot_add(&id);
                    }
                    _ => break,
                }
            }
            match add {
                Ok(()) => {}
                Err(err) if err.errno == ESRCH => {
                    disturbed("destroyed before the add");
                    continue;
                }
                Err(err) => {
                    let _ = ctl.snapshot_destroy(&id);
                    fail!("verifier round {round}: {err}")
                }
            }
            match ctl.snapshot_take(&id) {
                Ok(()) => {}
                Err(err) if err.errno == EALREADY || err.errno == ESRCH => {
                    if err.errno == ESRCH {
                        disturbed("destroyed before the take");
                        continue;
                    }
                }
                Err(err) => {
                    let _ = ctl.snapshot_destroy(&id);
                    fail!("verifier round {round}: {err}")
                }
            }
            let at_take = shadow.clone();
            let info = t.snapshot_info().map_err(e)?;
            let seed = round + 1;
            for _ in 0..1 + rng.below(4) {
                let len = 1 + rng.below(2048);
                let start = rng.below(sectors - len);
                crate::snap::write_pattern(&p, start, len, seed)?;
                for s in start..start + len {
                    shadow[s as usize] = seed;
                }
            }
            if !info.image.is_empty() && info.error_code == 0 {
                let image = PathBuf::from(format!("/dev/{}", info.image));
                for _ in 0..100 {
                    if image.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let got = compare(&image, &at_take);
                let after = t.snapshot_info().map_err(e)?;
                // A destroy takes the id out of COLLECT first, then removes
                // the image, then lets go of the device: in between, the
                // device still names the image that is gone.
                let exists = ctl.snapshot_collect().map_err(e)?.contains(&id);
                let intact = after.error_code == 0 && after.image == info.image && exists;
                match got {
                    Ok(bad) if bad.is_empty() => {
                        counts.verified.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(bad) if intact => fail!(
                        "verifier round {round}: the image of snapshot {id}, which reports no error, differs from the device at the take: {}",
                        mismatch(&image, &bad)
                    ),
                    Err(err) if intact => fail!(
                        "verifier round {round}: reading the image of snapshot {id}, which reports no error: {err}"
                    ),
                    Ok(_) => disturbed("image differs, snapshot gone or in error"),
                    Err(_) => disturbed("image unreadable, snapshot gone or in error"),
                }
            } else if info.image.is_empty() {
                if ctl.snapshot_collect().map_err(e)?.contains(&id) {
                    fail!(
                        "verifier round {round}: snapshot {id} was taken and exists, but {} has no image (error {})",
                        p.display(),
                        info.error_code
                    );
                }
                disturbed("destroyed before its image was read");
            } else {
                disturbed(&format!("error {} after the take", info.error_code));
            }
            let bad = compare(&p, &shadow)?;
            if !bad.is_empty() {
                fail!(
                    "verifier round {round}: the origin lost writes: {}",
                    mismatch(&p, &bad)
                );
            }
            match ctl.snapshot_destroy(&id) {
                Ok(()) => {}
                Err(err) if err.errno == ESRCH => {}
                Err(err) => fail!("verifier round {round}: {err}"),
            }
            *sh.verifier_id.lock().unwrap() = None;
        }
        let _ = t.detach();
        Ok(())
    })();
    if let Err(err) = r {
        sh.fail(err);
    }
}

/// A no-op handler: the signal only interrupts the ioctl in progress.
extern "C" fn on_signal(_: libc::c_int) {}

fn fuzz_ioctls() -> TestResult {
    let soak = dev::soak();
    let seed = dev::seed("BLKSNAP_FUZZ_SEED", 0xb1c5_f022);
    // make test: about 110 s of guest time (900-950 calls/s on two TCG
    // vCPUs); make soak: about 20 minutes.
    let total = dev::env_u64("BLKSNAP_FUZZ_CALLS", if soak { 1_000_000 } else { 100_000 });
    let threads = dev::env_u64("BLKSNAP_FUZZ_THREADS", 4).clamp(1, 16) as usize;
    // A run that does not finish in this time is a failure (a hang, or a
    // kernel far slower than it should be).
    let deadline = Duration::from_secs(dev::env_u64(
        "BLKSNAP_FUZZ_SECONDS",
        if soak { 7200 } else { 420 },
    ));
    println!(
        "    seed {seed:#x} (replay: BLKSNAP_FUZZ_SEED={seed:#x}), {total} calls, {threads} threads"
    );

    let scratch = dev::scratch().join("fuzz");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let store_file = scratch.join("store.img");
    File::create(&store_file).map_err(|e| e.to_string())?;
    // The file storages grow in small steps: growth happens often.
    let _step = dev::ModuleParam::set("diff_storage_minimum", "8192")?;
    // The failing calls log a line each: keep them off the serial console.
    let _quiet = dev::QuietConsole::new(3)?;

    let b = disk("blksnap-b")?;
    let mut fuzz_loop = dev::LoopDev::new("fuzz-loop", 16 << 20)?;
    let mut pattern_loop = dev::LoopDev::new("fuzz-pattern", 8 << 20)?;
    let targets = vec![
        disk("blksnap-c")?,
        disk("blksnap-d")?,
        b.clone(),
        dev::partition(&b, 1),
        dev::partition(&b, 2),
        fuzz_loop.path.clone(),
    ];
    let mut devs = Vec::new();
    for p in &targets {
        let t = Tracker::open(p).map_err(e)?;
        t.attach().map_err(e)?;
        let info = t.cbt_info().map_err(e)?;
        devs.push(FuzzDev {
            path: p.clone(),
            file: File::open(p).map_err(|e| e.to_string())?,
            sectors: dev::size_sectors(p)?,
            blocks: info.block_count,
        });
    }
    let devs = Arc::new(devs);
    let cstr = |p: &Path| p.to_string_lossy().as_bytes().to_vec();
    let a = disk("blksnap-a")?;
    let paths = Arc::new(Paths {
        dir: cstr(&scratch),
        file: cstr(&store_file),
        store_devs: vec![cstr(&a), cstr(&disk("blksnap-e")?)],
        fuzzed: targets.iter().map(|p| cstr(p)).collect(),
        bad: [
            "/run/blksnap/fuzz/no/such/file",
            "/run/blksnap/fuzz/none",
            "/dev/null",
            "/dev/blksnap-control",
            "",
            "/",
            "/sys",
            "/proc/version",
            "run/blksnap/fuzz",
            "/run/blksnap/fuzz/store.img/x",
            "/run/blksnap/fuzz/../fuzz/./",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
    });

    let sh = Arc::new(Shared {
        seed,
        stop: AtomicBool::new(false),
        issued: AtomicU64::new(0),
        total,
        pool: Mutex::new(Vec::new()),
        verifier_id: Mutex::new(None),
        failures: Mutex::new(Vec::new()),
        failure_count: AtomicU64::new(0),
        hist: Mutex::new(new_hist()),
        micros: Mutex::new(vec![0; OPS.len()]),
        progress: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        current: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
    });
    let counts = Arc::new(Counts::default());

    // SIGUSR1 interrupts the fuzzing threads' ioctls: no SA_RESTART.
    let act = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler does nothing.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGUSR1, &act) }
        .map_err(|e| format!("sigaction: {e}"))?;

    let start = Instant::now();
    let mut fuzzers = Vec::new();
    let weights: u64 = OPS.iter().map(|i| i.weight).sum();
    for t in 0..threads {
        let mut f = Fuzzer {
            t,
            who: format!("thread {t}"),
            rng: Rng(seed.wrapping_add((t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1),
            arena: Arena::new()?,
            sh: sh.clone(),
            devs: devs.clone(),
            paths: paths.clone(),
            ctl: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(blksnap::CONTROL_PATH)
                .map_err(|e| e.to_string())?,
            hist: new_hist(),
            micros: vec![0; OPS.len()],
            weights,
        };
        fuzzers.push(std::thread::spawn(move || {
            while !f.sh.stop.load(Ordering::Relaxed)
                && f.sh.issued.fetch_add(1, Ordering::Relaxed) < f.sh.total
            {
                f.one();
            }
            let mut all = f.sh.hist.lock().unwrap();
            for (a, b) in all.iter_mut().zip(std::mem::take(&mut f.hist)) {
                for (k, n) in b {
                    *a.entry(k).or_default() += n;
                }
            }
            drop(all);
            let mut all = f.sh.micros.lock().unwrap();
            for (a, b) in all.iter_mut().zip(&f.micros) {
                *a += b;
            }
        }));
    }
    let helpers = vec![
        {
            let (sh, devs, dir, counts) =
                (sh.clone(), devs.clone(), scratch.clone(), counts.clone());
            let a = a.clone();
            std::thread::spawn(move || churn(sh, devs, dir, a, counts))
        },
        {
            let (sh, devs, counts) = (sh.clone(), devs.clone(), counts.clone());
            std::thread::spawn(move || writer(sh, devs, counts))
        },
        {
            let (sh, p, dir, counts) = (
                sh.clone(),
                pattern_loop.path.clone(),
                scratch.clone(),
                counts.clone(),
            );
            std::thread::spawn(move || verifier(sh, p, dir, counts))
        },
    ];
    let targets_signal: Vec<libc::pthread_t> = fuzzers.iter().map(|h| h.as_pthread_t()).collect();

    // Watch: kernel log, signals, progress, leftover snapshots.
    let mut rng = Rng(seed ^ 0x51);
    let mut last = vec![(0u64, Instant::now()); threads];
    let mut last_report = Instant::now();
    let mut last_janitor = Instant::now();
    let janitor = Control::open().map_err(e)?;
    let mut hang = None;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if fuzzers.iter().all(|h| h.is_finished()) {
            break;
        }
        crate::kmsg_poll();
        // Interrupt a random fuzzing thread now and then.
        if rng.below(3) == 0 {
            let t = targets_signal[rng.below(threads as u64) as usize];
            // SAFETY: the thread is alive (not finished: checked above; a
            // finished thread's id stays valid until it is joined).
            unsafe { libc::pthread_kill(t, libc::SIGUSR1) };
            counts.signals.fetch_add(1, Ordering::Relaxed);
        }
        let now = Instant::now();
        for (t, l) in last.iter_mut().enumerate() {
            let p = sh.progress[t].load(Ordering::Relaxed);
            if p != l.0 {
                *l = (p, now);
            } else if now - l.1 > Duration::from_secs(120) && !fuzzers[t].is_finished() {
                let c = sh.current[t].load(Ordering::Relaxed);
                let what = if c == 0 {
                    "between calls"
                } else {
                    OPS[c - 1].name
                };
                hang = Some(format!(
                    "thread {t} made no progress for 120 s, in {what} (seed {seed:#x}); {}",
                    dev::blocked_threads()
                ));
            }
        }
        if hang.is_some() || start.elapsed() > deadline {
            break;
        }
        if now - last_janitor > Duration::from_secs(2) {
            last_janitor = now;
            // Fuzzed snapshots pile up: keep at most 24.
            if let Ok(ids) = janitor.snapshot_collect() {
                let skip = *sh.verifier_id.lock().unwrap();
                for id in ids.iter().rev().skip(24) {
                    if Some(id.0) != skip && janitor.snapshot_destroy(id).is_ok() {
                        counts.janitor.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if now - last_report > Duration::from_secs(30) {
            last_report = now;
            let done: u64 = sh.progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
            println!(
                "    {:.0} s: {done} calls, {} failures",
                start.elapsed().as_secs_f64(),
                sh.failure_count.load(Ordering::Relaxed)
            );
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    let fuzz_secs = start.elapsed().as_secs_f64();
    let calls: u64 = sh.progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
    // Wait for every thread, at most a minute: a thread stuck in the
    // kernel is left behind and reported.
    let wait_start = Instant::now();
    let mut stuck = Vec::new();
    for (i, h) in fuzzers.into_iter().chain(helpers).enumerate() {
        while !h.is_finished() && wait_start.elapsed() < Duration::from_secs(60) {
            crate::kmsg_poll();
            std::thread::sleep(Duration::from_millis(50));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            stuck.push(i);
        }
    }
    let stuck_in = if stuck.is_empty() {
        String::new()
    } else {
        dev::blocked_threads()
    };

    // Clean up: no snapshot left, every device detached.
    let mut cleanup = Vec::new();
    let ctl = Control::open().map_err(e)?;
    let left = ctl.snapshot_collect().map_err(e)?;
    for id in &left {
        if let Err(err) = ctl.snapshot_destroy(id) {
            if err.errno != ESRCH {
                cleanup.push(format!("destroy {id}: {err}"));
            }
        }
    }
    for p in targets.iter().chain([&pattern_loop.path]) {
        if let Ok(t) = Tracker::open(p) {
            match t.detach() {
                Ok(()) => {}
                Err(err) if err.errno == ENOENT => {}
                Err(err) => cleanup.push(err.to_string()),
            }
        }
    }
    let after = ctl.snapshot_collect().map_err(e)?;
    drop(devs);
    let _ = fuzz_loop.remove();
    let _ = pattern_loop.remove();
    let _ = std::fs::remove_dir_all(&scratch);

    println!(
        "    {calls} calls in {fuzz_secs:.1} s: {:.0} calls/s; {} signals",
        calls as f64 / fuzz_secs,
        counts.signals.load(Ordering::Relaxed)
    );
    println!(
        "    underneath: {} snapshot cycles ({} taken, {} valid calls), {} image reads, {} writes of 64 KiB, {} snapshots destroyed by the janitor, {} left at the end",
        counts.churn_cycles.load(Ordering::Relaxed),
        counts.churn_taken.load(Ordering::Relaxed),
        counts.churn_calls.load(Ordering::Relaxed),
        counts.image_reads.load(Ordering::Relaxed),
        counts.writes.load(Ordering::Relaxed),
        counts.janitor.load(Ordering::Relaxed),
        left.len()
    );
    println!(
        "    pattern device: {} snapshots verified against the pattern, {} disturbed by the fuzzing threads {:?}",
        counts.verified.load(Ordering::Relaxed),
        counts.disturbed.load(Ordering::Relaxed),
        counts.disturbed_by.lock().unwrap()
    );
    println!("    errno histogram per command (calls, mean time of the fuzzing threads' calls):");
    let micros = sh.micros.lock().unwrap().clone();
    for (i, row) in sh.hist.lock().unwrap().iter().enumerate() {
        let n: u64 = row.values().sum();
        let mean = micros[i] / n.max(1);
        println!(
            "    {:>26} {n:>7} {mean:>6} us: {}",
            OPS[i].name,
            hist_row(row)
        );
    }

    let failures = sh.failures.lock().unwrap().clone();
    let nfail = sh.failure_count.load(Ordering::Relaxed);
    for f in &failures {
        println!("    failure: {f}");
    }
    if let Some(h) = hang {
        fail!("{h}");
    }
    if !stuck.is_empty() {
        fail!(
            "{} threads still in the kernel a minute after the end (seed {seed:#x}); {stuck_in}",
            stuck.len()
        );
    }
    if nfail != 0 {
        fail!("{nfail} failures, the first: {}", failures[0]);
    }
    if calls < total {
        fail!("only {calls} of {total} calls in {fuzz_secs:.0} s (seed {seed:#x})");
    }
    if !cleanup.is_empty() {
        fail!("cleanup: {}", cleanup.join("; "));
    }
    if !after.is_empty() {
        fail!("{} snapshots left after destroying all", after.len());
    }
    // Nothing leaked: the module unloads (and is loaded again).
    drop(janitor);
    drop(ctl);
    dev::reload_module("the run")?;
    if counts.verified.load(Ordering::Relaxed) < 2 {
        fail!(
            "only {} snapshots of the pattern device were verified (seed {seed:#x})",
            counts.verified.load(Ordering::Relaxed)
        );
    }
    Ok(())
}
