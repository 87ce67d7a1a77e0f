// SPDX-License-Identifier: GPL-2.0

//! Restore points (`blksnapctl backup --format qcow2`, the default), all
//! through the command line and the real tools: backups of a live file
//! system, restores to devices and files checked against the snapshot
//! images, `qemu-img check` and `compare`, list, verify, prune; a killed
//! incremental and prunes stopped after each step leave every listed point
//! restorable; the file-level restore; what restore refuses.
//!
//! The commands and their output are printed (a transcript in the log).

use crate::dev::{self, SECTOR};
use crate::snap::{disk, e, write_pattern, Rng, Snap, Tracked};
use crate::{check_eq, fail, TestResult};
use blksnap::Control;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

type Test = (&'static str, fn() -> TestResult);

/// The restore point tests, in the order they run.
pub const ALL: &[Test] = &[
    (
        "points_chain_restore_prune_verify",
        chain_restore_prune_verify,
    ),
    (
        "points_interrupted_incremental_and_prune_leave_points_restorable",
        interrupted_and_prune,
    ),
    ("points_file_level_restore", file_level_restore),
    ("points_restore_refuses", restore_refuses),
    (
        "points_snapshot_failed_during_the_copy_publishes_nothing",
        failed_during_the_copy,
    ),
    (
        "points_verify_source_finds_writes_the_cbt_missed",
        verify_source_finds_missed_writes,
    ),
    (
        "points_incremental_checks_the_device_identity",
        incremental_checks_identity,
    ),
    (
        "points_whole_disk_backup_freezes_stacked_file_systems",
        freezes_stacked_file_systems,
    ),
];

const MIB: u64 = 1 << 20;

/// A command's exit code (-1: killed or not started) and output.
pub(crate) struct Out {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Prints a command's output, indented, for the transcript.
fn show(out: &Out) {
    for l in out.stdout.lines().chain(out.stderr.lines()) {
        println!("      {l}");
    }
    if out.code != 0 {
        println!("      (exit {})", out.code);
    }
}

/// Runs `cmd ARGS`, printing it and its output.
pub(crate) fn run(cmd: &str, args: &[&str]) -> Out {
    println!("    $ {cmd} {}", args.join(" "));
    let start = std::time::Instant::now();
    let out = match std::process::Command::new(cmd).args(args).output() {
        Ok(o) => Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        },
        Err(err) => Out {
            code: -1,
            stdout: String::new(),
            stderr: format!("{cmd}: {err}"),
        },
    };
    show(&out);
    println!("      [{:.1} s]", start.elapsed().as_secs_f64());
    out
}

/// `blksnapctl ARGS`, which must succeed; its stdout.
pub(crate) fn ctl_ok(args: &[&str]) -> Result<String, String> {
    let out = run("blksnapctl", args);
    if out.code != 0 {
        fail!(
            "blksnapctl {} exited {}: {}",
            args.join(" "),
            out.code,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// `blksnapctl --json ARGS`, which must succeed and print JSON.
pub(crate) fn ctl_json(args: &[&str]) -> Result<Value, String> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let s = ctl_ok(&a)?;
    serde_json::from_str(&s).map_err(|err| format!("blksnapctl {}: not JSON ({err})", a.join(" ")))
}

/// `blksnapctl ARGS`, which must fail with exit code `code` and a message
/// containing `want`; its stderr.
pub(crate) fn ctl_fails(args: &[&str], code: i32, want: &str) -> Result<String, String> {
    let out = run("blksnapctl", args);
    if out.code != code || !out.stderr.contains(want) {
        fail!(
            "blksnapctl {}: exit {}, stderr {:?}; want exit {code} and `{want}`",
            args.join(" "),
            out.code,
            out.stderr
        );
    }
    Ok(out.stderr)
}

/// SHA-256 of the first `size` bytes of a file or device.
pub(crate) fn sha_prefix(path: &Path, size: u64) -> Result<String, String> {
    let f = std::fs::File::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| err.to_string())?;
    let mut child = out;
    {
        let mut stdin = child.stdin.take().unwrap();
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], off)
                .map_err(|err| format!("{}: read at {off}: {err}", path.display()))?;
            stdin.write_all(&buf[..n]).map_err(|err| err.to_string())?;
            off += n as u64;
        }
    }
    let o = child.wait_with_output().map_err(|err| err.to_string())?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

/// Bytes a file takes on disk.
fn allocated(path: &Path) -> Result<u64, String> {
    Ok(std::fs::metadata(path)
        .map_err(|err| format!("{}: {err}", path.display()))?
        .blocks()
        * 512)
}

/// Bytes of data clusters the image itself holds (not its backing
/// files), from `qemu-img map`.
fn top_layer_bytes(file: &Path) -> Result<u64, String> {
    let out = dev::run(
        "qemu-img",
        &[
            "map",
            "-f",
            "qcow2",
            "--output=json",
            file.to_str().unwrap(),
        ],
    )?;
    let v: Value =
        serde_json::from_str(&out).map_err(|err| format!("qemu-img map: {err}: {out}"))?;
    Ok(v.as_array()
        .ok_or_else(|| format!("qemu-img map: {out}"))?
        .iter()
        .filter(|r| r["depth"].as_u64() == Some(0) && r["data"].as_bool() == Some(true))
        .map(|r| r["length"].as_u64().unwrap_or(0))
        .sum())
}

/// One point made by [`backup`]: what the report and the snapshot said.
#[derive(Clone, Debug)]
pub(crate) struct Made {
    pub(crate) point: u64,
    pub(crate) file: PathBuf,
    pub(crate) read: u64,
    pub(crate) written: u64,
    /// SHA-256 of the snapshot image right after the backup.
    pub(crate) sha: String,
}

/// `blksnapctl backup KIND DEV --keep-snapshot --json` into `dir`: hashes
/// the snapshot image, destroys the snapshot, checks the point's manifest
/// has the image's SHA-256.
pub(crate) fn backup(kind: &str, dev: &Path, dir: &Path) -> Result<Made, String> {
    backup_with(kind, dev, dir, &[]).map(|b| b.0)
}

/// [`backup`] with more arguments; also returns the device's outcome in
/// the JSON report and what the command wrote to stderr.
pub(crate) fn backup_with(
    kind: &str,
    dev: &Path,
    dir: &Path,
    extra: &[&str],
) -> Result<(Made, Value, String), String> {
    let store = dev::scratch();
    let mut args = vec![
        "--json",
        "backup",
        kind,
        dev.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--limit",
        "256M",
        "--to",
        dir.to_str().unwrap(),
        "--keep-snapshot",
    ];
    args.extend_from_slice(extra);
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
    let o = &v["devices"][0];
    let id = v["snapshot"]
        .as_str()
        .ok_or_else(|| format!("no snapshot id in {v}"))?
        .to_string();
    let image = PathBuf::from(
        o["image"]
            .as_str()
            .ok_or_else(|| format!("no image in {v}"))?,
    );
    let hashed = crate::snap::sha256(&image);
    ctl_ok(&["snapshot", "destroy", &id])?;
    let sha = hashed?;
    println!(
        "      (sha256 of {} before the destroy: {sha})",
        image.display()
    );
    let made = Made {
        point: o["point"]
            .as_u64()
            .ok_or_else(|| format!("no point in {v}"))?,
        file: PathBuf::from(
            o["file"]
                .as_str()
                .ok_or_else(|| format!("no file in {v}"))?,
        ),
        read: o["copied"]["read"].as_u64().unwrap_or(u64::MAX),
        written: o["copied"]["written"].as_u64().unwrap_or(u64::MAX),
        sha,
    };
    let manifest = made.file.with_extension("json");
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
    // A base records the SHA-256 of its content; an incremental may record
    // only its digests (its content is checked by the restores).
    match m["sha256"].as_str().unwrap_or_default() {
        "" if kind == "full" => fail!("no sha256 in {}", manifest.display()),
        "" => println!(
            "      (point {}: no sha256 in its manifest, digests only)",
            made.point
        ),
        sum => check_eq!(
            sum,
            made.sha.as_str(),
            "sha256 of point {} ({}) against its snapshot image",
            made.point,
            manifest.display()
        ),
    }
    Ok((made, o.clone(), out.stderr))
}

