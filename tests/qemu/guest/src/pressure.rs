// SPDX-License-Identifier: GPL-2.0

//! Memory pressure with swap on a snapshotted disk: reclaim writes swap
//! pages to that disk, and each of those writes may need a copy-on-write
//! whose worker must not itself wait in reclaim for such a write. Memory
//! hogs push the guest past its RAM while fio writes and verifies another
//! partition of the disk; nothing may hang, the origin keeps every write,
//! and the image keeps the data of the take.

use crate::dev::{self, SECTOR};
use crate::snap::{disk, e, pattern, write_pattern, Snap, Tracked};
use crate::{fail, TestResult};
use blksnap::Event;
use nix::errno::Errno;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The tests, in the order they run.
pub const ALL: &[Test] = &[("pressure_swap_on_a_snapshotted_disk", swap_pressure)];

/// The memory hog: fills `argv[1]` MiB page by page, then writes every
/// page again and again (bringing swapped pages back in and pushing others
/// out) until `argv[2]` seconds have passed since it started, then exits.
/// A time-bounded amount of pressure: a fixed amount of work may take any
/// time in a thrashing TCG guest. It offers itself to the OOM killer first.
const HOG: &str = "
import sys, time
open('/proc/self/oom_score_adj', 'w').write('1000')
mib, secs = int(sys.argv[1]), int(sys.argv[2])
end = time.monotonic() + secs
bufs = []
passes = 0
for i in range(mib):
    bufs.append(bytearray(b'\\x5a') * (1 << 20))
    if time.monotonic() > end:
        break
while time.monotonic() < end:
    passes += 1
    for b in bufs:
        b[0::4096] = bytes([passes & 0xff]) * 256
        if time.monotonic() > end:
            break
print(len(bufs), 'MiB', passes, 'passes')
";

/// How long the hog runs, in seconds (`BLKSNAP_PRESSURE_SECONDS`
/// overrides it; `make soak`: 10 minutes).
fn seconds() -> u64 {
    dev::env_u64(
        "BLKSNAP_PRESSURE_SECONDS",
        if dev::soak() { 600 } else { 60 },
    )
    .max(10)
}

/// Swap in use, in KiB, from /proc/meminfo.
fn swap_used_kib() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    let field = |key: &str| -> Result<u64, String> {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
            .ok_or_else(|| format!("/proc/meminfo has no {key}"))
    };
    Ok(field("SwapTotal:")? - field("SwapFree:")?)
}

/// Memory available without swapping, in KiB.
fn available_kib() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("MemAvailable:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| "/proc/meminfo has no MemAvailable".to_string())
}

