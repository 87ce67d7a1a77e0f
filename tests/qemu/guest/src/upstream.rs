// SPDX-License-Identifier: GPL-2.0

//! Upstream client semantics: one check for each line of
//! upstream-uapi-semantics.txt that ends in `[client-depends]`, behaviour
//! that the upstream blksnap library or tool relies on. Each check is named
//! by its line (`IOCTL | situation`) and prints `ok:` or `FAILED:`; a test
//! fails if any of its checks failed. Raw ioctls throughout: the library
//! would hide return values and write-backs.
//!
//! Disks: `blksnap-c` is the origin, `blksnap-d` a block device store.

use crate::dev::{self, SECTOR};
use crate::snap::{disk, e, write_pattern, Snap, Tracked};
use crate::TestResult;
use blk_snap_logic::uapi::{self, ctl};
use blksnap::{raw, Control, SnapshotId};
use nix::errno::Errno;
use nix::libc;
use std::ffi::CString;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The upstream semantics tests, in the order they run.
pub const ALL: &[Test] = &[
    ("upstream_client_semantics_blkfilter", blkfilter),
    ("upstream_client_semantics_control", control),
    ("upstream_client_semantics_wait_event", wait_event),
    (
        "upstream_client_semantics_file_store_events",
        file_store_events,
    ),
];

const MIB_SECTORS: u64 = 2048;

/// The checks of one test: each is reported on its own line; the test
/// fails with all failed checks.
struct Checks(Vec<String>);

impl Checks {
    fn new() -> Self {
        Self(Vec::new())
    }

    /// Records the check of the semantics line `line`.
    fn check(&mut self, line: &str, r: Result<(), String>) {
        match r {
            Ok(()) => println!("    ok: {line}"),
            Err(why) => {
                println!("    FAILED: {line}: {why}");
                self.0.push(format!("[{line}] {why}"));
            }
        }
    }

    fn done(self) -> TestResult {
        if self.0.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} upstream [client-depends] behaviour(s) differ: {}",
            self.0.len(),
            self.0.join("; ")
        ))
    }
}

/// `Ok` if `got == want`, else what differs.
fn want<T: PartialEq + Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

/// An ioctl with its raw result: the return value or the errno.
fn ioctl<T>(fd: i32, req: u32, arg: *mut T) -> Result<i32, Errno> {
    // SAFETY: the callers pass a pointer to a live argument of the request's
    // type (or a bad address on purpose, which the kernel checks).
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// `BLKFILTER_CTL` of the blksnap filter on `fd`.
fn filter_ctl(fd: i32, cmd: u32, opt: *mut u8, optlen: u32) -> Result<i32, Errno> {
    let mut arg = uapi::BlkfilterCtl {
        name: raw::filter_name("blksnap"),
        cmd,
        optlen,
        opt: opt as u64,
    };
    ioctl(fd, uapi::BLKFILTER_CTL, &mut arg)
}

fn filter_attach(fd: i32) -> Result<i32, Errno> {
    let mut arg = uapi::BlkfilterAttach {
        name: raw::filter_name("blksnap"),
        ..Default::default()
    };
    ioctl(fd, uapi::BLKFILTER_ATTACH, &mut arg)
}

fn filter_detach(fd: i32) -> Result<i32, Errno> {
    let mut arg = uapi::BlkfilterDetach {
        name: raw::filter_name("blksnap"),
    };
    ioctl(fd, uapi::BLKFILTER_DETACH, &mut arg)
}

/// Detaches the filter through `fd` when dropped.
struct RawAttached(i32);

impl Drop for RawAttached {
    fn drop(&mut self) {
        let _ = filter_detach(self.0);
    }
}

/// Opens a block device the way upstream's library and tool do: O_DIRECT
/// only, which is read-only.
fn open_like_upstream(dev: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("open {} O_RDONLY|O_DIRECT: {e}", dev.display()))
}

/// CBTINFO through `fd`.
fn cbtinfo(fd: i32) -> Result<(i32, uapi::BlksnapCbtinfo), Errno> {
    let mut info = uapi::BlksnapCbtinfo::default();
    let r = filter_ctl(
        fd,
        ctl::CBTINFO,
        (&mut info as *mut uapi::BlksnapCbtinfo).cast(),
        40,
    )?;
    Ok((r, info))
}