/// `qemu-img check` of a point: no errors.
fn qemu_check(file: &Path) -> TestResult {
    let out = run(
        "qemu-img",
        &["check", "-f", "qcow2", file.to_str().unwrap()],
    );
    if out.code != 0 || !out.stdout.contains("No errors were found") {
        fail!(
            "qemu-img check {}: exit {}: {}{}",
            file.display(),
            out.code,
            out.stdout,
            out.stderr
        );
    }
    Ok(())
}

/// Restores point `n` of device `name` in `dir` to `target`, checks the
/// target's first `size` bytes hash to `sha`, and, if `compare`, that
/// `qemu-img compare` finds the point and the target identical.
pub(crate) fn restore_check(
    dir: &Path,
    name: &str,
    n: u64,
    target: &Path,
    size: u64,
    sha: &str,
    compare: Option<&Path>,
) -> TestResult {
    let v = ctl_json(&[
        "restore",
        "--point",
        &n.to_string(),
        dir.to_str().unwrap(),
        target.to_str().unwrap(),
        "--device",
        name,
    ])?;
    check_eq!(
        v["sha256"].as_str(),
        Some(sha),
        "the sha256 restore reports for point {n}"
    );
    let got = sha_prefix(target, size)?;
    if got != sha {
        fail!(
            "point {n} restored to {} hashes to {got}, its snapshot image to {sha}",
            target.display()
        );
    }
    if let Some(point) = compare {
        let out = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                point.to_str().unwrap(),
                target.to_str().unwrap(),
            ],
        );
        if out.code != 0 || !out.stdout.contains("Images are identical.") {
            fail!(
                "qemu-img compare {} {}: exit {}: {}{}",
                point.display(),
                target.display(),
                out.code,
                out.stdout,
                out.stderr
            );
        }
    }
    Ok(())
}

/// The points of `name` that `backup list DIR --json` shows: number ->
/// the list's row.
fn list(dir: &Path, name: &str) -> Result<BTreeMap<u64, Value>, String> {
    let v = ctl_json(&["backup", "list", dir.to_str().unwrap()])?;
    let rows = v
        .as_array()
        .ok_or_else(|| format!("list: not an array: {v}"))?;
    Ok(rows
        .iter()
        .filter(|r| r["device"].as_str() == Some(name))
        .map(|r| (r["point"].as_u64().unwrap_or(u64::MAX), r.clone()))
        .collect())
}

/// `verify DIR --device NAME`: exit 0, one OK line per point in `want`.
fn verify(dir: &Path, name: &str, want: &[u64]) -> TestResult {
    let out = ctl_ok(&["verify", dir.to_str().unwrap(), "--device", name])?;
    for n in want {
        if !out.contains(&format!("point {n}: OK")) {
            fail!("verify: no `point {n}: OK` in {out:?}");
        }
    }
    check_eq!(out.lines().count(), want.len(), "verify lines in {out:?}");
    Ok(())
}

