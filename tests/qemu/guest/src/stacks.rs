// SPDX-License-Identifier: GPL-2.0

//! Storage stacks: snapshots, CBT and backup chains of the layers of an
//! LVM logical volume, a LUKS2 (dm-crypt) device and an md RAID1 array,
//! and of the disks under them, alone and together in one snapshot; an LVM
//! snapshot of a tracked LV, `lvconvert --merge` of one, and `pvmove`
//! under tracking. The disks are loop devices over 8 MiB files on the
//! scratch tmpfs (small and fast under TCG), torn down after each test;
//! each test builds one stack and takes it through everything it covers.
//!
//! The guest runs udevd with the host's rules (LVM, md and dm rules
//! included): the images of a PV, a LUKS disk or an md member appear to it
//! like any disk. The tools run with `DM_DISABLE_UDEV=1` (libdevmapper makes
//! its nodes itself, nobody waits for udev) and LVM with a configuration of
//! the test's own (`LVM_SYSTEM_DIR`: no metadata backups on the read-only
//! host root, no lvmpolld, no dmeventd).
//!
//! Every stack is checked the same way ([`check_stack`]), each layer
//! tracked: a full backup of all layers in one snapshot equals the devices;
//! in a snapshot of all layers, writes through the top leave every image as
//! the device was, and the CBT of every layer marks exactly the blocks the
//! writes reach on it; snapshots under a writer to the top (all layers,
//! added bottom first, and the lowest layer alone) take at once and hold
//! one cut of the stack; an incremental backup of all layers
//! (by the CBT) restores, through its chain, to each device. Devices are
//! read with direct I/O: the page cache of a device under a stack is not
//! updated by the writes that reach it through the layers above.

use crate::dev::{self, AlignedBuf, LoopDev, SECTOR};
use crate::points::{restore_check, run, track};
use crate::snap::{check_device, e, image_of, write_pattern, Snap};
use crate::{check_eq, fail, TestResult};
use blksnap::MapKind;
use blksnap::Tracker;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The storage stack tests, in the order they run.
pub const ALL: &[Test] = &[
    ("stacks_lvm_lv_pv_snapshot_merge_pvmove", lvm_stack),
    ("stacks_luks2_crypt_device_and_its_disk", luks_stack),
    ("stacks_md_raid1_array_members_recovery", md_stack),
    (
        "stacks_takes_under_queued_writes_through_dm_crypt",
        crypt_queued_takes,
    ),
];

/// The size of the loop disks under the stacks.
const DISK_MIB: u64 = 8;

const VG: &str = "bsvg";
const CRYPT: &str = "bscrypt";
const MD: &str = "/dev/md100";

/// The directory of the tests' LVM configuration, made on first use; with
/// `filtered`, one whose `global_filter` hides the snapshot images from
/// LVM, as README advises.
fn lvm_dir(filtered: bool) -> Result<PathBuf, String> {
    let dir = dev::scratch().join(if filtered {
        "stacks-lvm-filtered"
    } else {
        "stacks-lvm"
    });
    let conf = dir.join("lvm.conf");
    if !conf.exists() {
        std::fs::create_dir_all(&dir).map_err(|err| err.to_string())?;
        let filter = if filtered {
            "\tglobal_filter = [ \"r|^/dev/blk-snap-image|\" ]\n"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "devices {{\n\tuse_devicesfile = 0\n\tobtain_device_list_from_udev = 0\n\texternal_device_info_source = \"none\"\n{filter}}}\n\
                 activation {{\n\tudev_sync = 0\n\tudev_rules = 0\n\tmonitoring = 0\n}}\n\
                 global {{\n\tuse_lvmpolld = 0\n}}\n\
                 backup {{\n\tbackup = 0\n\tarchive = 0\n}}\n"
            ),
        )
        .map_err(|err| err.to_string())?;
    }
    Ok(dir)
}

/// Runs a storage tool (lvm, cryptsetup, mdadm, dmsetup, wipefs) in the
/// tests' environment, printing it; its stdout, or a failure with its
/// output.
fn tool(cmd: &str, args: &[&str]) -> Result<String, String> {
    tool_with(false, cmd, args)
}

/// [`tool`]; LVM with the `global_filter` that hides the images if
/// `filtered`. The tools' "WARNING:" is printed as "Warning:": the harness
/// fails a run whose console shows the kernel's.
fn tool_with(filtered: bool, cmd: &str, args: &[&str]) -> Result<String, String> {
    println!("    $ {cmd} {}", args.join(" "));
    let start = Instant::now();
    let out = Command::new(cmd)
        .args(args)
        .env("LVM_SYSTEM_DIR", lvm_dir(filtered)?)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .env("DM_DISABLE_UDEV", "1")
        .env("MDADM_NO_UDEV", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("{cmd}: {err}"))?;
    let tame = |b: &[u8]| String::from_utf8_lossy(b).replace("WARNING:", "Warning:");
    let (stdout, stderr) = (tame(&out.stdout), tame(&out.stderr));
    if !out.status.success() {
        return Err(format!(
            "{cmd} {} ({}): {}{}",
            args.join(" "),
            out.status,
            stdout.trim(),
            stderr.trim()
        ));
    }
    for l in stderr.lines().filter(|l| !l.trim().is_empty()).take(6) {
        println!("      {l}");
    }
    if start.elapsed() > Duration::from_secs(2) {
        println!("      [{:.1} s]", start.elapsed().as_secs_f64());
    }
    Ok(stdout)
}

/// Commands that tear a stack down, run in reverse order when dropped,
/// each tried until it succeeds (udev's probes hold new devices open for a
/// moment) for up to 10 s.
struct Undo(Vec<(String, Vec<String>)>);

impl Undo {
    fn new() -> Self {
        Self(Vec::new())
    }