/// CBTMAP of `out.len()` bytes from `offset` through `fd`.
fn cbtmap(fd: i32, offset: u32, out: &mut [u8]) -> Result<i32, Errno> {
    let mut m = uapi::BlksnapCbtmap {
        offset,
        length: out.len() as u32,
        buffer: out.as_mut_ptr() as u64,
    };
    filter_ctl(
        fd,
        ctl::CBTMAP,
        (&mut m as *mut uapi::BlksnapCbtmap).cast(),
        16,
    )
}

/// SNAPSHOT_CREATE as upstream's library does it: the id is read back from
/// the argument. Returns the return value and the argument after the call.
fn create_raw(
    ctl: &Control,
    store: &Path,
    limit: u64,
) -> Result<(i32, uapi::BlksnapSnapshotCreate, CString), Errno> {
    let path = CString::new(store.as_os_str().as_bytes()).unwrap();
    let mut arg = uapi::BlksnapSnapshotCreate {
        diff_storage_limit_sect: limit,
        diff_storage_filename: path.as_ptr() as u64,
        id: uapi::BlksnapUuid::default(),
    };
    let r = ioctl(
        ctl.as_raw_fd(),
        uapi::IOCTL_BLKSNAP_SNAPSHOT_CREATE,
        &mut arg,
    )?;
    Ok((r, arg, path))
}

/// An event structure as a byte array, to check what the kernel wrote.
fn event_bytes(ev: &uapi::BlksnapSnapshotEvent) -> &[u8] {
    // SAFETY: a plain `repr(C)` struct without padding, viewed as bytes.
    unsafe {
        std::slice::from_raw_parts(
            (ev as *const uapi::BlksnapSnapshotEvent).cast::<u8>(),
            uapi::BLKSNAP_EVENT_SIZE,
        )
    }
}

/// A WAIT_EVENT argument for `id`, everything after id and timeout_ms
/// filled with 0xa5 so that any write-back shows.
fn event_arg(id: &SnapshotId, timeout_ms: u32) -> Box<uapi::BlksnapSnapshotEvent> {
    let mut ev = Box::new(uapi::BlksnapSnapshotEvent {
        id: uapi::BlksnapUuid { b: id.0 },
        timeout_ms,
        code: 0,
        time_label: 0,
        data: [0; uapi::BLKSNAP_EVENT_SIZE - 32],
    });
    poison_output(&mut ev);
    ev
}

/// Fills the output part of an event argument with 0xa5, keeping id and
/// timeout_ms.
fn poison_output(ev: &mut uapi::BlksnapSnapshotEvent) {
    ev.code = 0xa5a5_a5a5;
    ev.time_label = 0xa5a5_a5a5_a5a5_a5a5u64 as i64;
    ev.data.fill(0xa5);
}

fn wait_raw(ctl: &Control, ev: &mut uapi::BlksnapSnapshotEvent) -> Result<i32, Errno> {
    ioctl(
        ctl.as_raw_fd(),
        uapi::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT,
        ev as *mut uapi::BlksnapSnapshotEvent,
    )
}

/// COLLECT with `count` and `ids`: the return value (or errno) and count.
fn collect_raw(ctl: &Control, count: u32, ids: u64) -> (Result<i32, Errno>, u32) {
    let mut arg = uapi::BlksnapSnapshotCollect { count, ids };
    let r = ioctl(
        ctl.as_raw_fd(),
        uapi::IOCTL_BLKSNAP_SNAPSHOT_COLLECT,
        &mut arg,
    );
    (r, arg.count)
}

/// A snapshot id as the ioctls take it.
fn uuid(id: &SnapshotId) -> uapi::BlksnapUuid {
    uapi::BlksnapUuid { b: id.0 }
}