/// Fills `buf` with pseudo-random bytes.
fn fill(buf: &mut [u8], rng: &mut Rng) {
    for c in buf.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// Writes a file of pseudo-random bytes, fsynced.
pub(crate) fn write_file(path: &Path, len: usize, rng: &mut Rng) -> TestResult {
    let mut data = vec![0u8; len];
    fill(&mut data, rng);
    let mut f = std::fs::File::create(path).map_err(|err| format!("{}: {err}", path.display()))?;
    f.write_all(&data)
        .and_then(|_| f.sync_all())
        .map_err(|err| format!("{}: {err}", path.display()))
}

pub(crate) fn name_of(dev: &Path) -> String {
    dev.file_name().unwrap().to_string_lossy().to_string()
}

/// Tracks `dev` afresh (detached first if a failed test left it attached).
pub(crate) fn track(dev: &Path) -> Result<Tracked, String> {
    if let Ok(t) = blksnap::Tracker::open(dev) {
        let _ = t.detach();
    }
    Tracked::new(dev)
}

/// How many snapshots exist.
pub(crate) fn snapshot_count() -> Result<usize, String> {
    let ctl = Control::open().map_err(e)?;
    Ok(ctl.snapshot_collect().map_err(e)?.len())
}

/// A live ext4 (a writer fsyncing new files and rewrites of a big file all
/// the time): a full and three incrementals, each point's manifest and
/// restore equal to its snapshot image; the incrementals' files hold
/// about what they copied; qemu-img check and compare agree; list, verify;
/// a prune to two points leaves them restorable.
fn chain_restore_prune_verify() -> TestResult {
    let src = disk("blksnap-c")?;
    let tgt = disk("blksnap-d")?;
    let name = name_of(&src);
    let sd = src.to_str().unwrap().to_string();
    let size = dev::size_sectors(&src)? * SECTOR;
    if dev::size_sectors(&tgt)? * SECTOR < size {
        fail!("the restore target is smaller than the source");
    }
    let scratch = dev::scratch();
    let dir = scratch.join("pt-a");
    let mnt = scratch.join("pt-a-mnt");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&mnt).map_err(|err| err.to_string())?;
    dev::run("mkfs.ext4", &["-q", "-F", &sd])?;
    let _t = track(&src)?;
    dev::run("mount", &[&sd, mnt.to_str().unwrap()])?;
    let r = (|| {
        // A big file most of the full copies, rewritten in parts later.
        let big = mnt.join("big");
        write_file(&big, 40 << 20, &mut Rng(0x9e37_79b9))?;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, written, mnt) = (stop.clone(), written.clone(), mnt.clone());
            std::thread::spawn(move || -> TestResult {
                let mut rng = Rng(0x5eed_0001);
                let bigf = std::fs::OpenOptions::new()
                    .write(true)
                    .open(mnt.join("big"))
                    .map_err(|err| err.to_string())?;
                let mut chunk = vec![0u8; 64 << 10];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    write_file(&mnt.join(format!("f{}", i % 24)), 32 << 10, &mut rng)?;
                    fill(&mut chunk, &mut rng);
                    let off = rng.below((40 << 20) / chunk.len() as u64) * chunk.len() as u64;
                    bigf.write_all_at(&chunk, off)
                        .and_then(|_| bigf.sync_data())
                        .map_err(|err| err.to_string())?;
                    written.fetch_add(96 << 10, Ordering::Relaxed);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                Ok(())
            })
        };
        let r = (|| {
            let mut made = Vec::new();
            for round in 0..4 {
                std::thread::sleep(Duration::from_millis(600));
                let before = written.load(Ordering::Relaxed);
                let kind = if round == 0 { "full" } else { "incremental" };
                let m = backup(kind, &src, &dir)?;
                check_eq!(m.point, round + 1, "point number of backup {round}");
                println!(
                    "      (the writer wrote {} KiB during and before it)",
                    (written.load(Ordering::Relaxed) - before) >> 10
                );
                made.push(m);
            }
            Ok::<_, String>(made)
        })();
        stop.store(true, Ordering::Relaxed);
        let w = writer.join().map_err(|_| "writer panicked".to_string())?;
        let made = r?;
        w?;
        check_eq!(
            written.load(Ordering::Relaxed) > 0,
            true,
            "the writer wrote something"
        );

        // The sizes: an incremental's file holds the qcow2 clusters its
        // copy wrote into and metadata: about what it copied, far less
        // than the full.
        println!(
            "    point  kind         copied (read)   written   clusters in file   file allocated   (device {} MiB)",
            size >> 20
        );
        let mut alloc = Vec::new();
        for (i, m) in made.iter().enumerate() {
            let a = allocated(&m.file)?;
            let top = top_layer_bytes(&m.file)?;
            alloc.push(a);
            println!(
                "    {:>5}  {:<11}  {:>10} KiB  {:>6} KiB  {:>13} KiB  {:>11} KiB",
                m.point,
                if i == 0 { "full" } else { "incremental" },
                m.read >> 10,
                m.written >> 10,
                top >> 10,
                a >> 10
            );
            if a > top + 2 * MIB {
                fail!(
                    "point {} takes {a} bytes for {top} bytes of clusters: more than 2 MiB of metadata",
                    m.point
                );
            }
            if i > 0 {
                if m.read == 0 {
                    fail!(
                        "incremental point {} copied nothing under a live writer",
                        m.point
                    );
                }
                // What it copied, rounded out to whole clusters: at most a
                // cluster more per piece copied, and pieces are 4 KiB at
                // least.
                if top < m.written || top > m.written * 16 {
                    fail!(
                        "incremental point {} holds {top} bytes of clusters for {} written",
                        m.point,
                        m.written
                    );
                }
                if a >= m.read + 2 * MIB {
                    fail!(
                        "incremental point {} takes {a} bytes for {} copied: more than 2 MiB over",
                        m.point,
                        m.read
                    );
                }
                if a * 2 >= alloc[0] {
                    fail!(
                        "incremental point {} takes {a} bytes, the full {}",
                        m.point,
                        alloc[0]
                    );
                }
            }
        }
        for m in &made {
            qemu_check(&m.file)?;
        }

        // Each point back: the newest to the device, the others to raw
        // files.
        for m in &made {
            let raw = scratch.join(format!("pt-a-restore-{}.raw", m.point));
            let target = if m.point == 4 {
                tgt.clone()
            } else {
                raw.clone()
            };
            // qemu-img compare on the base and on the top of the chain.
            let compare = (m.point == 1 || m.point == 4).then_some(m.file.as_path());
            restore_check(&dir, &name, m.point, &target, size, &m.sha, compare)?;
            let _ = std::fs::remove_file(&raw);
        }

        let text = ctl_ok(&["backup", "list", dir.to_str().unwrap()])?;
        check_eq!(
            text.lines().filter(|l| l.contains(" complete ")).count(),
            4,
            "complete points in the list {text:?}"
        );
        let l = list(&dir, &name)?;
        check_eq!(
            l.keys().copied().collect::<Vec<_>>(),
            vec![1, 2, 3, 4],
            "points listed"
        );
        for (n, row) in &l {
            check_eq!(
                row["status"].as_str(),
                Some("complete"),
                "status of point {n}"
            );
            let listed = row["sha256"].as_str().unwrap_or_default();
            if !listed.is_empty() && listed != made[*n as usize - 1].sha {
                fail!(
                    "listed sha256 of point {n}: {listed}, its snapshot image's {}",
                    made[*n as usize - 1].sha
                );
            }
        }
        verify(&dir, &name, &[1, 2, 3, 4])?;

        // Keep two: point 3 becomes a base.
        ctl_ok(&["backup", "prune", dir.to_str().unwrap(), "--keep", "2"])?;
        let text = ctl_ok(&["backup", "list", dir.to_str().unwrap()])?;
        if !text
            .lines()
            .any(|l| l.contains("base*") && l.contains(" complete "))
        {
            fail!("no merged base in the list {text:?}");
        }
        let l = list(&dir, &name)?;
        check_eq!(
            l.keys().copied().collect::<Vec<_>>(),
            vec![3, 4],
            "points after the prune"
        );
        check_eq!(l[&3]["merged"].as_bool(), Some(true), "point 3 merged");
        check_eq!(l[&3]["backing"], Value::Null, "point 3's backing");
        check_eq!(l[&4]["merged"].as_bool(), Some(false), "point 4 merged");
        for m in &made[2..] {
            qemu_check(&m.file)?;
        }
        for m in &made[..2] {
            if m.file.exists() {
                fail!("{} is left after the prune", m.file.display());
            }
        }
        let raw = scratch.join("pt-a-restore.raw");
        restore_check(
            &dir,
            &name,
            3,
            &raw,
            size,
            &made[2].sha,
            Some(&made[2].file),
        )?;
        let _ = std::fs::remove_file(&raw);
        // Point 4 reads through the new base: verify reads it whole.
        verify(&dir, &name, &[3, 4])
    })();
    let u = dev::run("umount", &[mnt.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    u.map(|_| ())
}

/// An incremental killed (SIGKILL) mid-copy leaves the earlier points as
/// they were and the next incremental works; prunes stopped after the
/// merge, the manifest, a removal leave every listed point restorable and
/// verified; a normal prune then cleans the leftovers.
fn interrupted_and_prune() -> TestResult {
    let big = disk("blksnap-d")?;
    let name = name_of(&big);
    let size = dev::size_sectors(&big)? * SECTOR;
    let scratch = dev::scratch();
    let dir = scratch.join("pt-b");
    let _ = std::fs::remove_dir_all(&dir);
    let chain = dir.join(&name);
    let raw = scratch.join("pt-b-restore.raw");
    let r = (|| {
        dev::zeroout(&big, 0, size)?;
        let _t = track(&big)?;
        write_pattern(&big, 0, 8 * MIB / SECTOR, 1)?;
        let p1 = backup("full", &big, &dir)?;
        write_pattern(&big, 16 * MIB / SECTOR, 4 * MIB / SECTOR, 2)?;
        let p2 = backup("incremental", &big, &dir)?;
        // 40 MiB changed: a copy of a few seconds here.
        write_pattern(&big, 24 * MIB / SECTOR, 40 * MIB / SECTOR, 3)?;
        let args = [
            "backup",
            "incremental",
            big.to_str().unwrap(),
            "--store",
            scratch.to_str().unwrap(),
            "--limit",
            "256M",
            "--to",
            dir.to_str().unwrap(),
        ];
        println!(
            "    $ blksnapctl {} &  (killed with SIGKILL 0.3 s into its copy)",
            args.join(" ")
        );
        let mut child = std::process::Command::new("blksnapctl")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|err| err.to_string())?;
        // Killed 0.3 s into the copy: once its temporary image exists (the
        // snapshot taken, the change map read), while it is running.
        let tmp = chain.join("point-0003.qcow2.tmp");
        let start = std::time::Instant::now();
        while !tmp.exists()
            && start.elapsed() < Duration::from_secs(60)
            && child.try_wait().map_err(|err| err.to_string())?.is_none()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let started = start.elapsed();
        if tmp.exists() {
            std::thread::sleep(Duration::from_millis(300));
        }
        let running = child.try_wait().map_err(|err| err.to_string())?.is_none();
        let tmp_size = std::fs::metadata(&tmp).map(|m| m.len()).ok();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let o = child.wait_with_output().map_err(|err| err.to_string())?;
        show(&Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        });
        // The killed backup's snapshot stays until the next backup of the
        // chain destroys it (its id is in the in-progress manifest).
        let left = snapshot_count()?;
        check_eq!(left, 1, "snapshots left by the killed incremental");
        check_eq!(
            std::os::unix::process::ExitStatusExt::signal(&o.status),
            Some(nix::libc::SIGKILL),
            "how the incremental ended ({})",
            o.status
        );
        let Some(tmp_size) = tmp_size.filter(|_| running) else {
            fail!(
                "the incremental was not copying when killed: {} after {started:?}: {}",
                tmp.display(),
                if tmp.exists() { "exists" } else { "missing" }
            );
        };
        println!(
            "      (its temporary image appeared after {:.1} s; killed 0.3 s later with {} MiB written of it, of 40 MiB changed; {left} snapshot left by it)",
            started.as_secs_f64(),
            tmp_size >> 20,
        );
        if tmp_size >= 40 * MIB {
            fail!("the killed incremental had written {tmp_size} bytes: the copy was over");
        }
        let l = list(&dir, &name)?;
        for n in [1, 2] {
            check_eq!(
                l.get(&n).map_or(&Value::Null, |r| &r["status"]).as_str(),
                Some("complete"),
                "status of point {n}"
            );
        }
        if let Some(k) = l.get(&3) {
            check_eq!(
                k["status"].as_str(),
                Some("in-progress"),
                "status of the killed point"
            );
        }
        check_eq!(l.len() <= 3, true, "points listed: {l:?}");
        for p in [&p1, &p2] {
            qemu_check(&p.file)?;
            restore_check(&dir, &name, p.point, &raw, size, &p.sha, None)?;
        }
        let _ = std::fs::remove_file(&raw);
        // The next incremental: point 4 on point 2. The big change back to
        // zeroes (zero clusters, not 40 MiB on the scratch tmpfs) and a
        // new write.
        dev::run(
            "dd",
            &[
                "if=/dev/zero",
                &format!("of={}", big.display()),
                "bs=1M",
                "seek=24",
                "count=40",
                "oflag=direct",
                "conv=notrunc",
                "status=none",
            ],
        )?;
        write_pattern(&big, 40 * MIB / SECTOR, MIB / SECTOR, 4)?;
        let p4 = backup("incremental", &big, &dir)?;
        check_eq!(p4.point, 4, "the point after the killed one");
        check_eq!(
            snapshot_count()?,
            0,
            "snapshots after the next incremental (it destroys the killed one's)"
        );
        let l = list(&dir, &name)?;
        check_eq!(
            l.get(&4).and_then(|r| r["backing"].as_str()),
            Some("point-0002.qcow2"),
            "backing of point 4"
        );
        qemu_check(&p4.file)?;
        restore_check(&dir, &name, 4, &raw, size, &p4.sha, Some(&p4.file))?;
        let _ = std::fs::remove_file(&raw);
        Ok::<_, String>(())
    })();
    let r = r.and_then(|_| prune_crashes(&dir, &chain, &name));
    let _ = std::fs::remove_file(&raw);
    // Zeroes again for the tests after this one.
    let _ = dev::zeroout(&big, 0, size);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The prunes stopped after each step, on a second chain in `dir` (a
/// small device), then the normal prunes; `big_chain` holds the killed
/// incremental's leftovers.
fn prune_crashes(dir: &Path, big_chain: &Path, big_name: &str) -> TestResult {
    let small = disk("blksnap-c")?;
    let name = name_of(&small);
    let size = dev::size_sectors(&small)? * SECTOR;
    let raw = dev::scratch().join("pt-b-restore-small.raw");
    let d = dir.to_str().unwrap();
    let _t = track(&small)?;
    let mut shas = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut rng = Rng(0x0123_4567);
    write_pattern(&small, 0, size / SECTOR, 11)?;
    let point = |kind: &str,
                 rng: &mut Rng,
                 shas: &mut BTreeMap<u64, String>,
                 files: &mut BTreeMap<u64, PathBuf>|
     -> TestResult {
        for _ in 0..8 {
            let s = rng.below(size / SECTOR - 2048);
            write_pattern(&small, s, 1 + rng.below(2048), rng.next())?;
        }
        let m = backup(kind, &small, dir)?;
        shas.insert(m.point, m.sha);
        files.insert(m.point, m.file);
        Ok(())
    };
    point("full", &mut rng, &mut shas, &mut files)?;
    point("incremental", &mut rng, &mut shas, &mut files)?;
    point("incremental", &mut rng, &mut shas, &mut files)?;
    // Every point listed complete restores to its hash (verify, slower
    // here than a restore, runs at the end).
    let check = |want: &[u64], shas: &BTreeMap<u64, String>| -> TestResult {
        let l = list(Path::new(d), &name)?;
        let complete: Vec<u64> = l
            .iter()
            .filter(|(_, r)| r["status"].as_str() == Some("complete"))
            .map(|(n, _)| *n)
            .collect();
        check_eq!(complete, want.to_vec(), "complete points listed");
        for n in want {
            let file = PathBuf::from(l[n]["image"].as_str().unwrap_or_default());
            qemu_check(&file)?;
            restore_check(Path::new(d), &name, *n, &raw, size, &shas[n], None)?;
        }
        let _ = std::fs::remove_file(&raw);
        Ok(())
    };
    let crash = |keep: &str, step: &str| -> TestResult {
        ctl_fails(
            &[
                "backup",
                "prune",
                d,
                "--device",
                &name,
                "--keep",
                keep,
                "--crash-after",
                step,
            ],
            137,
            step,
        )
        .map(|_| ())
    };
    // Keep 2 of 1..3: point 2 is merged (the new image renamed over it),
    // then the stop: its manifest still names its backing file.
    crash("2", "merge")?;
    check(&[1, 2, 3], &shas)?;
    let l = list(Path::new(d), &name)?;
    check_eq!(
        l[&2]["merged"].as_bool(),
        Some(false),
        "point 2 merged after the merge step"
    );
    // (Stopped after the manifest step: host test
    // interrupted_prunes_leave_points_restorable, like every step.)
    // A fourth point; keep 1: merge into 4, its manifest, point 3 removed,
    // stop.
    point("incremental", &mut rng, &mut shas, &mut files)?;
    crash("1", "remove")?;
    check(&[1, 2, 4], &shas)?;
    if files[&3].exists() {
        fail!("{} is left after its removal", files[&3].display());
    }
    // Finished: only point 4 is left of this chain.
    ctl_ok(&["backup", "prune", d, "--device", &name, "--keep", "1"])?;
    check(&[4], &shas)?;
    verify(Path::new(d), &name, &[4])?;
    for n in [1, 2, 3] {
        if files[&n].exists() {
            fail!("{} is left after the prune", files[&n].display());
        }
    }
    // Every chain: the big one keeps its three points and loses the
    // killed incremental's leftovers.
    let out = ctl_ok(&["backup", "prune", d, "--keep", "3"])?;
    if !out.contains("leftovers") {
        fail!("the prune removed no leftovers: {out:?}");
    }
    let l = list(Path::new(d), big_name)?;
    check_eq!(
        l.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 4],
        "points of {big_name}"
    );
    for chain in [big_chain.to_path_buf(), dir.join(&name)] {
        for entry in std::fs::read_dir(&chain).map_err(|err| err.to_string())? {
            let n = entry.map_err(|err| err.to_string())?.file_name();
            let n = n.to_string_lossy();
            if n.ends_with(".tmp") || n == "point-0003.json" && chain == big_chain {
                fail!("{n} is left in {} after the prune", chain.display());
            }
        }
    }
    // (Each of those points was restored and checked above.)
    ctl_ok(&["backup", "list", d]).map(|_| ())
}