    fn push(&mut self, cmd: &str, args: &[&str]) {
        self.0.push((
            cmd.to_string(),
            args.iter().map(|a| a.to_string()).collect(),
        ));
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some((cmd, args)) = self.0.pop() {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let start = Instant::now();
            loop {
                match tool(&cmd, &args) {
                    Ok(_) => break,
                    Err(err) if start.elapsed() > Duration::from_secs(10) => {
                        println!("    teardown failed: {err}");
                        break;
                    }
                    Err(_) => {
                        dev::udev_settle();
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
            }
        }
    }
}

/// A loop device over a file of `mib` MiB on the scratch tmpfs, for the
/// disks under the stacks: small and fast under TCG. Declared before the
/// stack's [`Undo`], so that it goes after the stack.
fn loop_disk(name: &str, mib: u64) -> Result<LoopDev, String> {
    LoopDev::new(&format!("stacks-{name}"), mib << 20)
}

/// `/dev/NAME` of the kernel's name for the device node `path` (a
/// device-mapper node is `/dev/mapper/NAME`; the kernel's is `dm-N`).
fn kernel_node(path: &Path) -> Result<PathBuf, String> {
    let rdev = std::fs::metadata(path)
        .map_err(|err| format!("{}: {err}", path.display()))?
        .rdev();
    let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/uevent"))
        .map_err(|err| format!("{}: {err}", path.display()))?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|n| Path::new("/dev").join(n))
        .ok_or_else(|| format!("{}: no DEVNAME in its uevent", path.display()))
}

/// `major:minor` of a device node.
fn devno(path: &Path) -> Result<String, String> {
    let rdev = std::fs::metadata(path)
        .map_err(|err| format!("{}: {err}", path.display()))?
        .rdev();
    Ok(format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ))
}

/// The sector of `lower` where the one-target table of device-mapper
/// device `name` maps its sector 0 (linear, crypt: the number after the
/// device in the table line).
fn dm_offset(name: &str, lower: &Path) -> Result<u64, String> {
    let table = tool("dmsetup", &["table", name])?;
    let want = devno(lower)?;
    let lines: Vec<&str> = table.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != 1 {
        fail!("{name}: a table of one target expected: {table}");
    }
    let f: Vec<&str> = lines[0].split_whitespace().collect();
    let at = f.iter().position(|x| *x == want).ok_or_else(|| {
        format!(
            "{name}: {} ({want}) not in its table {table}",
            lower.display()
        )
    })?;
    f.get(at + 1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{name}: no offset after {want} in {table}"))
}

/// SHA-256 of `len` bytes of a device from `off`, read with direct I/O:
/// the page cache of a device under a stack is not updated by the writes
/// that reach it through the layers above, and would show old data.
fn sha_range(path: &Path, off: u64, len: u64) -> Result<String, String> {
    let f = dev::open_direct(path, false)?;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|err| err.to_string())?;
    {
        let mut stdin = child.stdin.take().unwrap();
        let mut buf = AlignedBuf::new(1 << 20, 0);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 20) as usize;
            let b = &mut buf.as_mut_slice()[..n];
            f.read_exact_at(b, off + done)
                .map_err(|err| format!("{}: read at {}: {err}", path.display(), off + done))?;
            stdin.write_all(b).map_err(|err| err.to_string())?;
            done += n as u64;
        }
    }
    let o = child.wait_with_output().map_err(|err| err.to_string())?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

/// SHA-256 of a whole device, read with direct I/O (see [`sha_range`]).
fn sha_dev(path: &Path) -> Result<String, String> {
    sha_range(path, 0, dev::size_sectors(&kernel_node(path)?)? * SECTOR)
}

/// The first 8 bytes of a device (the writer's counter), read directly.
fn counter(dev: &Path, sector: u64) -> Result<u64, String> {
    let data = dev::read_direct(dev, sector, 8)?;
    Ok(u64::from_le_bytes(data[..8].try_into().unwrap()))
}

/// The CBT blocks of `bs` bytes that sectors `offset + s .. + n` of each
/// range `(s, n)` fall in.
fn blocks_of(ranges: &[(u64, u64)], offset: u64, bs: u64) -> BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|&(s, n)| {
            let first = (offset + s) * SECTOR / bs;
            let last = ((offset + s + n) * SECTOR - 1) / bs;
            first..=last
        })
        .collect()
}

/// The blocks of the active CBT map changed after snapshot `number`.
fn marked_after(t: &blksnap::Tracker, number: u8) -> Result<BTreeSet<u64>, String> {
    let map = t.read_cbt_map(MapKind::Active).map_err(e)?;
    Ok(map
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > number)
        .map(|(i, _)| i as u64)
        .collect())
}

/// A point made by [`backup_all`], as the report and its manifest say.
struct Point {
    point: u64,
    method: String,
    read: u64,
    /// The manifest's SHA-256 of the point's content (a full point has it).
    sha: String,
}

