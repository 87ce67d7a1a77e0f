// SPDX-License-Identifier: GPL-2.0

//! Guest-side tests of the blksnap module, run inside the QEMU guest by
//! tests/qemu/guest.sh. Each test asserts exact content: which CBT blocks are
//! marked, which errno an ioctl returns, what the kernel log says.
//!
//! Output: one `ok NAME` or `FAIL NAME: reason` line per test, then
//! `N passed, N failed`. The exit status is non-zero if any test failed.

mod backup;
mod dev;
mod snap;
mod store;
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
];

fn kernel_log() -> Vec<String> {
    match std::process::Command::new("dmesg").output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(String::from)
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).collect();
    let mut passed = 0;
    let mut failed = 0;
    for (name, test) in tests::ALL
        .iter()
        .chain(snap::ALL)
        .chain(store::ALL)
        .chain(upstream::ALL)
        .chain(backup::ALL)
    {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let before = kernel_log().len();
        let start = Instant::now();
        println!("--- {name}");
        let mut result = test();
        let log = kernel_log();
        let new = log.get(before..).unwrap_or(&[]);
        if let Some(line) = new.iter().find(|l| SPLATS.iter().any(|s| l.contains(s))) {
            result = Err(format!("kernel log: {line}"));
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
                for l in new.iter().rev().take(40).rev() {
                    println!("    | {l}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