/// The documented file-level restore: a point converted to a raw file,
/// attached read-only to a loop device and mounted read-only.
fn file_level_restore() -> TestResult {
    let src = disk("blksnap-d")?;
    let sd = src.to_str().unwrap().to_string();
    let scratch = dev::scratch();
    let dir = scratch.join("pt-c");
    let mnt = scratch.join("pt-c-mnt");
    let ro = scratch.join("pt-c-ro");
    let raw = scratch.join("x.raw");
    let _ = std::fs::remove_dir_all(&dir);
    for m in [&mnt, &ro] {
        std::fs::create_dir_all(m).map_err(|err| err.to_string())?;
    }
    dev::run("mkfs.ext4", &["-q", "-F", &sd])?;
    let _t = track(&src)?;
    dev::run("mount", &[&sd, mnt.to_str().unwrap()])?;
    let r = (|| {
        let mut rng = Rng(0xf11e);
        write_file(&mnt.join("first"), 3 << 20, &mut rng)?;
        let first = crate::snap::sha256(&mnt.join("first"))?;
        let p1 = backup("full", &src, &dir)?;
        write_file(&mnt.join("second"), 2 << 20, &mut rng)?;
        let second = crate::snap::sha256(&mnt.join("second"))?;
        // The first changes after point 2.
        let p2 = backup("incremental", &src, &dir)?;
        write_file(&mnt.join("first"), 1 << 20, &mut rng)?;
        for (p, want) in [
            (&p1, vec![("first", Some(&first)), ("second", None)]),
            (
                &p2,
                vec![("first", Some(&first)), ("second", Some(&second))],
            ),
        ] {
            let out = run(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    p.file.to_str().unwrap(),
                    raw.to_str().unwrap(),
                ],
            );
            check_eq!(out.code, 0, "qemu-img convert");
            let out = run(
                "losetup",
                &["--find", "--show", "--read-only", raw.to_str().unwrap()],
            );
            check_eq!(out.code, 0, "losetup");
            let lo = out.stdout.trim().to_string();
            let r = (|| {
                let out = run("mount", &["-o", "ro", &lo, ro.to_str().unwrap()]);
                check_eq!(out.code, 0, "mount -o ro {lo}");
                let r = (|| {
                    for (f, sum) in &want {
                        let path = ro.join(f);
                        match sum {
                            Some(sum) => {
                                let got = crate::snap::sha256(&path)?;
                                println!("      {f} in point {}: sha256 {got}", p.point);
                                check_eq!(&got, *sum, "{f} in point {}", p.point);
                            }
                            None => {
                                if path.exists() {
                                    fail!("{f} is in point {}, written after it", p.point);
                                }
                            }
                        }
                    }
                    Ok(())
                })();
                let u = run("umount", &[ro.to_str().unwrap()]);
                r?;
                check_eq!(u.code, 0, "umount");
                Ok(())
            })();
            let d = run("losetup", &["-d", &lo]);
            r?;
            check_eq!(d.code, 0, "losetup -d");
            let _ = std::fs::remove_file(&raw);
        }
        Ok(())
    })();
    let u = dev::run("umount", &[mnt.to_str().unwrap()]);
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    u.map(|_| ())
}