fn blkfilter() -> TestResult {
    let mut ck = Checks::new();
    let c = disk("blksnap-c")?;
    let f = open_like_upstream(&c)?;
    let fd = f.as_raw_fd();
    let size = dev::size_sectors(&c)?;

    ck.check(
        "ALL | permission checks: BLKFILTER_* work on a read-only (O_RDONLY|O_DIRECT) fd",
        want(
            "BLKFILTER_ATTACH on the read-only fd",
            filter_attach(fd),
            Ok(0),
        ),
    );
    let attached = RawAttached(fd);
    ck.check(
        "BLKFILTER_ATTACH | same filter already attached to this block device",
        want(
            "second BLKFILTER_ATTACH",
            filter_attach(fd),
            Err(Errno::EALREADY),
        ),
    );

    // CBTINFO sizes the map that CBTMAP reads.
    let info = cbtinfo(fd);
    let count = info.map(|(_, i)| i.block_count).unwrap_or(0);
    ck.check(
        "BLKFILTER_CTL/CBTINFO | block_size / block_count: one map byte per block",
        (|| {
            let (r, i) = info.map_err(|e| format!("CBTINFO: {e}"))?;
            want("CBTINFO return value", r, 0)?;
            want("device_capacity", i.device_capacity, size * SECTOR)?;
            want(
                "block_count for the capacity and block_size",
                u64::from(i.block_count),
                (size * SECTOR).div_ceil(u64::from(i.block_size)),
            )?;
            let mut map = vec![0u8; count as usize + 1];
            want(
                "CBTMAP of block_count bytes",
                cbtmap(fd, 0, &mut map[..count as usize]),
                Ok(0),
            )?;
            want(
                "CBTMAP of block_count + 1 bytes",
                cbtmap(fd, 0, &mut map),
                Err(Errno::ENODATA),
            )
        })(),
    );

    // Mark three blocks, then take a snapshot: the readable map has them.
    let bs = info.map(|(_, i)| u64::from(i.block_size)).unwrap_or(65536) / SECTOR;
    let marked = [0u64, 5, u64::from(count) - 1];
    for &b in &marked {
        dev::write_direct(&c, b * bs, 1, 0x5a)?;
    }
    let store = dev::scratch();
    let snap = Snap::create(&store, 64 * MIB_SECTORS)?;
    let mut add = uuid(&snap.id);
    ck.check(
        "BLKFILTER_CTL/SNAPSHOTADD | success: returns 0",
        want(
            "SNAPSHOTADD on the read-only fd",
            filter_ctl(
                fd,
                ctl::SNAPSHOTADD,
                (&mut add as *mut uapi::BlksnapUuid).cast(),
                16,
            ),
            Ok(0),
        ),
    );
    snap.take()?;

    let mut whole = vec![0xeeu8; count as usize];
    ck.check(
        "BLKFILTER_CTL/CBTMAP | whole map in one call (offset 0, length block_count)",
        (|| {
            want("CBTMAP of the whole map", cbtmap(fd, 0, &mut whole), Ok(0))?;
            let got: Vec<usize> = (0..whole.len()).filter(|&i| whole[i] != 0).collect();
            want(
                "blocks marked in the map",
                got,
                marked.iter().map(|&b| b as usize).collect(),
            )?;
            want("their change number", whole[5], 1)
        })(),
    );
    ck.check(
        "BLKFILTER_CTL/CBTMAP | offset+length == block_count (reading up to the exact end)",
        (|| {
            // Pieces of 100 bytes, the last one shorter and ending at count.
            let mut pieces = vec![0xeeu8; count as usize];
            for (i, piece) in pieces.chunks_mut(100).enumerate() {
                let off = (i * 100) as u32;
                let n = piece.len();
                want(
                    &format!("CBTMAP of {n} bytes at {off} of {count}"),
                    cbtmap(fd, off, piece),
                    Ok(0),
                )?;
            }
            want("the pieces put together", &pieces, &whole)
        })(),
    );

    let mut si = [0xa5u8; 36];
    let r = filter_ctl(fd, ctl::SNAPSHOTINFO, si.as_mut_ptr(), 36);
    ck.check(
        "BLKFILTER_CTL/SNAPSHOTINFO | optlen < 36 (exactly 36 is accepted)",
        want("SNAPSHOTINFO with optlen 36", r, Ok(0)),
    );
    ck.check(
        "BLKFILTER_CTL/SNAPSHOTINFO | image while taken: NUL-terminated, usable as /dev/<image>",
        (|| {
            want(
                "error_code",
                i32::from_ne_bytes(si[0..4].try_into().unwrap()),
                0,
            )?;
            let name = &si[4..];
            let end = name
                .iter()
                .position(|&b| b == 0)
                .ok_or("image name not NUL-terminated within 32 bytes")?;
            let name = std::str::from_utf8(&name[..end]).map_err(|e| e.to_string())?;
            let path = Path::new("/dev").join(name);
            let mut found = None;
            for _ in 0..100 {
                if let Ok(m) = std::fs::metadata(&path) {
                    found = Some(m);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let m = found.ok_or(format!("{} does not exist", path.display()))?;
            if !m.file_type().is_block_device() {
                return Err(format!("{} is not a block device", path.display()));
            }
            want(
                "its size",
                dev::size_sectors(&path)?,
                dev::size_sectors(&c)?,
            )?;
            let data = dev::read_direct(&path, 5 * bs, 1)?;
            want("its data at block 5", data[0], 0x5a)?;
            println!("    image /dev/{name}");
            Ok(())
        })(),
    );
    snap.destroy()?;
    // Every blksnap CTL command returns exactly 0: the CBTDIRTY case.
    let mut ranges = [uapi::BlksnapSectors {
        offset: 0,
        count: 8,
    }];
    let mut dirty = uapi::BlksnapCbtdirty {
        count: 1,
        dirty_sectors: ranges.as_mut_ptr() as u64,
    };
    ck.check(
        "BLKFILTER_CTL | success return value: 0 for every blksnap command (CBTDIRTY)",
        want(
            "CBTDIRTY",
            filter_ctl(
                fd,
                ctl::CBTDIRTY,
                (&mut dirty as *mut uapi::BlksnapCbtdirty).cast(),
                16,
            ),
            Ok(0),
        ),
    );

    std::mem::forget(attached);
    want("BLKFILTER_DETACH", filter_detach(fd), Ok(0))?;
    let mut add = uuid(&SnapshotId([0x77; 16]));
    ck.check(
        "BLKFILTER_CTL | no filter attached: ENOENT",
        (|| {
            want(
                "CBTINFO without the filter",
                cbtinfo(fd).map(|r| r.0),
                Err(Errno::ENOENT),
            )?;
            want(
                "SNAPSHOTADD without the filter",
                filter_ctl(
                    fd,
                    ctl::SNAPSHOTADD,
                    (&mut add as *mut uapi::BlksnapUuid).cast(),
                    16,
                ),
                Err(Errno::ENOENT),
            )
        })(),
    );
    ck.done()
}

fn control() -> TestResult {
    let mut ck = Checks::new();
    ck.check(
        "CONTROL | device node: misc device blksnap-control, opened O_RDWR",
        (|| {
            let m = std::fs::metadata(blksnap::CONTROL_PATH).map_err(|e| e.to_string())?;
            if !m.file_type().is_char_device() {
                return Err(format!(
                    "{} is not a character device",
                    blksnap::CONTROL_PATH
                ));
            }
            let misc = std::fs::read_to_string("/sys/class/misc/blksnap-control/dev")
                .map_err(|e| format!("/sys/class/misc/blksnap-control/dev: {e}"))?;
            let rdev = m.rdev();
            want(
                "its device number",
                misc.trim().to_string(),
                format!("{}:{}", libc::major(rdev), libc::minor(rdev)),
            )?;
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(blksnap::CONTROL_PATH)
                .map(|_| ())
                .map_err(|e| format!("open O_RDWR: {e}"))
        })(),
    );
    let ctl = Control::open().map_err(e)?;
    let fd = ctl.as_raw_fd();
    let mut v = uapi::BlksnapVersion::default();
    let version = ioctl(fd, uapi::IOCTL_BLKSNAP_VERSION, &mut v);

    // Three snapshots; the middle one destroyed, then a fourth.
    let (before_r, before) = collect_raw(&ctl, 0, 0);
    let store = dev::scratch();
    let created = create_raw(&ctl, &store, 64 * MIB_SECTORS);
    ck.check(
        "SNAPSHOT_CREATE | success: returns 0, id written back in the same struct",
        (|| {
            let (r, arg, path) = created.as_ref().map_err(|e| format!("CREATE: {e}"))?;
            want("return value", *r, 0)?;
            want(
                "limit echoed",
                arg.diff_storage_limit_sect,
                64 * MIB_SECTORS,
            )?;
            want(
                "filename pointer echoed",
                arg.diff_storage_filename,
                path.as_ptr() as u64,
            )?;
            if arg.id.b == [0; 16] {
                return Err("the id is all zero".into());
            }
            Ok(())
        })(),
    );
    let a = match &created {
        Ok((_, arg, _)) => Snap {
            id: SnapshotId(arg.id.b),
            ctl: Control::open().map_err(e)?,
        },
        Err(err) => return Err(format!("SNAPSHOT_CREATE: {err}")),
    };
    let b = Snap::create(&store, 64 * MIB_SECTORS)?;
    let c = Snap::create(&store, 64 * MIB_SECTORS)?;
    let mut b_id = uuid(&b.id);
    let destroyed = ioctl(fd, uapi::IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &mut b_id);
    drop(b);
    let d = Snap::create(&store, 64 * MIB_SECTORS)?;
    let n0 = if before_r == Ok(0) { before } else { 0 };
    let n = n0 + 3;

    ck.check(
        "SNAPSHOT_COLLECT | ids == 0 (size query): returns 0, count = number of snapshots",
        (|| {
            want(
                "COLLECT before (count 0, ids 0)",
                (before_r, before),
                (Ok(0), n0),
            )?;
            want(
                "COLLECT count 0, ids 0",
                collect_raw(&ctl, 0, 0),
                (Ok(0), n),
            )?;
            want(
                "COLLECT count 7 (ignored), ids 0",
                collect_raw(&ctl, 7, 0),
                (Ok(0), n),
            )
        })(),
    );
    let mut ids = vec![uapi::BlksnapUuid::default(); n as usize + 2];
    let (r, count) = collect_raw(&ctl, n + 2, ids.as_mut_ptr() as u64);
    ck.check(
        "SNAPSHOT_COLLECT | ids != 0 and count >= number: returns 0, ids in creation order",
        (|| {
            want("return value and count", (r, count), (Ok(0), n))?;
            let tail: Vec<[u8; 16]> = ids[n0 as usize..n as usize].iter().map(|u| u.b).collect();
            want("ids", tail, vec![a.id.0, c.id.0, d.id.0])?;
            want("entries past count", ids[n as usize].b, [0; 16])
        })(),
    );

    // A waiter sleeping on a snapshot does not hold up its take.
    let dev_c = disk("blksnap-c")?;
    let t = Tracked::new(&dev_c)?;
    a.add(&t.0)?;
    let mut ev = event_arg(&a.id, 300);
    ck.check(
        "SNAPSHOT_WAIT_EVENT | before TAKE: no event, ENOENT",
        want(
            "WAIT_EVENT before take",
            wait_raw(&ctl, &mut ev),
            Err(Errno::ENOENT),
        ),
    );
    let id = a.id;
    let waiter = std::thread::spawn(move || {
        let ctl = Control::open().map_err(e)?;
        let mut ev = event_arg(&id, 4000);
        let start = Instant::now();
        let r = wait_raw(&ctl, &mut ev);
        Ok::<_, String>((r, start.elapsed()))
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut a_id = uuid(&a.id);
    let start = Instant::now();
    let took = ioctl(fd, uapi::IOCTL_BLKSNAP_SNAPSHOT_TAKE, &mut a_id);
    let take_time = start.elapsed();
    let waiter_done = waiter.is_finished();
    let (waited, wait_time) = waiter.join().map_err(|_| "waiter panicked".to_string())??;
    ck.check(
        "SNAPSHOT_TAKE | concurrent SNAPSHOT_WAIT_EVENT on the same snapshot: not blocked",
        (|| {
            want("TAKE", took, Ok(0))?;
            if waiter_done || take_time > Duration::from_secs(2) {
                return Err(format!(
                    "TAKE took {} ms, the waiter {} by then",
                    take_time.as_millis(),
                    if waiter_done {
                        "had returned"
                    } else {
                        "was still waiting"
                    }
                ));
            }
            want("the waiter's result", waited, Err(Errno::ENOENT))?;
            println!(
                "    take: {} ms while the waiter slept; it returned after {} ms",
                take_time.as_millis(),
                wait_time.as_millis()
            );
            Ok(())
        })(),
    );

    let mut c_id = uuid(&c.id);
    let destroyed2 = ioctl(fd, uapi::IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &mut c_id);
    drop(c);
    ck.check(
        "CONTROL | success return value: exactly 0 for all six commands",
        (|| {
            want("VERSION", version, Ok(0))?;
            want(
                "CREATE",
                created.as_ref().map(|r| r.0).map_err(|e| *e),
                Ok(0),
            )?;
            want("COLLECT", r, Ok(0))?;
            want("TAKE", took, Ok(0))?;
            want("DESTROY", destroyed, Ok(0))?;
            want("DESTROY", destroyed2, Ok(0))
            // WAIT_EVENT with an event: upstream_client_semantics_file_store_events.
        })(),
    );
    a.destroy()?;
    d.destroy()?;
    ck.done()
}

extern "C" fn on_signal(_: i32) {}

/// Installs a SIGUSR1 handler, with or without SA_RESTART; restores the old
/// one when dropped.
struct Handler(nix::sys::signal::SigAction);

impl Handler {
    fn install(restart: bool) -> Result<Self, String> {
        use nix::sys::signal::*;
        let flags = if restart {
            SaFlags::SA_RESTART
        } else {
            SaFlags::empty()
        };
        let sa = SigAction::new(SigHandler::Handler(on_signal), flags, SigSet::empty());
        // SAFETY: the handler does nothing, which is async-signal-safe.
        let old = unsafe { sigaction(Signal::SIGUSR1, &sa) }.map_err(|e| e.to_string())?;
        Ok(Self(old))
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // SAFETY: restores the handler that was there before.
        let _ = unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGUSR1, &self.0) };
    }
}

/// A WAIT_EVENT of up to 5 s on `id` in a thread that gets SIGUSR1 every
/// 200 ms until it returns (for at most 3 s): its result and how long it
/// took.
fn interrupted_wait(
    id: SnapshotId,
    restart: bool,
) -> Result<(Result<i32, Errno>, Duration), String> {
    let _h = Handler::install(restart)?;
    let done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = Control::open().map_err(e).map(|ctl| {
                let mut ev = event_arg(&id, 5000);
                let start = Instant::now();
                let r = wait_raw(&ctl, &mut ev);
                (r, start.elapsed())
            });
            done.store(true, Ordering::Release);
            r
        })
    };
    let thread = waiter.as_pthread_t();
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    while !done.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(3) {
        // A thread that has just returned may be gone: ignore errors.
        // SAFETY: the thread is not joined yet, so its handle is valid.
        let _ = unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(200));
    }
    waiter.join().map_err(|_| "waiter panicked".to_string())?
}

