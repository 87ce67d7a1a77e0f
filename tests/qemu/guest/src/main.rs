// SPDX-License-Identifier: GPL-2.0

//! Guest-side tests of the blksnap module, run inside the QEMU guest by
//! tests/qemu/guest.sh. Each test asserts exact content: which CBT blocks are
//! marked, which errno an ioctl returns, what the kernel log says.
//!
//! Output: one `ok NAME` or `FAIL NAME: reason` line per test, then
//! `N passed, N failed`. The exit status is non-zero if any test failed.

mod app;
mod backup;
mod compat;
mod conc;
mod cut;
mod dev;
mod faults;
mod fuzz;
mod mount;
mod odd;
mod persist;
mod points;
mod pressure;
mod reboot;
mod removal;
mod snap;
mod stacks;
mod store;
mod stress;
mod tests;
mod upstream;

use std::time::Instant;

/// A test's outcome: `Err` carries the reason of the failure.
pub type TestResult = Result<(), String>;

/// Fails the test with a formatted reason.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { return Err(format!($($arg)*)) };
}

/// Fails the test unless the two values are equal.
#[macro_export]
macro_rules! check_eq {
    ($got:expr, $want:expr, $($what:tt)*) => {{
        let (got, want) = (&$got, &$want);
        if got != want {
            return Err(format!("{}: got {:?}, want {:?}", format!($($what)*), got, want));
        }
    }};
}

/// Kernel log patterns that fail a test when they appear during it.
const SPLATS: &[&str] = &[
    "BUG:",
    "WARNING:",
    "KASAN:",
    "Oops",
    "possible circular locking",
    "possible recursive locking",
    "inconsistent lock state",
    "INFO: task",
    "Kernel panic",
    "UBSAN:",
    "general protection fault",
    "unreferenced object",
    "soft lockup",
    "hung_task",
    "blocked for more than",
    "self-detected stall",
    "rcu: INFO",
];

/// Reads the kernel log from /dev/kmsg, record by record. Records carry a
/// sequence number: a test examines exactly the records logged after the
/// previous read, however often the ring buffer wrapped, and the records
/// that were overwritten before they could be read are counted.
struct Kmsg {
    file: std::fs::File,
    /// Sequence number of the last record read.
    last: Option<u64>,
}

/// Records read by [`Kmsg::read_new`].
struct KmsgRead {
    /// The messages, in order.
    lines: Vec<String>,
    /// How many records were overwritten before they were read.
    lost: u64,
    /// A read error other than the end of the log, if any.
    error: Option<String>,
}

impl Kmsg {
    /// Opens /dev/kmsg and skips the records already there.
    fn open() -> Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .map_err(|e| format!("/dev/kmsg: {e}"))?;
        let mut k = Self { file, last: None };
        k.read_new();
        Ok(k)
    }

    /// Reads every record logged since the last call.
    fn read_new(&mut self) -> KmsgRead {
        use std::io::Read;
        let mut out = KmsgRead {
            lines: Vec::new(),
            lost: 0,
            error: None,
        };
        // One record per read; records are at most about 1 KiB of text,
        // escaped.
        let mut buf = vec![0u8; 16384];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // `prio,seq,usec,flags[,...];message\n` and then
                    // continuation lines with key=value pairs.
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    let Some((head, rest)) = rec.split_once(';') else {
                        continue;
                    };
                    let Some(seq) = head.split(',').nth(1).and_then(|s| s.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    if let Some(last) = self.last {
                        if seq <= last {
                            continue;
                        }
                        out.lost += seq - last - 1;
                    }
                    self.last = Some(seq);
                    out.lines
                        .push(rest.lines().next().unwrap_or_default().to_string());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EPIPE: the next record was overwritten; the next read
                // returns the oldest one left, and the gap in the sequence
                // numbers counts what was lost.
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {}
                Err(e) => {
                    out.error = Some(format!("reading /dev/kmsg: {e}"));
                    break;
                }
            }
        }
        out
    }
}

/// The kernel log reader of the run, and the records read since the last
/// test ended.
static KMSG: std::sync::Mutex<Option<(Result<Kmsg, String>, KmsgRead)>> =
    std::sync::Mutex::new(None);