/// What restore refuses: a mounted device (left unchanged), a device in a
/// snapshot (unless --force), a point that does not exist or did not
/// complete, a target smaller than the point.
fn restore_refuses() -> TestResult {
    let src = disk("blksnap-c")?;
    let tgt = disk("blksnap-d")?;
    let name = name_of(&src);
    let size = dev::size_sectors(&src)? * SECTOR;
    let scratch = dev::scratch();
    let dir = scratch.join("pt-d");
    let d = dir.to_str().unwrap().to_string();
    let td = tgt.to_str().unwrap().to_string();
    let mnt = scratch.join("pt-d-mnt");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&mnt).map_err(|err| err.to_string())?;
    let t = track(&src)?;
    write_pattern(&src, 0, size / SECTOR, 21)?;
    let p1 = backup("full", &src, &dir)?;
    drop(t);
    let r = (|| {
        // Mounted: refused, untouched.
        dev::run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &td,
            ],
        )?;
        dev::run("mount", &[&td, mnt.to_str().unwrap()])?;
        // Frozen: the file system writes nothing of its own (its
        // superblock, its journal) while the device is compared.
        let m = mnt.to_str().unwrap();
        let r = dev::run("fsfreeze", &["-f", m]).and_then(|_| {
            let before = crate::snap::sha256(&tgt)?;
            ctl_fails(
                &["restore", "--point", "1", &d, &td, "--device", &name],
                1,
                "mounted or in use",
            )?;
            check_eq!(
                crate::snap::sha256(&tgt)?,
                before,
                "the mounted device after the refusal"
            );
            Ok(())
        });
        let _ = dev::run("fsfreeze", &["-u", m]);
        let u = dev::run("umount", &[m]);
        r?;
        u?;
        // In a snapshot: refused, then written with --force; the snapshot
        // image keeps the old content.
        let tt = track(&tgt)?;
        let snap = Snap::memory(2 * size / SECTOR)?;
        snap.add(&tt.0)?;
        snap.take()?;
        let before = crate::snap::sha256(&tgt)?;
        let r = (|| {
            ctl_fails(
                &["restore", "--point", "1", &d, &td, "--device", &name],
                1,
                "in a blksnap snapshot",
            )?;
            check_eq!(
                crate::snap::sha256(&tgt)?,
                before,
                "the device in a snapshot after the refusal"
            );
            ctl_ok(&[
                "restore", "--point", "1", &d, &td, "--device", &name, "--force",
            ])?;
            check_eq!(
                sha_prefix(&tgt, size)?,
                p1.sha,
                "the device restored with --force"
            );
            check_eq!(
                crate::snap::sha256(&tt.image()?)?,
                before,
                "the snapshot image of the device restored over"
            );
            Ok(())
        })();
        snap.destroy()?;
        drop(tt);
        r?;
        // No such point.
        ctl_fails(
            &["restore", "--point", "99", &d, &td, "--device", &name],
            1,
            "point 99",
        )?;
        // A point that did not complete (the manifest an interrupted
        // backup leaves).
        let chain = dir.join(&name);
        let mut m: Value = serde_json::from_str(
            &std::fs::read_to_string(chain.join("point-0001.json"))
                .map_err(|err| err.to_string())?,
        )
        .map_err(|err| err.to_string())?;
        m["point"] = 2.into();
        m["image"] = "point-0002.qcow2".into();
        m["status"] = "in-progress".into();
        m["sha256"] = "".into();
        std::fs::write(chain.join("point-0002.json"), m.to_string())
            .map_err(|err| err.to_string())?;
        ctl_ok(&["backup", "list", &d])?;
        ctl_fails(
            &["restore", "--point", "2", &d, &td, "--device", &name],
            1,
            "did not complete",
        )?;
        // A target too small: a 16 MiB loop device.
        let lo = dev::LoopDev::new("pt-d-small", 16 * MIB)?;
        let before = crate::snap::sha256(&lo.path)?;
        ctl_fails(
            &[
                "restore",
                "--point",
                "1",
                &d,
                lo.path.to_str().unwrap(),
                "--device",
                &name,
            ],
            1,
            "smaller than the point",
        )?;
        check_eq!(
            crate::snap::sha256(&lo.path)?,
            before,
            "the small device after the refusal"
        );
        // A wrong device name.
        ctl_fails(
            &["restore", "--point", "1", &d, &td, "--device", "nosuch"],
            1,
            "no restore points of nosuch",
        )?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// A progress report that, once the copy has read the whole device,
/// overflows the snapshot's store by writing `MIB` MiB to the origin and
/// waits until the snapshot says it failed: the copy itself succeeded,
/// only the snapshot's state tells.
struct FailAtTheEnd {
    dev: PathBuf,
    mib: u64,
    /// The snapshot's error once it failed, or why it did not.
    outcome: std::cell::RefCell<Option<Result<i32, String>>>,
}