fn wait_event() -> TestResult {
    let mut ck = Checks::new();
    let ctl = Control::open().map_err(e)?;
    let mut ev = event_arg(&SnapshotId([0x66; 16]), 100);
    ck.check(
        "SNAPSHOT_WAIT_EVENT | unknown or destroyed id: ESRCH",
        want(
            "WAIT_EVENT on an unknown id",
            wait_raw(&ctl, &mut ev),
            Err(Errno::ESRCH),
        ),
    );
    let snap = Snap::create(&dev::scratch(), 64 * MIB_SECTORS)?;
    let mut ev = event_arg(&snap.id, 200);
    let before = event_bytes(&ev).to_vec();
    let r = wait_raw(&ctl, &mut ev);
    ck.check(
        "SNAPSHOT_WAIT_EVENT | no event before the timeout: ENOENT, nothing written back",
        (|| {
            want("WAIT_EVENT of 200 ms", r, Err(Errno::ENOENT))?;
            if let Some(i) = (0..before.len()).find(|&i| event_bytes(&ev)[i] != before[i]) {
                return Err(format!("byte {i} of the struct was written"));
            }
            Ok(())
        })(),
    );
    ck.check(
        "SNAPSHOT_WAIT_EVENT | interrupted by a signal: EINTR",
        (|| {
            for restart in [false, true] {
                let (r, took) = interrupted_wait(snap.id, restart)?;
                let how = if restart {
                    "with SA_RESTART"
                } else {
                    "without SA_RESTART"
                };
                want(&format!("a waiter signalled {how}"), r, Err(Errno::EINTR))?;
                if took > Duration::from_millis(3500) {
                    return Err(format!(
                        "a waiter signalled {how} returned after {} ms",
                        took.as_millis()
                    ));
                }
                println!("    signalled {how}: EINTR after {} ms", took.as_millis());
            }
            Ok(())
        })(),
    );
    snap.destroy()?;
    let mut ev = event_arg(&snap_id_of_destroyed(&ctl)?, 100);
    ck.check(
        "SNAPSHOT_WAIT_EVENT | unknown or destroyed id: ESRCH (destroyed)",
        want(
            "WAIT_EVENT on a destroyed id",
            wait_raw(&ctl, &mut ev),
            Err(Errno::ESRCH),
        ),
    );
    ck.done()
}