/// `blksnapctl backup KIND` of all `devs` in one snapshot, into `dir`; each
/// device's point, in the order of `devs`, and what the command wrote to
/// stderr.
fn backup_all(kind: &str, devs: &[&Path], dir: &Path) -> Result<(Vec<Point>, String), String> {
    let store = dev::scratch();
    let mut args = vec!["--json", "backup", kind];
    args.extend(devs.iter().map(|d| d.to_str().unwrap()));
    args.extend([
        "--store",
        store.to_str().unwrap(),
        "--limit",
        "256M",
        "--to",
        dir.to_str().unwrap(),
    ]);
    let out = run("blksnapctl", &args);
    if out.code != 0 {
        fail!(
            "blksnapctl {} exited {}: {}",
            args.join(" "),
            out.code,
            out.stderr.trim()
        );
    }
    let v: Value = serde_json::from_str(&out.stdout)
        .map_err(|err| format!("blksnapctl {}: not JSON ({err})", args.join(" ")))?;
    let outs = v["devices"]
        .as_array()
        .ok_or_else(|| format!("no devices in {v}"))?;
    check_eq!(
        outs.len(),
        devs.len(),
        "devices in the report of backup {kind}"
    );
    let points = devs
        .iter()
        .map(|d| {
            let o = outs
                .iter()
                .find(|o| o["device"].as_str() == d.to_str())
                .ok_or_else(|| format!("{} not in {v}", d.display()))?;
            let manifest = PathBuf::from(o["manifest"].as_str().unwrap_or_default());
            let m: Value = serde_json::from_str(
                &std::fs::read_to_string(&manifest)
                    .map_err(|err| format!("{}: {err}", manifest.display()))?,
            )
            .map_err(|err| format!("{}: {err}", manifest.display()))?;
            check_eq!(
                m["status"].as_str(),
                Some("complete"),
                "status of {}",
                manifest.display()
            );
            Ok(Point {
                point: o["point"]
                    .as_u64()
                    .ok_or_else(|| format!("no point in {o}"))?,
                method: o["method"].as_str().unwrap_or_default().to_string(),
                read: o["copied"]["read"].as_u64().unwrap_or(u64::MAX),
                sha: m["sha256"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((points, out.stderr))
}

/// An incremental backup of one device; the point, restored through its
/// chain, must equal `sha`, the device's SHA-256 before the backup (not
/// restored if `None`: a later point's restore reads it). Returns the
/// point and the command's stderr.
fn incremental(dev: &Path, dir: &Path, sha: Option<&str>) -> Result<(Point, String), String> {
    let (mut points, stderr) = backup_all("incremental", &[dev], dir)?;
    let p = points.remove(0);
    let Some(sha) = sha else {
        return Ok((p, stderr));
    };
    let size = dev::size_sectors(dev)? * SECTOR;
    let target = dev::scratch().join("stacks-restore.raw");
    let r = restore_check(
        dir,
        dev.to_str().unwrap(),
        p.point,
        &target,
        size,
        sha,
        None,
    );
    let _ = std::fs::remove_file(&target);
    r?;
    Ok((p, stderr))
}

/// Point `p` of `dev` went by `method`.
fn check_method(p: &Point, dev: &Path, method: &str) -> TestResult {
    check_eq!(
        p.method.as_str(),
        method,
        "how point {} of {} found the changes",
        p.point,
        dev.display()
    );
    Ok(())
}

/// A check of the images of a stack's layers (see [`Stack::same`]).
type Same<'a> = dyn Fn(&[PathBuf]) -> TestResult + 'a;

/// A stack under test: its layers, the top first, each with the sector
/// where the top's sector 0 lies on it (0 for the top).
struct Stack<'a> {
    name: &'a str,
    layers: Vec<(&'a Path, u64)>,
    /// Waits until nothing but the test writes to the layers (md rewrites
    /// its members' superblocks after a write).
    settle: &'a dyn Fn() -> TestResult,
    /// Whether a lower layer's CBT may mark blocks outside the top's data
    /// on it (md's superblock).
    marks_outside: bool,
    /// Whether the lower layers hold the top's data as it is (not dm-crypt's
    /// ciphertext).
    clear: bool,
    /// Checks that images of all layers, taken in one snapshot (the top's
    /// first), hold the same data; by default each lower image holds the
    /// top's image at the top's offset.
    same: Option<&'a Same<'a>>,
}

/// The default [`Stack::same`]: each lower image holds the top's image at
/// the top's offset on it, the writer's counter included.
fn same_data(layers: &[(&Path, u64)], images: &[PathBuf]) -> TestResult {
    let bytes = dev::size_sectors(layers[0].0)? * SECTOR;
    let top = sha_dev(&images[0])?;
    let c = counter(&images[0], 0)?;
    for (img, &(d, off)) in images.iter().zip(layers).skip(1) {
        check_eq!(
            counter(img, off)?,
            c,
            "the writer's counter in the image of {} and in the top's",
            d.display()
        );
        check_eq!(
            sha_range(img, off * SECTOR, bytes)?,
            top,
            "the top's data in the image of {} against the top's image",
            d.display()
        );
    }
    Ok(())
}

/// Checks a stack (see the module's comment), its layers tracked by
/// `trackers` (in the order of the layers), its points made in `dir`;
/// `seed` names its patterns.
fn check_stack(s: &Stack, trackers: &[&Tracker], seed: u64, dir: &Path) -> TestResult {
    let name = s.name;
    let devs: Vec<&Path> = s.layers.iter().map(|l| l.0).collect();
    let top = devs[0];
    let top_sectors = dev::size_sectors(top)?;
    let numbers = || -> Result<Vec<u8>, String> {
        trackers
            .iter()
            .map(|t| Ok(t.cbt_info().map_err(e)?.changes_number))
            .collect()
    };
    write_pattern(top, 0, top_sectors, seed)?;
    (s.settle)()?;
    let before = devs
        .iter()
        .map(|d| sha_dev(d))
        .collect::<Result<Vec<_>, _>>()?;

    // 1. A full backup of all layers in one snapshot.
    let (full, _) = backup_all("full", &devs, dir)?;
    for ((p, b), d) in full.iter().zip(&before).zip(&devs) {
        check_eq!(
            p.sha,
            *b,
            "{name}: the full point of {} against the device",
            d.display()
        );
    }
    let at_full = numbers()?;

    // 2. Writes through the top while all layers are in one snapshot.
    let snap = Snap::create(&dev::scratch(), 16 << 11)?;
    for t in trackers {
        snap.add(t)?;
    }
    snap.take()?;
    let images = trackers
        .iter()
        .map(|t| image_of(t))
        .collect::<Result<Vec<_>, _>>()?;
    let at_snap = numbers()?;
    // 4 KiB aligned (a dm-crypt device may have 4 KiB sectors): at the
    // start, in the middle, at the end of the top.
    let writes = [(8, 8), ((top_sectors / 3) & !7, 64), (top_sectors - 16, 16)];
    for &(st, n) in &writes {
        write_pattern(top, st, n, seed + 1)?;
    }
    (s.settle)()?;
    for (i, ((d, offset), t)) in s.layers.iter().zip(trackers).enumerate() {
        check_eq!(
            sha_dev(&images[i])?,
            before[i],
            "{name}: the image of {} after writes through {}",
            d.display(),
            top.display()
        );
        let bs = u64::from(t.cbt_info().map_err(e)?.block_size);
        let marked = marked_after(t, at_snap[i])?;
        let want = blocks_of(&writes, *offset, bs);
        let data = blocks_of(&[(0, top_sectors)], *offset, bs);
        let missing: Vec<_> = want.difference(&marked).collect();
        let wrong: Vec<_> = marked
            .iter()
            .filter(|b| data.contains(b) && !want.contains(b))
            .collect();
        let outside: Vec<_> = marked.iter().filter(|b| !data.contains(b)).collect();
        println!(
            "    {name}: CBT of {} ({} KiB blocks): {} blocks marked, {} for the writes, {} outside the top's data ({outside:?})",
            d.display(),
            bs >> 10,
            marked.len(),
            want.len(),
            outside.len(),
        );
        if !missing.is_empty() || !wrong.is_empty() {
            fail!(
                "{name}: CBT of {}: blocks written but not marked {missing:?}, marked but not written {wrong:?}",
                d.display()
            );
        }
        if (i == 0 || !s.marks_outside) && !outside.is_empty() {
            fail!(
                "{name}: CBT of {}: marks outside the top's data: {outside:?}",
                d.display()
            );
        }
    }
    snap.destroy()?;

    // 3. Snapshots under a writer to the top: all layers, added bottom
    // first (the take holds and drains the stack from the top down,
    // whatever the order), then the lowest layer alone: its image is the
    // device but for the writer's 4 KiB.
    let n = devs.len();
    let rounds: [Vec<usize>; 2] = [(0..n).rev().collect(), vec![n - 1]];
    let rest =
        |p: &Path, offset: u64| sha_range(p, offset * SECTOR + 4096, top_sectors * SECTOR - 4096);
    let (lowest, lowest_off) = s.layers[n - 1];
    let lowest_rest = rest(lowest, lowest_off)?;
    let writer = Writer::start(top);
    let r = (|| -> TestResult {
        for (round, order) in rounds.iter().enumerate() {
            writer.advance(20)?;
            let snap = Snap::create(&dev::scratch(), 16 << 11)?;
            for &i in order {
                snap.add(trackers[i])?;
            }
            let start = Instant::now();
            snap.take()?;
            let took = start.elapsed();
            if took > Duration::from_secs(10) {
                fail!(
                    "{name}: round {round}: the take of {} stacked devices under a writer took {:.1} s",
                    order.len(),
                    took.as_secs_f64()
                );
            }
            let mut idx = order.clone();
            idx.sort();
            let images = idx
                .iter()
                .map(|&i| image_of(trackers[i]))
                .collect::<Result<Vec<_>, _>>()?;
            // The writer's counter, where the image holds it in clear.
            let c = if idx[0] == 0 || s.clear {
                counter(&images[0], s.layers[idx[0]].1)?
            } else {
                u64::MAX
            };
            println!(
                "    round {round}: take of {} device(s) {:.0} ms, the image of {} at write {}",
                idx.len(),
                took.as_secs_f64() * 1000.0,
                devs[idx[0]].display(),
                if c == u64::MAX {
                    "(ciphertext)".to_string()
                } else {
                    c.to_string()
                }
            );
            if c == 0 {
                fail!("{name}: round {round}: the image holds no write of the writer");
            }
            if idx.len() == n {
                match s.same {
                    Some(same) => same(&images)?,
                    None => same_data(&s.layers, &images)?,
                }
            } else {
                check_eq!(
                    rest(&images[0], lowest_off)?,
                    lowest_rest,
                    "{name}: round {round}: the image of {} alone, but for the writer's 4 KiB, against the device",
                    lowest.display()
                );
            }
            snap.destroy()?;
        }
        Ok(())
    })();
    let count = writer.stop()?;
    r?;
    println!("    {count} writes in all");
    (s.settle)()?;

    // 4. An incremental backup of all layers in one snapshot, by the CBT;
    // each restored through its chain equals its device.
    let after = devs
        .iter()
        .map(|d| sha_dev(d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut marked_bytes = Vec::new();
    for (t, &number) in trackers.iter().zip(&at_full) {
        let bs = u64::from(t.cbt_info().map_err(e)?.block_size);
        marked_bytes.push(marked_after(t, number)?.len() as u64 * bs);
    }
    let (inc, _) = backup_all("incremental", &devs, dir)?;
    let target = dev::scratch().join(format!("stacks-{name}.raw"));
    for (((p, d), sha), marked) in inc.iter().zip(&devs).zip(&after).zip(&marked_bytes) {
        if p.method != "cbt" || p.read == 0 || p.read > *marked {
            fail!(
                "{name}: the incremental of {}: method {}, read {} bytes; the CBT marked {marked}",
                d.display(),
                p.method,
                p.read
            );
        }
        let size = dev::size_sectors(d)? * SECTOR;
        restore_check(dir, d.to_str().unwrap(), p.point, &target, size, sha, None)?;
        let _ = std::fs::remove_file(&target);
    }
    Ok(())
}

/// A writer that writes an increasing counter into the first 4 KiB of a
/// device, with direct I/O, one write after the other.
struct Writer {
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<TestResult>,
}

impl Writer {
    fn start(dev: &Path) -> Self {
        let (stop, seq) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let handle = {
            let (stop, seq, dev) = (stop.clone(), seq.clone(), dev.to_path_buf());
            std::thread::spawn(move || -> TestResult {
                let f = dev::open_direct(&dev, true)?;
                let mut buf = AlignedBuf::new(4096, 0);
                let mut n = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    buf.as_mut_slice()[..8].copy_from_slice(&n.to_le_bytes());
                    f.write_all_at(buf.as_slice(), 0)
                        .map_err(|err| format!("writer: {err}"))?;
                    seq.store(n, Ordering::Relaxed);
                    n += 1;
                }
                Ok(())
            })
        };
        Self { stop, seq, handle }
    }

    /// Waits until the writer made `n` more writes (at most 30 s).
    fn advance(&self, n: u64) -> TestResult {
        let from = self.seq.load(Ordering::Relaxed);
        let start = Instant::now();
        while self.seq.load(Ordering::Relaxed) < from + n {
            if start.elapsed() > Duration::from_secs(30) || self.handle.is_finished() {
                fail!("the writer is stuck at write {from}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn stop(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| "writer panicked".to_string())??;
        Ok(self.seq.load(Ordering::Relaxed))
    }
}

// ---------------------------------------------------------------- LVM

/// A volume group `bsvg` on `pvs` with a linear LV `lv` of `mib` MiB on the
/// first one; removed by `undo`. Returns the LV's kernel node (`dm-N`).
fn lvm(pvs: &[&Path], mib: u64, undo: &mut Undo) -> Result<PathBuf, String> {
    let names: Vec<&str> = pvs.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec!["pvcreate", "-y", "-ff"];
    args.extend(&names);
    tool("lvm", &args)?;
    let mut args = vec!["pvremove", "-y", "-ff"];
    args.extend(&names);
    undo.push("lvm", &args);
    let mut args = vec!["vgcreate", "-s", "1M", VG];
    args.extend(&names);
    tool("lvm", &args)?;
    undo.push("lvm", &["vgremove", "-y", "-ff", VG]);
    let size = format!("{mib}M");
    tool(
        "lvm",
        &[
            "lvcreate", "-y", "-Wn", "-Zn", "-L", &size, "-n", "lv", VG, names[0],
        ],
    )?;
    kernel_node(Path::new(&format!("/dev/mapper/{VG}-lv")))
}

/// A tracker of `dev` (attached afresh), which stays attached when dropped:
/// nothing keeps an LV open that LVM must merge into.
fn attach(dev: &Path) -> Result<Tracker, String> {
    let t = Tracker::open(dev).map_err(e)?;
    let _ = t.detach();
    t.attach().map_err(e)?;
    Ok(t)
}

/// An LV in a VG of two PVs (`c`, where the LV is, and `d`), through
/// everything LVM does to it, the LV tracked all along:
///
/// 1. the LV and its PV `c`, each tracked (see [`check_stack`]);
/// 2. ours taken while an LVM (dm-snapshot) snapshot of the LV exists:
///    writes through the LV leave both snapshots as they were, the CBT
///    marks exactly them, and its generation stays;
/// 3. `lvconvert --merge` of that LVM snapshot: the LV's content goes back
///    to the snapshot's, written by dm-snapshot's merge under the LV, not
///    through it: the LV's CBT sees nothing. The point made after it must
///    restore to the LV (an incremental by the CBT would miss the merge):
///    the incrementals while the LV is an origin and right after go by
///    digests, saying why;
/// 4. `pvmove` of the LV from `c` to `d` while our snapshot of the LV and
///    of `c` exists: LVM, seeing the PV's image as a duplicate PV, refuses;
///    with the `global_filter` that README advises, the move goes on under
///    a writer to the LV: the LV's image and CBT stay right across the
///    mirror LVM builds under it; the destination's CBT marks the copied
///    extents; the source's image is the source before the move; the next
///    incremental of the LV goes by the CBT again.
fn lvm_stack() -> TestResult {
    let lc = loop_disk("c", DISK_MIB)?;
    let ld = loop_disk("d", DISK_MIB)?;
    let mut undo = Undo::new();
    let (c, d) = (lc.path.clone(), ld.path.clone());
    let lv = lvm(&[&c, &d], 4, &mut undo)?;
    let offset = dm_offset(&format!("{VG}-lv"), &c)?;
    let dir = dev::scratch().join("stacks-lvm");
    let _ = std::fs::remove_dir_all(&dir);
    let r = (|| -> TestResult {
        {
            let tl = attach(&lv)?;
            let tc = track(&c)?;
            check_stack(
                &Stack {
                    name: "lvm",
                    layers: vec![(&lv, 0), (&c, offset)],
                    settle: &|| Ok(()),
                    marks_outside: false,
                    clear: true,
                    same: None,
                },
                &[&tl, &tc.0],
                101,
                &dir,
            )?;
        }
        lvm_snapshot_merge(&lv, &dir)?;
        lvm_pvmove(&lv, &c, &d, &dir)
    })();
    if let Ok(t) = Tracker::open(&lv) {
        let _ = t.detach();
    }
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Steps 2 and 3 of [`lvm_stack`].
fn lvm_snapshot_merge(lv: &Path, dir: &Path) -> TestResult {
    let sectors = dev::size_sectors(lv)?;
    let s1 = || kernel_node(Path::new(&format!("/dev/mapper/{VG}-s1")));
    write_pattern(lv, 0, sectors, 141)?;
    let writes = [(0u64, 8u64), (sectors / 2, 128)];
    let new = |s: u64| {
        if writes.iter().any(|&(w, n)| s >= w && s < w + n) {
            142
        } else {
            141
        }
    };
    {
        let t = Tracker::open(lv).map_err(e)?;
        let generation = t.cbt_info().map_err(e)?.generation;
        tool(
            "lvm",
            &[
                "lvcreate",
                "-y",
                "-s",
                "-L",
                "4M",
                "-n",
                "s1",
                &format!("{VG}/lv"),
            ],
        )?;
        check_eq!(
            t.cbt_info().map_err(e)?.generation,
            generation,
            "the LV's CBT generation after lvcreate -s"
        );
        let snap = Snap::create(&dev::scratch(), 16 << 11)?;
        snap.add(&t)?;
        snap.take()?;
        let image = image_of(&t)?;
        let number = t.cbt_info().map_err(e)?.changes_number;
        for &(s, n) in &writes {
            write_pattern(lv, s, n, 142)?;
        }
        check_device(&image, |_| 141)?;
        check_device(&s1()?, |_| 141)?;
        check_device(lv, new)?;
        let bs = u64::from(t.cbt_info().map_err(e)?.block_size);
        check_eq!(
            marked_after(&t, number)?,
            blocks_of(&writes, 0, bs),
            "CBT blocks marked after our snapshot"
        );
        snap.destroy()?;
    }
    // A point while the LVM snapshot exists; the merge; a point after it.
    let (p1, why1) = incremental(lv, dir, None)?;
    let number = Tracker::open(lv)
        .map_err(e)?
        .cbt_info()
        .map_err(e)?
        .changes_number;
    tool(
        "lvm",
        &["lvconvert", "-i", "1", "--merge", &format!("{VG}/s1")],
    )?;
    // The LV holds the pattern of before the LVM snapshot again.
    check_device(lv, |_| 141)?;
    let marked = marked_after(&Tracker::open(lv).map_err(e)?, number)?;
    println!(
        "    after the merge: {} CBT blocks marked since point {} (the merge rewrote {} sectors under the LV)",
        marked.len(),
        p1.point,
        writes.iter().map(|w| w.1).sum::<u64>()
    );
    let (p2, why2) = incremental(lv, dir, Some(&sha_dev(lv)?))?;
    // Content first (above: the point after the merge, restored through
    // its chain, equals the LV); then why:
    // the digests, for the reason of the LVM snapshot.
    for (p, why, want) in [
        (&p1, &why1, "is the origin of an LVM snapshot"),
        (&p2, &why2, "was the origin of an LVM snapshot"),
    ] {
        check_method(p, lv, "digest")?;
        if !why.contains(want) {
            fail!("point {}: no `{want}` in {why:?}", p.point);
        }
    }
    Ok(())
}

/// Step 4 of [`lvm_stack`].
fn lvm_pvmove(lv: &Path, c: &Path, d: &Path, dir: &Path) -> TestResult {
    let sectors = dev::size_sectors(lv)?;
    let name = format!("{VG}-lv");
    let offset_c = dm_offset(&name, c)?;
    let (tc, td) = (track(c)?, track(d)?);
    let tl = Tracker::open(lv).map_err(e)?;
    let c_before = sha_dev(c)?;
    let snap = Snap::create(&dev::scratch(), 32 << 11)?;
    snap.add(&tl)?;
    snap.add(&tc.0)?;
    snap.take()?;
    let (img_lv, img_c) = (image_of(&tl)?, tc.image()?);
    let n_lv = tl.cbt_info().map_err(e)?.changes_number;
    let n_d = td.0.cbt_info().map_err(e)?.changes_number;
    // LVM sees the PV's image as a second PV with the same UUID, and
    // refuses to change the VG; with a filter that hides the images, the
    // move goes on.
    let (cs, ds) = (c.to_str().unwrap(), d.to_str().unwrap());
    match tool("lvm", &["pvmove", "-i", "1", cs, ds]) {
        Err(err) if err.contains("Cannot update volume group bsvg with duplicate PV devices") => {
            println!(
                "    refused by LVM while the image {} is visible ({}): {}",
                img_c.display(),
                err.split("): ").next().unwrap_or_default(),
                err.lines().last().unwrap_or_default().trim()
            )
        }
        Err(err) => fail!("pvmove with the PV's image visible failed otherwise: {err}"),
        Ok(_) => fail!(
            "pvmove with the PV's image {} visible to LVM went on",
            img_c.display()
        ),
    }
    // A writer to the LV during the move: known sectors, a known seed.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, lv) = (stop.clone(), lv.to_path_buf());
        std::thread::spawn(move || -> Result<Vec<(u64, u64)>, String> {
            let mut done = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let s = ((i * 2056) % (sectors - 8)) & !7;
                write_pattern(&lv, s, 8, 152)?;
                done.push((s, 8));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(done)
        })
    };
    let moved = tool_with(true, "lvm", &["pvmove", "-i", "1", cs, ds]);
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().map_err(|_| "writer panicked".to_string())??;
    moved?;
    println!("    {} writes to the LV during the move", written.len());
    let offset_d = dm_offset(&name, d)?;
    let on = |s: u64| written.iter().any(|&(w, n)| s >= w && s < w + n);
    check_device(lv, |s| if on(s) { 152 } else { 141 })?;
    check_device(&img_lv, |_| 141)?;
    check_eq!(sha_dev(&img_c)?, c_before, "the source PV's image");
    let bs = u64::from(tl.cbt_info().map_err(e)?.block_size);
    let marked = marked_after(&tl, n_lv)?;
    check_eq!(
        marked,
        blocks_of(&written, 0, bs),
        "the LV's CBT after the move"
    );
    let bs_d = u64::from(td.0.cbt_info().map_err(e)?.block_size);
    let marked_d = marked_after(&td.0, n_d)?;
    let extents = blocks_of(&[(0, sectors)], offset_d, bs_d);
    let missing: Vec<_> = extents.difference(&marked_d).collect();
    println!(
        "    destination {}: the LV at sector {offset_d} (it was at {offset_c} on {}); {} CBT blocks marked, {} of the LV's",
        d.display(),
        c.display(),
        marked_d.len(),
        extents.len()
    );
    if !missing.is_empty() {
        fail!("the destination's CBT misses blocks of the copied extents: {missing:?}");
    }
    snap.destroy()?;
    drop((tl, tc, td));
    let (p, _) = incremental(lv, dir, Some(&sha_dev(lv)?))?;
    check_method(&p, lv, "cbt")?;
    if p.read > marked.len() as u64 * bs {
        fail!(
            "point {}: read {} bytes; the CBT marked {} blocks of {bs}",
            p.point,
            p.read,
            marked.len()
        );
    }
    Ok(())
}
// ---------------------------------------------------------------- LUKS

/// The key file of the tests' LUKS devices.
fn key() -> Result<PathBuf, String> {
    let k = dev::scratch().join("stacks.key");
    std::fs::write(&k, b"blksnap storage stacks test key").map_err(|err| err.to_string())?;
    Ok(k)
}

/// A LUKS2 device on `disk` (fast key derivation), opened as `bscrypt`;
/// closed by `undo`. Returns its kernel node and the sector of `disk`
/// where its data starts.
/// Opens the snapshot image of a LUKS disk read-only with `key`, as
/// /dev/mapper/bscryptimg; the `Undo` closes it.
fn open_crypt_image(image: &Path, key: &Path) -> Result<(PathBuf, Undo), String> {
    tool(
        "cryptsetup",
        &[
            "open",
            "--readonly",
            "--disable-locks",
            "--key-file",
            key.to_str().unwrap(),
            image.to_str().unwrap(),
            "bscryptimg",
        ],
    )?;
    let mut u = Undo::new();
    u.push("cryptsetup", &["close", "--disable-locks", "bscryptimg"]);
    Ok((PathBuf::from("/dev/mapper/bscryptimg"), u))
}

fn luks(disk: &Path, undo: &mut Undo) -> Result<(PathBuf, u64), String> {
    let k = key()?;
    let (k, d) = (k.to_str().unwrap(), disk.to_str().unwrap());
    tool(
        "cryptsetup",
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--luks2-metadata-size",
            "16k",
            "--luks2-keyslots-size",
            "1m",
            "--disable-locks",
            "--key-file",
            k,
            d,
        ],
    )?;
    tool(
        "cryptsetup",
        &["open", "--disable-locks", "--key-file", k, d, CRYPT],
    )?;
    undo.push("cryptsetup", &["close", "--disable-locks", CRYPT]);
    let node = kernel_node(Path::new(&format!("/dev/mapper/{CRYPT}")))?;
    Ok((node, dm_offset(CRYPT, disk)?))
}

/// A dm-crypt (LUKS2) device and the disk under it, each tracked (see
/// [`check_stack`]); the disk's image, opened with cryptsetup, is the
/// dm-crypt device's image.
fn luks_stack() -> TestResult {
    let lc = loop_disk("c", DISK_MIB)?;
    let mut undo = Undo::new();
    let c = lc.path.clone();
    let (crypt, offset) = luks(&c, &mut undo)?;
    let k = key()?;
    let same = |images: &[PathBuf]| -> TestResult {
        let (opened, u) = open_crypt_image(&images[1], &k)?;
        let opened = opened.as_path();
        let r = (|| {
            check_eq!(
                counter(opened, 0)?,
                counter(&images[0], 0)?,
                "the writer's counter in the disk's image (decrypted) and in the dm-crypt device's"
            );
            check_eq!(
                sha_dev(opened)?,
                sha_dev(&images[0])?,
                "the disk's image, decrypted, against the dm-crypt device's image"
            );
            Ok(())
        })();
        drop(u);
        r
    };
    let dir = dev::scratch().join("stacks-luks");
    let _ = std::fs::remove_dir_all(&dir);
    let (tx, tc) = (track(&crypt)?, track(&c)?);
    let r = check_stack(
        &Stack {
            name: "luks",
            layers: vec![(&crypt, 0), (&c, offset)],
            settle: &|| Ok(()),
            marks_outside: false,
            clear: false,
            same: Some(&same),
        },
        &[&tx.0, &tc.0],
        201,
        &dir,
    );
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Writers through a device: `threads` threads, each writing 64 KiB of its
/// own pattern at random 64 KiB-aligned offsets with direct I/O, one write
/// after the other: up to `threads` writes in flight. A failed
/// write fails [`Flood::stop`].
struct Flood {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    /// The writers in a write.
    busy: Arc<AtomicU64>,
    handles: Vec<std::thread::JoinHandle<TestResult>>,
}

/// The size of the writes of a [`Flood`].
const FLOOD_BS: u64 = 64 << 10;

impl Flood {
    fn start(dev: &Path, threads: u64) -> Result<Self, String> {
        let slots = dev::size_sectors(&kernel_node(dev)?)? * SECTOR / FLOOD_BS;
        let (stop, done, busy) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let handles = (0..threads)
            .map(|id| {
                let (stop, done, busy) = (stop.clone(), done.clone(), busy.clone());
                let dev = dev.to_path_buf();
                std::thread::spawn(move || -> TestResult {
                    let f = dev::open_direct(&dev, true)?;
                    let mut buf = AlignedBuf::new(FLOOD_BS as usize, id as u8);
                    let mut x =
                        0x9e37_79b9_7f4a_7c15u64 ^ (id + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let at = (x % slots) * FLOOD_BS;
                        buf.as_mut_slice()[..24].copy_from_slice(
                            &[id.to_le_bytes(), n.to_le_bytes(), at.to_le_bytes()].concat(),
                        );
                        busy.fetch_add(1, Ordering::Relaxed);
                        f.write_all_at(buf.as_slice(), at).map_err(|err| {
                            format!("writer {id}: write {n} at {at} of {}: {err}", dev.display())
                        })?;
                        busy.fetch_sub(1, Ordering::Relaxed);
                        n += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        Ok(Self {
            stop,
            done,
            busy,
            handles,
        })
    }

    /// Waits until `n` more writes completed (at most 30 s).
    fn advance(&self, n: u64) -> TestResult {
        let from = self.done.load(Ordering::Relaxed);
        let start = Instant::now();
        while self.done.load(Ordering::Relaxed) < from + n {
            if self.handles.iter().any(|h| h.is_finished()) {
                fail!("a writer stopped after {from} writes in all");
            }
            if start.elapsed() > Duration::from_secs(30) {
                fail!("the writers are stuck at {from} writes in all");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Stops the writers; how many writes they made, or the first failure.
    fn stop(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first = Ok(());
        for h in self.handles {
            let r = h.join().map_err(|_| "a writer panicked".to_string())?;
            if first.is_ok() {
                first = r;
            }
        }
        first?;
        Ok(self.done.load(Ordering::Relaxed))
    }
}

/// How many takes [`crypt_queued_takes`] makes.
const QUEUED_ROUNDS: usize = 12;

/// Takes of a dm-crypt device and its disk in one snapshot while writers
/// keep many writes queued in dm-crypt: 32 threads of 64 KiB direct
/// writes through the dm-crypt device (LUKS2 on a 16 MiB loop disk), both
/// layers tracked, the disk added first; [`QUEUED_ROUNDS`] takes, each then
/// destroyed, each under 3 s, each snapshot without error. dm-crypt
/// encrypts in its workers and sends the disk's writes from its write
/// thread, after the write passed the dm-crypt device's filter: a take
/// that held both devices at once, then waited for the writes in flight on
/// each, held those lower writes, the dm-crypt writes never completed and
/// the take failed after 30 s (`ETIMEDOUT`). The last snapshot's images
/// are one cut: the disk's image, opened with cryptsetup, equals the
/// dm-crypt device's image (once: each cryptsetup command takes seconds
/// under TCG). No write fails.
fn crypt_queued_takes() -> TestResult {
    let lc = loop_disk("q", 16)?;
    let mut undo = Undo::new();
    let c = lc.path.clone();
    let (crypt, _) = luks(&c, &mut undo)?;
    let k = key()?;
    let (tc, tx) = (track(&c)?, track(&crypt)?);
    let flood = Flood::start(&crypt, 32)?;
    let r = (|| -> TestResult {
        let mut slowest = Duration::ZERO;
        for round in 0..QUEUED_ROUNDS {
            flood.advance(64)?;
            let snap = Snap::create(&dev::scratch(), 64 << 11)?;
            snap.add(&tc.0)?;
            snap.add(&tx.0)?;
            let queued = flood.busy.load(Ordering::Relaxed);
            let start = Instant::now();
            snap.take()
                .map_err(|err| format!("round {round}: the take with {queued} writes in flight through the dm-crypt device: {err}"))?;
            let took = start.elapsed();
            slowest = slowest.max(took);
            println!(
                "    round {round}: {queued} writes in flight through the dm-crypt device, take {:.0} ms",
                took.as_secs_f64() * 1000.0
            );
            if took > Duration::from_secs(3) {
                fail!(
                    "round {round}: the take under {queued} writes in flight took {:.1} s",
                    took.as_secs_f64()
                );
            }
            let (ximg, cimg) = (image_of(&tx.0)?, image_of(&tc.0)?);
            if round == QUEUED_ROUNDS - 1 {
                let (opened, u) = open_crypt_image(&cimg, &k)?;
                check_eq!(
                    sha_dev(&opened)?,
                    sha_dev(&ximg)?,
                    "round {round}: the disk's image, decrypted, against the dm-crypt device's image"
                );
                drop(u);
            }
            // Neither image failed meanwhile (the storage did not overflow).
            image_of(&tx.0)?;
            image_of(&tc.0)?;
            snap.destroy()?;
        }
        println!(
            "    {QUEUED_ROUNDS} takes, the slowest {:.0} ms",
            slowest.as_secs_f64() * 1000.0
        );
        Ok(())
    })();
    let count = flood.stop();
    r?;
    println!("    {} writes of 64 KiB in all, none failed", count?);
    Ok(())
}
// ---------------------------------------------------------------- md

/// An md RAID1 array `/dev/md100` of `members` (no resync: assumed clean;
/// no write-intent bitmap); stopped by `undo`. Returns each member's data
/// offset in sectors.
fn md(members: &[&Path], undo: &mut Undo) -> Result<Vec<u64>, String> {
    let names: Vec<&str> = members.iter().map(|p| p.to_str().unwrap()).collect();
    let n = names.len().to_string();
    let raid_devices = format!("--raid-devices={n}");
    let mut args = vec![
        "--create",
        MD,
        "--run",
        "--level=1",
        &raid_devices,
        "--metadata=1.2",
        "--bitmap=none",
        "--assume-clean",
    ];
    args.extend(&names);
    tool("mdadm", &args)?;
    let mut args = vec!["--zero-superblock"];
    args.extend(&names);
    undo.push("mdadm", &args);
    undo.push("mdadm", &["--stop", MD]);
    members
        .iter()
        .map(|m| {
            let name = m.file_name().unwrap().to_string_lossy();
            dev::sysfs_attr(Path::new(MD), &format!("md/dev-{name}/offset"))?
                .parse::<u64>()
                .map_err(|err| format!("data offset of {name}: {err}"))
        })
        .collect()
}

/// Waits until the array is clean (md rewrites its members' superblocks
/// some 200 ms after the last write).
fn md_clean() -> TestResult {
    let start = Instant::now();
    loop {
        let state = dev::sysfs_attr(Path::new(MD), "md/array_state")?;
        if state == "clean" {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            fail!("{MD} is still {state} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An md RAID1 array of two members:
///
/// 1. the array and both members, each tracked (see [`check_stack`]); a
///    member's CBT also marks md's superblock updates, outside the data.
///    What udev's md rule does with a member's image is checked in the
///    first snapshot of all layers;
/// 2. a member fails, misses writes to the array, and is added back while
///    tracked: md's recovery rewrites it through its filter, so its CBT
///    marks the whole data area; its data equals the array's, and its
///    next incremental (by the CBT) restores, through the chain of step 1,
///    to the member.
fn md_stack() -> TestResult {
    let lc = loop_disk("c", DISK_MIB)?;
    let ld = loop_disk("d", DISK_MIB)?;
    let mut undo = Undo::new();
    let (c, d) = (lc.path.clone(), ld.path.clone());
    let offsets = md(&[&c, &d], &mut undo)?;
    let a = Path::new(MD);
    let dir = dev::scratch().join("stacks-md");
    let _ = std::fs::remove_dir_all(&dir);
    let (ta, tc, td) = (track(a)?, track(&c)?, track(&d)?);
    let layers = vec![(a, 0), (c.as_path(), offsets[0]), (d.as_path(), offsets[1])];
    let tried = std::cell::Cell::new(false);
    let same = |images: &[PathBuf]| -> TestResult {
        if !tried.replace(true) {
            incremental_assembly(&images[1])?;
        }
        same_data(&layers, images)
    };
    let r = check_stack(
        &Stack {
            name: "md",
            layers: layers.clone(),
            settle: &md_clean,
            marks_outside: true,
            clear: true,
            same: Some(&same),
        },
        &[&ta.0, &tc.0, &td.0],
        301,
        &dir,
    )
    .and_then(|_| md_recovery(&d, &td.0, offsets[1], &dir));
    drop((ta, tc, td));
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Step 2 of [`md_stack`]: member `d`, tracked by `t`, data at `offset`.
fn md_recovery(d: &Path, t: &Tracker, offset: u64, dir: &Path) -> TestResult {
    let a = Path::new(MD);
    let sectors = dev::size_sectors(a)?;
    let ds = d.to_str().unwrap();
    tool("mdadm", &[MD, "--fail", ds])?;
    tool("mdadm", &[MD, "--remove", ds])?;
    for (s, n) in [(0, 64), (sectors / 2, 2048)] {
        write_pattern(a, s, n, 322)?;
    }
    let number = t.cbt_info().map_err(e)?.changes_number;
    let stale = sha_dev(d)?;
    tool("mdadm", &[MD, "--add", ds])?;
    let start = Instant::now();
    loop {
        let action = dev::sysfs_attr(a, "md/sync_action")?;
        let degraded = dev::sysfs_attr(a, "md/degraded")?;
        if action == "idle" && degraded == "0" {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            fail!("{MD}: still {action}, degraded {degraded} after 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "    recovery of {} took {:.1} s",
        d.display(),
        start.elapsed().as_secs_f64()
    );
    md_clean()?;
    let added = dev::sysfs_attr(
        a,
        &format!("md/dev-{}/offset", d.file_name().unwrap().to_string_lossy()),
    )?
    .parse::<u64>()
    .map_err(|err| err.to_string())?;
    check_eq!(added, offset, "the data offset of the added member");
    let bs = u64::from(t.cbt_info().map_err(e)?.block_size);
    let marked = marked_after(t, number)?;
    let data = blocks_of(&[(0, sectors)], offset, bs);
    let missing: Vec<_> = data.difference(&marked).collect();
    if !missing.is_empty() {
        fail!(
            "the recovery rewrote the member's data, but its CBT misses {} of {} blocks: {:?}",
            missing.len(),
            data.len(),
            missing.iter().take(8).collect::<Vec<_>>()
        );
    }
    check_eq!(
        sha_range(d, offset * SECTOR, sectors * SECTOR)?,
        sha_dev(a)?,
        "the recovered member's data against the array"
    );
    let now = sha_dev(d)?;
    if now == stale {
        fail!("{}: the recovery changed nothing on it", d.display());
    }
    let (p, _) = incremental(d, dir, Some(&now))?;
    check_method(&p, d, "cbt")?;
    if p.read == 0 || p.read > marked.len() as u64 * bs {
        fail!(
            "point {} of {}: read {} bytes; the CBT marked {} blocks of {bs}",
            p.point,
            d.display(),
            p.read,
            marked.len()
        );
    }
    Ok(())
}
/// What udev's md rule does with the image of a member (it runs `mdadm
/// --incremental` on every new device with an md superblock): the image,
/// whose superblock names the running array, is not added to it, and
/// nothing else is assembled from it.
fn incremental_assembly(image: &Path) -> TestResult {
    let members = || -> Result<Vec<String>, String> {
        let mut v: Vec<String> = std::fs::read_dir("/sys/block/md100/md")
            .map_err(|err| err.to_string())?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("dev-"))
            .collect();
        v.sort();
        Ok(v)
    };
    let before = members()?;
    let r = tool(
        "mdadm",
        &[
            "--incremental",
            "--export",
            image.to_str().unwrap(),
            "--offroot",
        ],
    );
    let out = match &r {
        Ok(o) => o.trim().to_string(),
        Err(err) => err.clone(),
    };
    println!(
        "    mdadm --incremental on the member's image {}: {}",
        image.display(),
        out.lines().last().unwrap_or_default()
    );
    check_eq!(
        members()?,
        before,
        "the members of {MD} after mdadm --incremental on an image"
    );
    let mdstat = std::fs::read_to_string("/proc/mdstat").map_err(|err| err.to_string())?;
    let arrays: Vec<&str> = mdstat.lines().filter(|l| l.starts_with("md")).collect();
    if arrays.len() != 1 {
        fail!("arrays after mdadm --incremental on an image: {arrays:?}");
    }
    Ok(())
}