/// Waits for a child until `deadline`; kills it and fails after that.
/// `oom_ok`: the child may end killed by SIGKILL, the OOM killer's signal
/// (the hog offers itself as its first victim once memory and swap are
/// full).
fn wait_until(
    child: &mut Child,
    what: &str,
    deadline: Instant,
    oom_ok: bool,
) -> Result<String, String> {
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let mut out = String::new();
            use std::io::Read;
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(mut o) = child.stderr.take() {
                let _ = o.read_to_string(&mut out);
            }
            if oom_ok && status.signal() == Some(nix::libc::SIGKILL) {
                return Ok("killed by the OOM killer once memory and swap were full".into());
            }
            if !status.success() {
                fail!("{what} failed ({status}): {}", out.trim());
            }
            return Ok(out);
        }
        if Instant::now() > deadline {
            // The blocked tasks' stacks go to the kernel log: a hang shows
            // where it waits.
            let _ = std::fs::write("/proc/sysrq-trigger", "w");
            std::thread::sleep(Duration::from_secs(2));
            let _ = child.kill();
            let _ = child.wait();
            fail!("{what} did not finish in time (hung?)");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks `count` sectors of `dev` from `start` against pattern `seed`
/// written at sector `pattern_start` onwards.
fn check_range(dev: &Path, start: u64, count: u64, pattern_start: u64, seed: u64) -> TestResult {
    let f = dev::open_direct(dev, false)?;
    let step = 2048u64;
    let mut s = 0;
    while s < count {
        let n = step.min(count - s);
        let mut buf = dev::AlignedBuf::new((n * SECTOR) as usize, 0);
        f.read_exact_at(buf.as_mut_slice(), (start + s) * SECTOR)
            .map_err(|e| format!("read at sector {} of {}: {e}", start + s, dev.display()))?;
        let mut want = vec![0u8; (n * SECTOR) as usize];
        pattern(&mut want, pattern_start + s, seed);
        if buf.as_slice() != want.as_slice() {
            fail!(
                "{}: sectors {}..{} differ from the data of the take",
                dev.display(),
                start + s,
                start + s + n
            );
        }
        s += n;
    }
    Ok(())
}

fn swap_pressure() -> TestResult {
    let b = disk("blksnap-b")?;
    let p1 = dev::partition(&b, 1);
    let p2 = dev::partition(&b, 2);
    let e_disk = disk("blksnap-e")?;
    let store = dev::scratch().join("pressure-store");
    std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
    dev::run("mkfs.ext4", &["-q", "-F", e_disk.to_str().unwrap()])?;
    dev::run(
        "mount",
        &[e_disk.to_str().unwrap(), store.to_str().unwrap()],
    )?;
    let p1_start: u64 = dev::sysfs_attr(&p1, "start")?
        .parse()
        .map_err(|e| format!("start of {}: {e}", p1.display()))?;
    let p1_sectors = dev::size_sectors(&p1)?;
    let mut swapping = false;
    let r = (|| {
        // The data of the take on partition 1; swap on partition 2.
        write_pattern(&p1, 0, p1_sectors, 0x5eed)?;
        dev::run("mkswap", &["-q", p2.to_str().unwrap()])?;
        dev::run("swapon", &[p2.to_str().unwrap()])?;
        swapping = true;
        let t = Tracked::new(&b)?;
        let s = Snap::create(&store, 300 << 11)?;
        s.add(&t.0)?;
        s.take()?;
        let image = t.image()?;
        // Our own process must survive the OOM killer; the hog is its
        // preferred victim.
        std::fs::write("/proc/self/oom_score_adj", "-1000").map_err(|e| e.to_string())?;
        let secs = seconds();
        // The hogs take what is available and 96 MiB more, out of the
        // 223 MiB of swap: reclaim must swap, and the OOM killer stays away
        // from the guest's own processes.
        let hog_kib = available_kib()? + (96 << 10);
        // The most swap in use while the hogs run.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut max = 0;
                let start = Instant::now();
                let mut next = 10;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let used = swap_used_kib().unwrap_or(0);
                    max = max.max(used);
                    if start.elapsed().as_secs() >= next {
                        next += 10;
                        println!(
                            "    {:>3} s: {} MiB of swap in use, {} MiB available",
                            start.elapsed().as_secs(),
                            used / 1024,
                            available_kib().unwrap_or(0) / 1024
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                max
            })
        };
        // The hog: a process that fills `hog_kib` with data page by page,
        // then writes every page once more (bringing swapped pages back
        // in and pushing others out), `passes` times, then exits. A fixed
        // amount of work, unlike a timed hog that a thrashing TCG guest
        // may never stop. It offers itself to the OOM killer first.
        let mut hogs = Command::new("python3")
            .args(["-c", HOG, &(hog_kib / 1024).to_string(), &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("python3: {e}"))?;
        let mut fio = Command::new("fio")
            .args([
                "--name=pressure",
                &format!("--filename={}", p1.display()),
                "--rw=randwrite",
                "--bs=4k",
                "--direct=1",
                "--ioengine=libaio",
                "--iodepth=16",
                "--size=4M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--randrepeat=0",
                "--output-format=terse",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("fio: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(secs + 180);
        let fio_out = wait_until(&mut fio, "fio with verification", deadline, false);
        let hogs_out = wait_until(&mut hogs, "the memory hog", deadline, true);
        std::fs::write("/proc/self/oom_score_adj", "0").map_err(|e| e.to_string())?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let used = sampler.join().unwrap_or(0);
        fio_out?;
        let hogs_out = hogs_out?;
        println!(
            "    {secs} s of a hog of {} MiB ({}): up to {} MiB swapped out to {}, fio verified its writes",
            hog_kib / 1024,
            hogs_out.trim(),
            used / 1024,
            p2.display()
        );
        if used == 0 {
            fail!("nothing was swapped out: the test put no pressure on the snapshotted disk");
        }
        dev::run("swapoff", &[p2.to_str().unwrap()])?;
        swapping = false;
        let info = t.0.snapshot_info().map_err(e)?;
        match -info.error_code {
            0 => {
                // The image of partition 1 still holds the pattern of the
                // take.
                check_range(&image, p1_start, p1_sectors, 0, 0x5eed)?;
                println!("    the snapshot kept up; its image holds the data of the take");
            }
            err if err == Errno::ETIMEDOUT as i32 => {
                // The store (a file on ext4) got stuck in reclaim that
                // waited for the held swap writes: the watchdog let them go
                // and marked the snapshot, with its event.
                let (major, minor) = dev::major_minor(&b)?;
                let want = Event::Corrupted {
                    major,
                    minor,
                    errno: err,
                };
                let mut evs = Vec::new();
                while let Ok(Some(ev)) = s.ctl.snapshot_wait_event(&s.id, 0) {
                    evs.push(ev);
                }
                if !evs.contains(&want) {
                    fail!("snapshot error ETIMEDOUT without its corrupted event: {evs:?}");
                }
                println!("    the store got stuck: the snapshot gave way (ETIMEDOUT, event sent)");
            }
            err => fail!(
                "snapshot error after the pressure: {:?}",
                Errno::from_raw(err)
            ),
        }
        s.destroy()
    })();
    if swapping {
        let _ = dev::run("swapoff", &[p2.to_str().unwrap()]);
    }
    let um = dev::run("umount", &[store.to_str().unwrap()]);
    r?;
    um.map(|_| ())
}