/// The id of a snapshot that was created and destroyed.
fn snap_id_of_destroyed(ctl: &Control) -> Result<SnapshotId, String> {
    let id = ctl
        .snapshot_create(&dev::scratch(), 64 * MIB_SECTORS)
        .map_err(e)?;
    ctl.snapshot_destroy(&id).map_err(e)?;
    Ok(id)
}

/// One event as WAIT_EVENT wrote it.
#[derive(Debug)]
struct Got {
    code: u32,
    data: [u8; 16],
}

fn file_store_events() -> TestResult {
    let mut ck = Checks::new();
    let c = disk("blksnap-c")?;
    let size = dev::size_sectors(&c)?;
    write_pattern(&c, 0, size, 81)?;
    let t = Tracked::new(&c)?;
    let (major, minor) = dev::major_minor(&c)?;

    // A block device store of 64 MiB: far less free than half of
    // diff_storage_minimum, but upstream raises nothing for it.
    let ctl = Control::open().map_err(e)?;
    let d = disk("blksnap-d")?;
    let snap = Snap::create(&d, 0)?;
    snap.add(&t.0)?;
    snap.take()?;
    write_pattern(&c, 0, 2 * MIB_SECTORS, 82)?;
    let mut ev = event_arg(&snap.id, 500);
    let r = wait_raw(&ctl, &mut ev);
    ck.check(
        "SNAPSHOT_WAIT_EVENT | code: 0 = corrupted, 1 = no_space, no other codes (block device store)",
        want("event of a block device store in use", (r, ev.code), (Err(Errno::ENOENT), 0xa5a5_a5a5)),
    );
    snap.destroy()?;

    // A regular file store of at most 4 MiB, overflowed with 16 MiB of
    // writes.
    let store = dev::scratch().join("upstream-store.img");
    File::create(&store).map_err(|e| e.to_string())?;
    let limit = 4 * MIB_SECTORS;
    let (_, arg, _) = create_raw(&ctl, &store, limit).map_err(|e| format!("CREATE: {e}"))?;
    let snap = Snap {
        id: SnapshotId(arg.id.b),
        ctl: Control::open().map_err(e)?,
    };
    snap.add(&t.0)?;
    snap.take()?;
    write_pattern(&c, 0, 16 * MIB_SECTORS, 83)?;
    // As upstream's tool watcher: id and timeout_ms set once, the struct
    // reused for every call. The output part is poisoned before each call.
    let mut ev = event_arg(&snap.id, 2000);
    let mut got = Vec::new();
    let mut echo = Ok(());
    let mut zero_filled = Ok(());
    let mut rets = Vec::new();
    let last = loop {
        poison_output(&mut ev);
        match wait_raw(&ctl, &mut ev) {
            Ok(r) => {
                rets.push(r);
                if ev.id.b != snap.id.0 || ev.timeout_ms != 2000 {
                    echo = Err(format!(
                        "after event {}: id {:?}, timeout_ms {}",
                        ev.code, ev.id.b, ev.timeout_ms
                    ));
                }
                let payload = if ev.code == uapi::event::CORRUPTED {
                    12
                } else {
                    8
                };
                if let Some(i) = (payload..ev.data.len()).find(|&i| ev.data[i] != 0) {
                    zero_filled = Err(format!(
                        "event {}: data byte {i} is {:#x}, not zero",
                        ev.code, ev.data[i]
                    ));
                }
                got.push(Got {
                    code: ev.code,
                    data: ev.data[..16].try_into().unwrap(),
                });
                if got.len() > 100 {
                    break Ok(0);
                }
            }
            Err(err) => break Err(err),
        }
    };
    let file_size = std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0);
    let info = t.0.snapshot_info().map_err(e)?;
    snap.destroy()?;
    std::fs::remove_file(&store).ok();
    let codes: Vec<u32> = got.iter().map(|g| g.code).collect();
    println!("    events {codes:?}, then {last:?}; store file {file_size} bytes");

    ck.check(
        "SNAPSHOT_WAIT_EVENT | code: 0 = corrupted, 1 = no_space, no other codes (file store)",
        (|| {
            if let Some(g) = got.iter().find(|g| g.code > 1) {
                return Err(format!("event code {} (payload {:?})", g.code, g.data));
            }
            want("the wait after the last event", last, Err(Errno::ENOENT))
        })(),
    );
    ck.check(
        "SNAPSHOT_WAIT_EVENT | written-back id and timeout_ms: echoed unchanged",
        echo,
    );
    ck.check(
        "SNAPSHOT_WAIT_EVENT | data bytes: payload at the start of data, the rest zero-filled",
        zero_filled,
    );
    ck.check(
        "CONTROL | success return value: exactly 0 for WAIT_EVENT with an event",
        want(
            "WAIT_EVENT return values",
            rets.iter().all(|&r| r == 0),
            true,
        ),
    );
    let corrupted: Vec<&Got> = got.iter().filter(|g| g.code == 0).collect();
    ck.check(
        "SNAPSHOT_WAIT_EVENT | corrupted payload: major, minor, err_code a POSITIVE errno (28)",
        (|| {
            want("corrupted events", corrupted.len(), 1)?;
            let d = &corrupted[0].data;
            let u32_at = |o: usize| u32::from_ne_bytes(d[o..o + 4].try_into().unwrap());
            want(
                "payload",
                (u32_at(0), u32_at(4), u32_at(8) as i32),
                (major, minor, Errno::ENOSPC as i32),
            )
        })(),
    );
    let no_space: Vec<u64> = got
        .iter()
        .filter(|g| g.code == 1)
        .map(|g| u64::from_ne_bytes(g.data[..8].try_into().unwrap()))
        .collect();
    ck.check(
        "SNAPSHOT_WAIT_EVENT | no_space payload: requested_nr_sect = total storage size requested, in sectors",
        (|| {
            want("no_space events (at most once per snapshot)", no_space.len(), 1)?;
            want("requested_nr_sect: the limit the file reached", no_space[0], limit)?;
            want("and the store file's size in sectors", file_size / SECTOR, limit)
        })(),
    );
    ck.check(
        "SNAPSHOT_CREATE | diff_storage_limit_sect: maximum storage size in 512-byte sectors",
        want(
            "store file size at the limit of 4 MiB",
            file_size,
            limit * SECTOR,
        ),
    );
    // Not a client-depends line, but the other half of the errno rule.
    ck.check(
        "BLKFILTER_CTL/SNAPSHOTINFO | error_code: the stored negative errno",
        want(
            "SNAPSHOTINFO error_code",
            info.error_code,
            -(Errno::ENOSPC as i32),
        ),
    );
    ck.done()
}