impl blksnap::backup::Progress for FailAtTheEnd {
    fn update(&self, done: u64, total: u64) {
        if done < total || self.outcome.borrow().is_some() {
            return;
        }
        let r = (|| {
            write_pattern(&self.dev, 0, self.mib << 11, 61)?;
            let t = blksnap::Tracker::open(&self.dev).map_err(e)?;
            for _ in 0..200 {
                let code = t.snapshot_info().map_err(e)?.error_code;
                if code != 0 {
                    return Ok(code);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err("the snapshot did not fail within 20 s".to_string())
        })();
        *self.outcome.borrow_mut() = Some(r);
    }
}

/// A snapshot that fails while a backup copies it (its 4 MiB store
/// overflows after the last read, so every read succeeded) makes no
/// complete restore point and no complete raw manifest: the backup fails
/// naming the error, the point is abandoned (nothing of it is left), the
/// raw manifest stays in-progress, no snapshot is left.
fn failed_during_the_copy() -> TestResult {
    use blksnap::backup::{self, Kind, Layout, Manifest, Status};
    let c = disk("blksnap-c")?;
    let name = name_of(&c);
    let size = dev::size_sectors(&c)? * SECTOR;
    let dir = dev::scratch().join("pt-failed");
    let _ = std::fs::remove_dir_all(&dir);
    let _t = track(&c)?;
    write_pattern(&c, 0, size / SECTOR, 60)?;
    let devices = vec![c.clone()];
    let store = dev::scratch();
    for layout in [Layout::Points, Layout::Raw] {
        let hook = FailAtTheEnd {
            dev: c.clone(),
            mib: 16,
            outcome: std::cell::RefCell::new(None),
        };
        let stop = AtomicBool::new(false);
        let r = backup::run(&backup::Options {
            devices: &devices,
            store: &store,
            limit_sectors: 4 << 11,
            dir: &dir,
            kind: Kind::Full,
            stop: &stop,
            progress: &hook,
            log: &|m| println!("    log: {m}"),
            keep_snapshot: false,
            layout,
            verify_source: false,
            hooks: &blksnap::hooks::NONE,
        });
        let code = match hook.outcome.take() {
            Some(Ok(code)) => code,
            Some(Err(err)) => fail!("{layout:?}: {err}"),
            None => fail!("{layout:?}: the copy never reported its end"),
        };
        println!(
            "    {layout:?}: the snapshot failed with {code} after the last read; backup: {r:?}"
        );
        check_eq!(
            code,
            -(nix::errno::Errno::ENOSPC as i32),
            "{layout:?}: snapshot error"
        );
        match &r {
            Err(err) if err.contains("while") && err.contains("No space left on device") => {}
            _ => fail!("{layout:?}: the backup of a snapshot that failed during the copy: {r:?}"),
        }
        match layout {
            Layout::Points => {
                let chain = dir.join(&name);
                let left: Vec<String> = std::fs::read_dir(&chain)
                    .map_err(|err| err.to_string())?
                    .map(|d| d.map(|d| d.file_name().to_string_lossy().to_string()))
                    .collect::<Result<_, _>>()
                    .map_err(|err| err.to_string())?;
                check_eq!(
                    left,
                    vec![".lock".to_string()],
                    "files left in {}",
                    chain.display()
                );
            }
            Layout::Raw => {
                let (_, manifest, _) = backup::paths(&dir, &c);
                check_eq!(
                    Manifest::load(&manifest)?.status,
                    Status::InProgress,
                    "status of {}",
                    manifest.display()
                );
            }
        }
        check_eq!(snapshot_count()?, 0, "{layout:?}: snapshots left");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Writes `len` bytes of `fill` at `off` into the backing file of a loop
/// device, not through the device: the blksnap filter of the loop device
/// never sees that write.
fn write_behind(backing: &Path, off: u64, len: usize, fill: u8) -> TestResult {
    println!(
        "    (writing {len} bytes of {fill:#04x} at byte {off} of {} behind the loop device's back)",
        backing.display()
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(backing)
        .map_err(|err| format!("{}: {err}", backing.display()))?;
    f.write_all_at(&vec![fill; len], off)
        .and_then(|_| f.sync_all())
        .map_err(|err| format!("{}: {err}", backing.display()))
}

/// The byte ranges (merged, in 4 KiB pieces) where two files differ in
/// their first `size` bytes.
fn differing(a: &Path, b: &Path, size: u64) -> Result<Vec<(u64, u64)>, String> {
    let open = |p: &Path| std::fs::File::open(p).map_err(|err| format!("{}: {err}", p.display()));
    let (fa, fb) = (open(a)?, open(b)?);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        fa.read_exact_at(&mut x[..n], off)
            .and_then(|_| fb.read_exact_at(&mut y[..n], off))
            .map_err(|err| format!("read at {off}: {err}"))?;
        for (k, (p, q)) in x[..n].chunks(4096).zip(y[..n].chunks(4096)).enumerate() {
            if p != q {
                let s = off + k as u64 * 4096;
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = s + p.len() as u64,
                    _ => out.push((s, s + p.len() as u64)),
                }
            }
        }
        off += n as u64;
    }
    Ok(out)
}

/// A point's manifest, as JSON.
fn manifest_of(dir: &Path, name: &str, n: u64) -> Result<Value, String> {
    let p = dir.join(name).join(format!("point-{n:04}.json"));
    serde_json::from_str(
        &std::fs::read_to_string(&p).map_err(|err| format!("{}: {err}", p.display()))?,
    )
    .map_err(|err| format!("{}: {err}", p.display()))
}

/// A write the change map never saw: a loop device (buffered, over a file
/// on the scratch tmpfs) is tracked and backed up, then its backing file
/// is written directly. A normal incremental leaves that write out and
/// `verify` says the chain is OK, yet point 2 differs from the device;
/// `verify --source` names exactly the block (and the 4 KiB piece in it)
/// and exits 3; `--repair` makes point 3, restored equal to the device;
/// `backup incremental --verify-source` copies a second such write into
/// its point with a warning, and that point equals its snapshot image.
fn verify_source_finds_missed_writes() -> TestResult {
    let size = 32 * MIB;
    let scratch = dev::scratch();
    let lo = dev::LoopDev::new("pt-vs-src", size)?;
    let src = lo.path.clone();
    let sd = src.to_str().unwrap().to_string();
    let name = name_of(&src);
    let dir = scratch.join("pt-vs");
    let d = dir.to_str().unwrap().to_string();
    let store = scratch.to_str().unwrap().to_string();
    let raw = scratch.join("pt-vs.raw");
    let _ = std::fs::remove_dir_all(&dir);
    let r = (|| {
        let _t = track(&src)?;
        write_pattern(&src, 0, size / SECTOR, 0x51)?;
        backup("full", &src, &dir)?;
        // Seen: 8 KiB at 2 MiB. Unseen: 4 KiB at 5 MiB + 12 KiB.
        write_pattern(&src, 2 * MIB / SECTOR, 16, 0x52)?;
        let x = 5 * MIB + 12 * 1024;
        write_behind(lo.backing(), x, 4096, 0xa5)?;
        let p2 = backup("incremental", &src, &dir)?;
        let truth = sha_prefix(lo.backing(), size)?;
        check_eq!(
            p2.sha,
            truth,
            "point 2's snapshot image against the backing file"
        );
        // The chain checks out against itself...
        verify(&dir, &name, &[1, 2])?;
        // ...yet point 2 is not the device: it lacks the unseen write.
        ctl_json(&[
            "restore",
            "--point",
            "2",
            &d,
            raw.to_str().unwrap(),
            "--device",
            &name,
        ])?;
        check_eq!(
            differing(&raw, lo.backing(), size)?,
            vec![(x, x + 4096)],
            "where point 2 (verify: OK) differs from the device"
        );
        println!(
            "    (verify says point 2 is OK; it differs from the device at bytes {x}..{})",
            x + 4096
        );
        // A seen write since point 2: explained.
        write_pattern(&src, 9 * MIB / SECTOR, 16, 0x53)?;
        let vs = ["verify", "--source", &sd, &d, "--store", &store];
        let out = run("blksnapctl", &vs);
        check_eq!(
            out.code,
            3,
            "verify --source exit code (stderr {:?})",
            out.stderr.trim()
        );
        let blk = x / 65536 * 65536;
        let want = format!(
            "missed bytes {blk}..{} (block {} of 64 KiB): differ at {x}..{}",
            blk + 65536,
            blk / 65536,
            x + 4096
        );
        if !out.stdout.contains(&want) {
            fail!("verify --source: no `{want}` in {:?}", out.stdout);
        }
        check_eq!(
            out.stdout.matches("missed bytes").count(),
            1,
            "missed blocks listed in {:?}",
            out.stdout
        );
        let mut js = vec!["--json"];
        js.extend_from_slice(&vs);
        let out = run("blksnapctl", &js);
        check_eq!(out.code, 3, "verify --source --json exit code");
        let v: Value =
            serde_json::from_str(&out.stdout).map_err(|err| format!("{err}: {}", out.stdout))?;
        check_eq!(v["point"].as_u64(), Some(2), "the point compared with");
        check_eq!(v["cbt"].as_bool(), Some(true), "the change map could say");
        check_eq!(
            (v["differ"].as_u64(), v["explained"].as_u64()),
            (Some(2), Some(1)),
            "blocks that differ and blocks the map explains"
        );
        check_eq!(
            v["missed"],
            serde_json::json!([{
                "block": blk / 65536,
                "start": blk,
                "end": blk + 65536,
                "differ": [[x, x + 4096]],
            }]),
            "the missed blocks"
        );
        // --repair: point 3 from the same snapshot, equal to the device
        // (nothing writes to it now).
        let mut rep = vs.to_vec();
        rep.push("--repair");
        let out = run("blksnapctl", &rep);
        check_eq!(out.code, 3, "verify --source --repair exit code");
        if !out.stdout.contains("REPAIRED: point 3") {
            fail!(
                "verify --source --repair: no `REPAIRED: point 3` in {:?}",
                out.stdout
            );
        }
        let truth = sha_prefix(lo.backing(), size)?;
        let m3 = manifest_of(&dir, &name, 3)?;
        check_eq!(
            m3["method"].as_str(),
            Some("digest"),
            "method of the repair point"
        );
        check_eq!(
            m3["backing"].as_str(),
            Some("point-0002.qcow2"),
            "backing of point 3"
        );
        check_eq!(
            m3["missed"],
            serde_json::json!([[blk, blk + 65536]]),
            "missed in point 3's manifest"
        );
        let p3 = dir.join(&name).join("point-0003.qcow2");
        restore_check(&dir, &name, 3, &raw, size, &truth, Some(&p3))?;
        verify(&dir, &name, &[1, 2, 3])?;
        let out = ctl_ok(&vs)?;
        if !out.contains("none missed") {
            fail!("verify --source after the repair: {out:?}");
        }
        // backup incremental --verify-source: a second unseen write (and a
        // seen one) go into the point, with a warning.
        let y = 20 * MIB + 28 * 1024;
        write_behind(lo.backing(), y, 4096, 0x5a)?;
        write_pattern(&src, 12 * MIB / SECTOR, 16, 0x54)?;
        let (p4, o, stderr) = backup_with("incremental", &src, &dir, &["--verify-source"])?;
        check_eq!(p4.point, 4, "point of the checked incremental");
        check_eq!(
            o["method"].as_str(),
            Some("cbt"),
            "method of the checked incremental"
        );
        if !stderr.contains("WARNING") || !stderr.contains("MISSED 1 blocks") {
            fail!("no loud warning of the missed block on stderr: {stderr:?}");
        }
        let yb = y / 65536 * 65536;
        check_eq!(
            o["verified"]["missed"],
            serde_json::json!([{
                "block": yb / 65536,
                "start": yb,
                "end": yb + 65536,
                "differ": [[y, y + 4096]],
            }]),
            "the missed blocks the incremental reports"
        );
        check_eq!(
            manifest_of(&dir, &name, 4)?["missed"],
            serde_json::json!([[yb, yb + 65536]]),
            "missed in point 4's manifest"
        );
        check_eq!(
            p4.sha,
            sha_prefix(lo.backing(), size)?,
            "point 4's snapshot image against the backing file"
        );
        restore_check(&dir, &name, 4, &raw, size, &p4.sha, Some(&p4.file))?;
        verify(&dir, &name, &[1, 2, 3, 4])?;
        let out = ctl_ok(&vs)?;
        if !out.contains("none missed") {
            fail!("verify --source after the checked incremental: {out:?}");
        }
        // The raw layout: a --verify-source incremental updates the image
        // in place with the unseen write too.
        let rdir = dir.join("raw");
        let rd = rdir.to_str().unwrap().to_string();
        let rargs = |kind: &str| {
            vec![
                "--json".to_string(),
                "backup".into(),
                kind.into(),
                sd.clone(),
                "--store".into(),
                store.clone(),
                "--to".into(),
                rd.clone(),
                "--format".into(),
                "raw".into(),
            ]
        };
        let a = rargs("full");
        ctl_ok(&a.iter().map(String::as_str).collect::<Vec<_>>())?;
        let z = 30 * MIB + 4096;
        write_behind(lo.backing(), z, 4096, 0x77)?;
        write_pattern(&src, 16 * MIB / SECTOR, 8, 0x55)?;
        let mut a = rargs("incremental");
        a.push("--verify-source".into());
        let out = run(
            "blksnapctl",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        check_eq!(out.code, 0, "raw --verify-source incremental exit code");
        let v: Value =
            serde_json::from_str(&out.stdout).map_err(|err| format!("{err}: {}", out.stdout))?;
        let zb = z / 65536 * 65536;
        check_eq!(
            v["devices"][0]["verified"]["missed"],
            serde_json::json!([{
                "block": zb / 65536,
                "start": zb,
                "end": zb + 65536,
                "differ": [[z, z + 4096]],
            }]),
            "the missed blocks of the raw incremental"
        );
        if !out.stderr.contains("MISSED 1 blocks") {
            fail!("no warning of the raw incremental: {:?}", out.stderr);
        }
        check_eq!(
            sha_prefix(&rdir.join(format!("{name}.img")), size)?,
            sha_prefix(lo.backing(), size)?,
            "the raw image after the checked incremental against the device"
        );
        ctl_ok(&[
            "verify",
            rdir.join(format!("{name}.img")).to_str().unwrap(),
            "--manifest",
            rdir.join(format!("{name}.manifest.json")).to_str().unwrap(),
        ])?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The identity a point records, and what an incremental does when the
/// device's differs: point 1's manifest is edited to name another disk of
/// the same size; the next incremental must not trust the change map (it
/// reads the whole device, method digest, and says why) and equals the
/// device; point 2 records the device's real identity, so the one after it
/// uses the map again; a manifest without an identity means digests too.
fn incremental_checks_identity() -> TestResult {
    let src = disk("blksnap-c")?;
    let name = name_of(&src);
    let size = dev::size_sectors(&src)? * SECTOR;
    let serial = dev::sysfs_attr(&src, "serial")?;
    let id = format!("serial={serial},sectors={}", size / SECTOR);
    let other = format!("serial=blksnap-x,sectors={}", size / SECTOR);
    let dir = dev::scratch().join("pt-id");
    let raw = dev::scratch().join("pt-id.raw");
    let _ = std::fs::remove_dir_all(&dir);
    let edit = |n: u64, identity: Option<&str>| -> TestResult {
        let p = dir.join(&name).join(format!("point-{n:04}.json"));
        let mut m = manifest_of(&dir, &name, n)?;
        match identity {
            Some(i) => m["identity"] = i.into(),
            None => m["identity"] = Value::Null,
        }
        println!(
            "    (point {n}'s manifest now says identity {:?})",
            identity
        );
        std::fs::write(&p, m.to_string()).map_err(|err| err.to_string())
    };
    let r = (|| {
        let _t = track(&src)?;
        write_pattern(&src, 0, size / SECTOR, 0x61)?;
        backup("full", &src, &dir)?;
        edit(1, Some(&other))?;
        write_pattern(&src, MIB / SECTOR, 8, 0x62)?;
        let (p2, o, stderr) = backup_with("incremental", &src, &dir, &[])?;
        check_eq!(
            o["method"].as_str(),
            Some("digest"),
            "method of the incremental after the identity changed"
        );
        let why = format!(
            "identity of {} is {id}, point 1 was made of {other}",
            src.display()
        );
        if !stderr.contains(&why) {
            fail!("no `{why}` in {stderr:?}");
        }
        check_eq!(
            (
                o["copied"]["read"].as_u64(),
                o["copied"]["written"].as_u64()
            ),
            (Some(size), Some(65536)),
            "bytes read and written by the digest incremental"
        );
        restore_check(&dir, &name, 2, &raw, size, &p2.sha, Some(&p2.file))?;
        check_eq!(
            manifest_of(&dir, &name, 2)?["identity"]
                .as_str()
                .map(str::to_string),
            Some(id.clone()),
            "the identity point 2 records"
        );
        // The same device as point 2's: the change map again.
        write_pattern(&src, 3 * MIB / SECTOR, 8, 0x63)?;
        let (p3, o, _) = backup_with("incremental", &src, &dir, &[])?;
        check_eq!(
            o["method"].as_str(),
            Some("cbt"),
            "method of the next incremental"
        );
        check_eq!(o["copied"]["read"].as_u64(), Some(4096), "bytes read by it");
        restore_check(&dir, &name, 3, &raw, size, &p3.sha, None)?;
        // No identity recorded: not proven, digests.
        edit(3, None)?;
        write_pattern(&src, 5 * MIB / SECTOR, 8, 0x64)?;
        let (p4, o, stderr) = backup_with("incremental", &src, &dir, &[])?;
        check_eq!(
            o["method"].as_str(),
            Some("digest"),
            "method without a recorded identity"
        );
        if !stderr.contains("point 3 records no identity of its device") {
            fail!("no reason given for the digest method: {stderr:?}");
        }
        restore_check(&dir, &name, 4, &raw, size, &p4.sha, Some(&p4.file))?;
        verify(&dir, &name, &[1, 2, 3, 4])
    })();
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// A whole disk whose partition carries a device-mapper device (as an LVM
/// logical volume on a PV partition) with a mounted ext4 on it, and a
/// mounted ext4 on its other partition: the kernel's take freezes the
/// disk's partitions, not what is stacked over them, so `blksnapctl
/// backup` freezes the stacked file system around the take. In the
/// snapshot image it must then be clean, as an unmounted one: no journal
/// to recover (`needs_recovery` is set on disk for as long as an ext4 is
/// mounted, and cleared by a freeze), e2fsck -fn clean, and a file
/// written just before the backup and never synced must be there whole.
/// The JSON report names the stacked mount point as frozen, not the
/// partition's (the kernel froze that).
fn freezes_stacked_file_systems() -> TestResult {
    let disk_b = disk("blksnap-b")?;
    let p1 = dev::partition(&disk_b, 1);
    let p2 = dev::partition(&disk_b, 2);
    let p1_start: u64 = dev::sysfs_attr(&p1, "start")?
        .parse()
        .map_err(|err| format!("start of {}: {err}", p1.display()))?;
    let p1_sectors = dev::size_sectors(&p1)?;
    let scratch = dev::scratch();
    let dir = scratch.join("pt-freeze");
    let lv_mnt = scratch.join("pt-freeze-lv");
    let part_mnt = scratch.join("pt-freeze-part");
    let _ = std::fs::remove_dir_all(&dir);
    for m in [&lv_mnt, &part_mnt] {
        std::fs::create_dir_all(m).map_err(|err| err.to_string())?;
    }
    let lv = "blksnap-lvlike";
    let snap_lv = "blksnap-lvlike-image";
    let lv_dev = format!("/dev/mapper/{lv}");
    let snap_dev = format!("/dev/mapper/{snap_lv}");
    let table = format!("0 {p1_sectors} linear {} 0", p1.display());
    check_eq!(
        run("dmsetup", &["create", lv, "--table", &table]).code,
        0,
        "dmsetup create {lv}"
    );
    let mut id = None;
    let r = (|| {
        dev::run("mkfs.ext4", &["-q", "-F", &lv_dev])?;
        dev::run("mkfs.ext4", &["-q", "-F", p2.to_str().unwrap()])?;
        let _t = track(&disk_b)?;
        dev::run("mount", &[&lv_dev, lv_mnt.to_str().unwrap()])?;
        dev::run("mount", &[p2.to_str().unwrap(), part_mnt.to_str().unwrap()])?;
        let r = (|| {
            // Written, not synced: in the page cache until a freeze (or
            // the writeback, seconds later) sends it to the disk.
            let mut rng = Rng(0xf4ee2e);
            let mut buf = vec![0u8; 2 << 20];
            fill(&mut buf, &mut rng);
            std::fs::write(lv_mnt.join("unsynced"), &buf).map_err(|err| err.to_string())?;
            let want = crate::snap::sha256(&lv_mnt.join("unsynced"))?;
            let store = dev::scratch();
            let args = [
                "--json",
                "backup",
                "full",
                disk_b.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
                "--limit",
                "256M",
                "--to",
                dir.to_str().unwrap(),
                "--keep-snapshot",
            ];
            let out = run("blksnapctl", &args);
            check_eq!(out.code, 0, "blksnapctl backup full");
            let v: Value = serde_json::from_str(&out.stdout)
                .map_err(|err| format!("not JSON ({err}): {}", out.stdout))?;
            id = v["snapshot"].as_str().map(str::to_string);
            let frozen: Vec<&str> = v["frozen"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let image = v["devices"][0]["image"]
                .as_str()
                .ok_or_else(|| format!("no image in {v}"))?
                .to_string();
            // The stacked device as it is in the image: the same table
            // over the image (which has no partitions of its own).
            let table = format!("0 {p1_sectors} linear {image} {p1_start}");
            check_eq!(
                run(
                    "dmsetup",
                    &["create", "--readonly", snap_lv, "--table", &table]
                )
                .code,
                0,
                "dmsetup create {snap_lv}"
            );
            let r = (|| {
                let out = run("dumpe2fs", &["-h", &snap_dev]);
                check_eq!(out.code, 0, "dumpe2fs -h {snap_dev}");
                let features = out
                    .stdout
                    .lines()
                    .find(|l| l.starts_with("Filesystem features:"))
                    .unwrap_or_default()
                    .to_string();
                if features.contains("needs_recovery") {
                    fail!("the stacked ext4 in the snapshot needs journal recovery (not frozen at the take): {features}");
                }
                let out = run("e2fsck", &["-fn", &snap_dev]);
                check_eq!(
                    out.code,
                    0,
                    "e2fsck -fn of the stacked ext4 in the snapshot"
                );
                let out = run(
                    "debugfs",
                    &["-R", "dump /unsynced /run/blksnap/unsynced.out", &snap_dev],
                );
                check_eq!(out.code, 0, "debugfs dump of the unsynced file");
                let got = crate::snap::sha256(Path::new("/run/blksnap/unsynced.out"));
                let _ = std::fs::remove_file("/run/blksnap/unsynced.out");
                check_eq!(
                    got?,
                    want,
                    "sha256 of the file written unsynced just before the take, in the snapshot"
                );
                Ok(())
            })();
            let d = run("dmsetup", &["remove", snap_lv]);
            r?;
            check_eq!(d.code, 0, "dmsetup remove {snap_lv}");
            check_eq!(
                frozen,
                vec![lv_mnt.to_str().unwrap()],
                "file systems frozen besides the kernel's (the report's `frozen`)"
            );
            Ok(())
        })();
        if let Some(id) = &id {
            let _ = ctl_ok(&["snapshot", "destroy", id]);
        }
        let u1 = dev::run("umount", &[lv_mnt.to_str().unwrap()]);
        let u2 = dev::run("umount", &[part_mnt.to_str().unwrap()]);
        r?;
        u1?;
        u2.map(|_| ())
    })();
    let d = run("dmsetup", &["remove", lv]);
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    check_eq!(d.code, 0, "dmsetup remove {lv}");
    Ok(())
}