/// Reads the kernel log records logged since the last read and keeps them
/// for the check at the end of the running test. A test that makes the
/// kernel log much (the fuzzer) calls it now and then, so that the ring
/// buffer cannot wrap before the records are checked. Of long logs, the
/// lines that match a splat pattern and the last 1000 are kept.
pub fn kmsg_poll() {
    let mut guard = KMSG.lock().unwrap_or_else(|e| e.into_inner());
    let Some((Ok(k), pending)) = guard.as_mut() else {
        return;
    };
    let new = k.read_new();
    pending.lost += new.lost;
    if new.error.is_some() {
        pending.error = new.error;
    }
    pending.lines.extend(new.lines);
    if pending.lines.len() > 20_000 {
        let n = pending.lines.len();
        let mut i = 0;
        pending.lines.retain(|l| {
            i += 1;
            i > n - 1000 || SPLATS.iter().any(|s| l.contains(s))
        });
    }
}

/// The records logged since the previous call.
fn kmsg_take() -> KmsgRead {
    kmsg_poll();
    let mut guard = KMSG.lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_mut() {
        Some((Ok(_), pending)) => std::mem::replace(
            pending,
            KmsgRead {
                lines: Vec::new(),
                lost: 0,
                error: None,
            },
        ),
        Some((Err(err), _)) => KmsgRead {
            lines: Vec::new(),
            lost: 0,
            error: Some(err.clone()),
        },
        None => KmsgRead {
            lines: Vec::new(),
            lost: 0,
            error: Some("/dev/kmsg not open".into()),
        },
    }
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).collect();
    let mut passed = 0;
    let mut failed = 0;
    *KMSG.lock().unwrap() = Some((
        Kmsg::open(),
        KmsgRead {
            lines: Vec::new(),
            lost: 0,
            error: None,
        },
    ));
    for (name, test) in tests::ALL
        .iter()
        .chain(snap::ALL)
        .chain(store::ALL)
        .chain(upstream::ALL)
        .chain(backup::ALL)
        .chain(app::ALL)
        .chain(points::ALL)
        .chain(mount::ALL)
        .chain(odd::ALL)
        .chain(cut::ALL)
        .chain(compat::ALL)
        .chain(removal::ALL)
        .chain(persist::ALL)
        .chain(stacks::ALL)
        .chain(conc::ALL)
        .chain(pressure::ALL)
        .chain(stress::ALL)
        .chain(faults::ALL)
        .chain(fuzz::ALL)
        // The reboot phases only when asked for by their prefix: each needs
        // its boot of `run.sh reboot` and that mode's disks.
        .chain(if filter.iter().any(|f| f.starts_with("reboot_")) {
            reboot::ALL
        } else {
            &[]
        })
    {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let start = Instant::now();
        println!("--- {name}");
        let mut result = test();
        // The kernel log of the test: every record logged since the last
        // one the previous test saw.
        let log = kmsg_take();
        let new = &log.lines[..];
        if let Some(line) = new.iter().find(|l| SPLATS.iter().any(|s| l.contains(s))) {
            result = Err(format!("kernel log: {line}"));
        } else if log.lost != 0 || log.error.is_some() {
            let why = match &log.error {
                Some(err) => format!("kernel log not checked: {err}"),
                None => format!(
                    "kernel log: {} records were overwritten before they could be checked \
                     (the ring buffer wrapped during the test)",
                    log.lost
                ),
            };
            result = Err(match result {
                Ok(()) => why,
                Err(reason) => format!("{reason}; {why}"),
            });
        }
        let secs = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                passed += 1;
                println!("ok {name} ({secs:.1}s)");
            }
            Err(reason) => {
                failed += 1;
                println!("FAIL {name}: {reason}");
                // The whole kernel log of the test, for the triage: the
                // console shows only its end (and a fuzzing test quiets it).
                if let Ok(dir) = std::env::var("BLKSNAP_RESULTS") {
                    let file = format!("{dir}/kmsg-{name}.log");
                    if std::fs::write(&file, new.join("\n") + "\n").is_ok() {
                        println!("    kernel log of the test: {file}");
                    }
                }
                for l in new.iter().rev().take(40).rev() {
                    println!("    | {l}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
