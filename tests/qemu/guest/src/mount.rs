// SPDX-License-Identifier: GPL-2.0

//! Instant access to a point (`blksnapctl mount` / `umount`) and the daily
//! backup job (`blksnapctl job run`), through the command line and the
//! real tools (qemu-nbd, LVM, mount), with a transcript in the log.

use crate::dev::{self, SECTOR};
use crate::points::{ctl_fails, ctl_json, ctl_ok, name_of, run, track, write_file};
use crate::snap::{disk, sha256, write_pattern, Rng};
use crate::{check_eq, fail, TestResult};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

type Test = (&'static str, fn() -> TestResult);

/// The tests, in the order they run.
pub const ALL: &[Test] = &[
    (
        "mount_points_with_partitions_and_a_clashing_lvm_vg",
        points_with_partitions_and_lvm,
    ),
    (
        "job_runs_full_incremental_prunes_and_records_failures",
        job_runs,
    ),
];

/// LVM without udev (the guest has none to answer); its metadata backups
/// in the scratch directory (not in the host's /etc/lvm, which the guest
/// shares read-only).
fn lvm_config() -> String {
    format!(
        "activation {{ udev_sync = 0 udev_rules = 0 }} devices {{ obtain_device_list_from_udev = 0 }} backup {{ backup = 1 backup_dir = \"{}/lvm-backup\" archive = 0 }}",
        dev::scratch().display()
    )
}

/// `lvm CMD --config ... ARGS`, which must succeed; its stdout. Printed
/// with its output, where a `WARNING:` of LVM shows as `WARNING,` (the
/// harness takes the first for a kernel report).
fn lvm(cmd: &str, args: &[&str]) -> Result<String, String> {
    let config = lvm_config();
    let mut a = vec![cmd, "--config", &config];
    a.extend_from_slice(args);
    println!("    $ lvm {}", a.join(" "));
    let o = std::process::Command::new("lvm")
        .args(&a)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|e| format!("lvm: {e}"))?;
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).replace("WARNING:", "WARNING,"),
    );
    for l in out.lines().chain(err.lines()) {
        println!("      {l}");
    }
    if !o.status.success() {
        fail!("lvm {}: {}: {}", a.join(" "), o.status, err.trim());
    }
    Ok(out)
}

/// `mkfs.xfs`: xfsprogs 6 refuses file systems below 300 MB unless run by
/// fstests (these variables), and these partitions are smaller.
fn mkfs_xfs(dev: &str) -> TestResult {
    println!("    $ mkfs.xfs -q -f {dev}");
    let o = std::process::Command::new("mkfs.xfs")
        .args(["-q", "-f", dev])
        .env("TEST_DIR", "1")
        .env("TEST_DEV", "1")
        .env("QA_CHECK_FS", "1")
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        fail!("mkfs.xfs {dev}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// The nbd devices connected now.
fn nbd_connected() -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("nbd") && Path::new(&format!("/sys/block/{n}/pid")).exists())
        .collect()
}

/// The device-mapper devices, by name.
fn dm_names() -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("dm/name")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// The mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&d))
        .map(str::to_string)
        .collect()
}

/// What `blksnapctl mount` keeps in its state directory (but its lock).
fn state_files() -> Vec<String> {
    std::fs::read_dir("/run/blksnap/mounts")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n != ".lock")
        .collect()
}

/// Nothing of a mount is left: no nbd device connected, no dm device of
/// a clone, nothing mounted under the mount points, no state or overlay,
/// the mount points empty.
fn nothing_left(mps: &[&Path], what: &str) -> TestResult {
    let nbd = nbd_connected();
    let dm: Vec<String> = dm_names()
        .into_iter()
        .filter(|n| n.contains("_point"))
        .collect();
    let mut mounted = Vec::new();
    let mut inside = Vec::new();
    for mp in mps {
        mounted.extend(mounts_under(mp));
        inside.extend(
            std::fs::read_dir(mp)
                .map_err(|e| format!("{}: {e}", mp.display()))?
                .flatten()
                .map(|e| e.path().display().to_string()),
        );
    }
    let state = state_files();
    let vgs: Vec<String> = lvm("vgs", &["--noheadings", "-o", "vg_name"])?
        .split_whitespace()
        .filter(|n| n.contains("_point"))
        .map(str::to_string)
        .collect();
    if !nbd.is_empty()
        || !dm.is_empty()
        || !vgs.is_empty()
        || !mounted.is_empty()
        || !state.is_empty()
        || !inside.is_empty()
    {
        fail!(
            "{what}: left behind: nbd connected {nbd:?}, dm devices {dm:?}, volume groups {vgs:?}, mounts {mounted:?}, state files {state:?}, in the mount points {inside:?}"
        );
    }
    println!("    {what}: nothing left (no nbd connected, no clone dm device or volume group, no mount, no state or overlay)");
    Ok(())
}

/// SHA-256 of every file of a directory tree, by relative path.
fn sums(dir: &Path) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            let p = e.path();
            let t = e.file_type().map_err(|e| e.to_string())?;
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if rel == "lost+found" {
                continue;
            }
            if t.is_dir() {
                todo.push(p);
            } else if t.is_file() {
                out.insert(rel, sha256(&p)?);
            }
        }
    }
    Ok(out)
}

/// The file systems of the test disk, as (name under a point's mount
/// point, live mount point).
struct Live {
    fs: Vec<(&'static str, PathBuf)>,
}

impl Live {
    /// The files of each file system: `name/file` -> SHA-256.
    fn sums(&self) -> Result<BTreeMap<String, String>, String> {
        let mut out = BTreeMap::new();
        for (name, mnt) in &self.fs {
            for (f, s) in sums(mnt)? {
                out.insert(format!("{name}/{f}"), s);
            }
        }
        Ok(out)
    }
}

/// The files under a point's mount point, for the names of `live` and p5.
fn point_sums(mp: &Path, live: &Live) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for name in live.fs.iter().map(|f| f.0).chain(["p5"]) {
        let d = mp.join(name);
        if !d.is_dir() {
            fail!("{}: not mounted", d.display());
        }
        for (f, s) in sums(&d)? {
            out.insert(format!("{name}/{f}"), s);
        }
    }
    Ok(out)
}

/// A disk (256 MiB, GPT) with an ext4 partition, an XFS one, a swap one,
/// an LVM physical volume of the volume group `bsvg` with an ext4 volume
/// `data`, all mounted (the volume group active) while the points of the
/// disk are mounted: the clones of `bsvg` must not clash with it; and p5,
/// not mounted, an ext4 that needs its journal replayed (a file only in
/// its journal at the take).
/// Points 1 (full) and 2 (incremental), the files' checksums listed at
/// each; then the disk changes again. Both points are mounted at once
/// and hold what was listed; the live volume group keeps its UUID, its
/// file system stays writable; umount leaves nothing. Then what fails
/// leaves nothing either: a mount point not empty, a point that does not
/// exist, a tampered chain, a failure midway (`--fail-after lvm`); an umount while a file is open there fails,
/// keeps what is left, and a second umount finishes.
fn points_with_partitions_and_lvm() -> TestResult {
    let d = disk("blksnap-a")?;
    let ds = d.to_str().unwrap().to_string();
    let scratch = dev::scratch();
    let dir = scratch.join("mnt-backup");
    let live_root = scratch.join("mnt-live");
    let mp1 = scratch.join("mnt-point1");
    let mp2 = scratch.join("mnt-point2");
    let _ = std::fs::remove_dir_all(&dir);
    for m in [&mp1, &mp2] {
        std::fs::create_dir_all(m).map_err(|e| e.to_string())?;
    }
    // GPT: ext4, xfs, swap, LVM.
    let table = "label: gpt\nsize=32MiB, type=linux\nsize=64MiB, type=linux\nsize=4MiB, type=swap\nsize=80MiB, type=lvm\ntype=linux\n";
    println!("    $ sfdisk {ds} <<< {table:?}");
    let mut child = std::process::Command::new("sfdisk")
        .args(["--quiet", "--wipe", "always", &ds])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), table.as_bytes())
        .map_err(|e| e.to_string())?;
    if !child.wait().map_err(|e| e.to_string())?.success() {
        fail!("sfdisk {ds}");
    }
    let _ = dev::run("partx", &["-u", &ds]);
    std::fs::create_dir_all(scratch.join("lvm-backup")).map_err(|e| e.to_string())?;
    let part = |n| dev::partition(&d, n).to_str().unwrap().to_string();
    let (p1, p2, p3, p4, p5) = (part(1), part(2), part(3), part(4), part(5));
    for p in [&p1, &p2, &p3, &p4, &p5] {
        if !Path::new(p).exists() {
            fail!("{p} did not appear");
        }
    }
    dev::run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &p1,
        ],
    )?;
    mkfs_xfs(&p2)?;
    dev::run("mkswap", &[&p3])?;
    lvm("pvcreate", &["--devices", &p4, "-ff", "-y", &p4])?;
    lvm("vgcreate", &["--devices", &p4, "bsvg", &p4])?;
    lvm(
        "lvcreate",
        &[
            "--devices",
            &p4,
            "-y",
            "-Wy",
            "-Zy",
            "-L",
            "40M",
            "-n",
            "data",
            "bsvg",
        ],
    )?;
    let lv = "/dev/mapper/bsvg-data".to_string();
    dev::run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &lv,
        ],
    )?;
    let vg_uuid = || -> Result<String, String> {
        Ok(lvm(
            "vgs",
            &["--devices", &p4, "--noheadings", "-o", "vg_uuid", "bsvg"],
        )?
        .trim()
        .to_string())
    };
    let uuid_before = vg_uuid()?;
    let live = Live {
        fs: vec![
            ("p1", live_root.join("p1")),
            ("p2", live_root.join("p2")),
            ("bsvg-data", live_root.join("lv")),
        ],
    };
    for (src, (_, mnt)) in [&p1, &p2, &lv].into_iter().zip(&live.fs) {
        std::fs::create_dir_all(mnt).map_err(|e| e.to_string())?;
        dev::run("mount", &[src, mnt.to_str().unwrap()])?;
    }
    let t = track(&d)?;
    let r = (|| {
        let mut rng = Rng(0x006d_6f75_6e74);
        let backup = |kind: &str| -> Result<BTreeMap<String, String>, String> {
            let s = live.sums()?;
            let store = dev::scratch();
            ctl_ok(&[
                "backup",
                kind,
                &ds,
                "--store",
                store.to_str().unwrap(),
                "--limit",
                "256M",
                "--to",
                dir.to_str().unwrap(),
            ])?;
            Ok(s)
        };
        // Point 1.
        for (name, mnt) in &live.fs {
            for (f, len) in [("a", 300 << 10), ("b", 2 << 20), ("sub-c", 64 << 10)] {
                let p = if f == "sub-c" {
                    std::fs::create_dir_all(mnt.join("sub")).map_err(|e| e.to_string())?;
                    mnt.join("sub/c")
                } else {
                    mnt.join(f)
                };
                write_file(&p, len + name.len(), &mut rng)?;
            }
        }
        // p5: a file system whose last file is only in its journal at the
        // take (as after a crash; nothing is mounted on it, so nothing
        // freezes it): a crash copy of the live volume's, made with
        // direct I/O after a file was written and fsynced there (its
        // blocks in place, its inode and directory entry committed to the
        // journal only). The point must show that file, whole: a mount
        // without the journal replay (ext4 noload) would not.
        let lvmnt = live_root.join("lv");
        dev::run("sync", &["-f", lvmnt.to_str().unwrap()])?;
        write_file(&lvmnt.join("journal-only"), (96 << 10) + 5, &mut rng)?;
        let crash = sums(&lvmnt)?;
        dev::run(
            "dd",
            &[
                &format!("if={lv}"),
                &format!("of={p5}"),
                "bs=1M",
                "iflag=direct",
                "oflag=direct",
                "status=none",
            ],
        )?;
        // Before the take: the copy needs its journal replayed, and
        // without the replay the file is not there whole (debugfs reads
        // what is in place).
        let features = dev::run("dumpe2fs", &["-h", &p5])?;
        let needs_recovery = features
            .lines()
            .any(|l| l.starts_with("Filesystem features") && l.contains("needs_recovery"));
        let in_place = std::process::Command::new("debugfs")
            .args(["-R", "cat /journal-only", &p5])
            .output()
            .map_err(|e| format!("debugfs: {e}"))?;
        let in_place_file = scratch.join("journal-only.in-place");
        std::fs::write(&in_place_file, &in_place.stdout).map_err(|e| e.to_string())?;
        let in_place_sum = sha256(&in_place_file)?;
        let _ = std::fs::remove_file(&in_place_file);
        if !needs_recovery || in_place_sum == crash["journal-only"] {
            fail!(
                "the crash copy on {p5} is not as after a crash: needs_recovery {needs_recovery}, journal-only in place without the replay: {} bytes, sha256 {in_place_sum} (want other than {})",
                in_place.stdout.len(),
                crash["journal-only"]
            );
        }
        println!(
            "    {p5}: a crash copy of the live volume: needs_recovery; without the replay journal-only reads {} bytes (sha256 {}), not its {} bytes",
            in_place.stdout.len(),
            &in_place_sum[..16],
            (96 << 10) + 5
        );
        let sums1 = backup("full")?;
        // Point 2: a rewritten, b removed, d new.
        for (_, mnt) in &live.fs {
            write_file(&mnt.join("a"), 200 << 10, &mut rng)?;
            std::fs::remove_file(mnt.join("b")).map_err(|e| e.to_string())?;
            write_file(&mnt.join("d"), 1 << 20, &mut rng)?;
        }
        let sums2 = backup("incremental")?;
        // p5 did not change between the points.
        let (mut sums1, mut sums2) = (sums1, sums2);
        for (f, h) in &crash {
            sums1.insert(format!("p5/{f}"), h.clone());
            sums2.insert(format!("p5/{f}"), h.clone());
        }
        // The disk changes again: the points must not.
        for (_, mnt) in &live.fs {
            write_file(&mnt.join("a"), 100 << 10, &mut rng)?;
            write_file(&mnt.join("e"), 100 << 10, &mut rng)?;
        }
        // p1, p2: a, b, sub/c; the volume and p5 also journal-only. Then
        // b removed, d new.
        check_eq!(sums1.len(), 14, "files listed at point 1");
        check_eq!(sums2.len(), 14, "files listed at point 2");
        println!(
            "    point 1: {} files, point 2: {} files listed",
            sums1.len(),
            sums2.len()
        );

        let d_s = dir.to_str().unwrap();
        let v1 = ctl_json(&["mount", "--point", "1", d_s, mp1.to_str().unwrap()])?;
        let v2 = ctl_json(&["mount", "--point", "2", d_s, mp2.to_str().unwrap()])?;
        let r = (|| {
            for (v, n) in [(&v1, 1), (&v2, 2)] {
                let names: Vec<&str> = v["mounts"]
                    .as_array()
                    .ok_or("no mounts")?
                    .iter()
                    .filter_map(|m| m["name"].as_str())
                    .collect();
                check_eq!(
                    names,
                    vec!["p1", "p2", "p5", "bsvg-data"],
                    "file systems mounted of point {n}"
                );
                let skipped = v["skipped"].to_string();
                if !skipped.contains("p3") || !skipped.contains("swap") {
                    fail!("point {n}: the swap partition is not listed as skipped: {skipped}");
                }
                let want = format!("bsvg_point{n}");
                check_eq!(
                    v["vgs"][0]["clone"].as_str(),
                    Some(want.as_str()),
                    "clone of point {n}"
                );
            }
            check_eq!(point_sums(&mp1, &live)?, sums1, "the files of point 1");
            check_eq!(point_sums(&mp2, &live)?, sums2, "the files of point 2");
            println!(
                "    the files of points 1 and 2 as listed at their backups (p5/journal-only {})",
                &sums1["p5/journal-only"][..16]
            );
            // Read-only.
            for mp in [&mp1, &mp2] {
                for (name, _) in &live.fs {
                    let f = mp.join(name).join("new");
                    match std::fs::write(&f, b"x") {
                        Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => {}
                        r => fail!("{}: write: {r:?}, want EROFS", f.display()),
                    }
                }
            }
            // The live volume group: the same UUID, active, writable, and
            // its clones have others.
            write_file(&live_root.join("lv/during"), 64 << 10, &mut rng)?;
            let vgs = lvm("vgs", &["--noheadings", "-o", "vg_name,vg_uuid"])?;
            let live_line = vgs
                .lines()
                .find(|l| l.split_whitespace().next() == Some("bsvg"))
                .ok_or_else(|| format!("no bsvg in {vgs}"))?;
            if !live_line.contains(&uuid_before) {
                fail!("the live volume group is now {live_line}, was {uuid_before}");
            }
            for n in [1, 2] {
                let line = vgs
                    .lines()
                    .find(|l| l.split_whitespace().next() == Some(&format!("bsvg_point{n}")))
                    .ok_or_else(|| format!("no bsvg_point{n} in {vgs}"))?;
                if line.contains(&uuid_before) {
                    fail!("bsvg_point{n} has the live volume group's UUID: {line}");
                }
            }
            // umount of a busy file system fails, keeps what is left.
            let held = std::fs::File::open(mp1.join("p2/a")).map_err(|e| e.to_string())?;
            ctl_fails(&["umount", mp1.to_str().unwrap()], 1, "tries again")?;
            drop(held);
            Ok(())
        })();
        let u1 = ctl_ok(&["umount", mp1.to_str().unwrap()]);
        let u2 = ctl_ok(&["umount", mp2.to_str().unwrap()]);
        r?;
        u1?;
        u2?;
        nothing_left(&[&mp1, &mp2], "after umount")?;
        check_eq!(vg_uuid()?, uuid_before, "the live volume group's UUID");
        check_eq!(
            sha256(&live_root.join("lv/during")).is_ok(),
            true,
            "the file written to the live volume during the mounts"
        );

        // What fails leaves nothing.
        std::fs::write(mp1.join("x"), b"x").map_err(|e| e.to_string())?;
        ctl_fails(
            &["mount", "--point", "1", d_s, mp1.to_str().unwrap()],
            1,
            "not empty",
        )?;
        std::fs::remove_file(mp1.join("x")).map_err(|e| e.to_string())?;
        ctl_fails(
            &["mount", "--point", "9", d_s, mp1.to_str().unwrap()],
            1,
            "point 9",
        )?;
        nothing_left(&[&mp1], "after the refusals")?;
        // A failure midway (the clone activated, nothing mounted yet):
        // the undo goes all the way back. (The undo of the mounts is
        // umount's, above.)
        ctl_fails(
            &[
                "mount",
                "--point",
                "1",
                d_s,
                mp1.to_str().unwrap(),
                "--fail-after",
                "lvm",
            ],
            1,
            "undone: nothing is left of the mount",
        )?;
        nothing_left(
            &[&mp1],
            "after a failure midway (volume group cloned and active)",
        )?;
        // A tampered chain: point 2 rebased onto the live partition.
        let chain = dir.join(name_of(&d));
        let tampered = scratch.join("mnt-tampered");
        let _ = std::fs::remove_dir_all(&tampered);
        dev::run(
            "cp",
            &["-a", chain.to_str().unwrap(), tampered.to_str().unwrap()],
        )?;
        dev::run(
            "qemu-img",
            &[
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-b",
                &p1,
                "-F",
                "raw",
                tampered.join("point-0002.qcow2").to_str().unwrap(),
            ],
        )?;
        ctl_fails(
            &[
                "mount",
                "--point",
                "2",
                tampered.to_str().unwrap(),
                mp1.to_str().unwrap(),
            ],
            1,
            "refusing to read the chain",
        )?;
        nothing_left(&[&mp1], "after the tampered chain")?;
        let _ = std::fs::remove_dir_all(&tampered);
        Ok(())
    })();
    drop(t);
    for (_, mnt) in &live.fs {
        let _ = dev::run("umount", &[mnt.to_str().unwrap()]);
    }
    let _ = lvm("vgchange", &["--devices", &p4, "-an", "bsvg"]);
    // The disk as the other tests expect it: no partitions.
    let _ = dev::run("wipefs", &["-a", "-q", &p5, &p4, &p3, &p2, &p1]);
    let _ = dev::run("sfdisk", &["--quiet", "--delete", &ds]);
    let _ = dev::run("wipefs", &["-a", "-q", &ds]);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&live_root);
    r
}

/// The daily job, three runs and two failures: the first run makes a full
/// backup, the next incrementals; with `keep 2` the third prunes point 1;
/// each run's result line in `backup list`; points 2 and 3 restore to
/// the device's content. A missing store fails (exit 1, one line on
/// stderr) and `backup list` says so; a missing backup directory fails
/// without making it.
fn job_runs() -> TestResult {
    let src = disk("blksnap-c")?;
    let ss = src.to_str().unwrap().to_string();
    let size = dev::size_sectors(&src)? * SECTOR;
    let scratch = dev::scratch();
    let dir = scratch.join("job-backup");
    let moved = scratch.join("job-backup-unmounted");
    let conf = scratch.join("daily.conf");
    let restored = scratch.join("job-restored.raw");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let d_s = dir.to_str().unwrap().to_string();
    let job = |store: &str| {
        format!("# the test's job\ndevice {ss}\nstore {store}\nlimit 64M\nto {d_s}\nkeep 2\n")
    };
    std::fs::write(&conf, job(scratch.to_str().unwrap())).map_err(|e| e.to_string())?;
    let c = conf.to_str().unwrap().to_string();
    let t = track(&src)?;
    let r = (|| {
        let name = name_of(&src);
        let last = || -> Result<String, String> {
            let text = ctl_ok(&["backup", "list", &d_s])?;
            text.lines()
                .last()
                .map(str::to_string)
                .ok_or_else(|| "backup list printed nothing".into())
        };
        let record = || -> Result<Value, String> {
            let t =
                std::fs::read_to_string(dir.join("last-run.json")).map_err(|e| e.to_string())?;
            serde_json::from_str(&t).map_err(|e| e.to_string())
        };
        let mut sums = Vec::new();
        for run_no in 1..=3u64 {
            write_pattern(&src, (run_no - 1) * 2048, 2048, 40 + run_no)?;
            sums.push(sha256(&src)?);
            let out = ctl_ok(&["job", "run", &c])?;
            let kind = if run_no == 1 { "full" } else { "incremental" };
            let want = format!("{kind} backup ({name} point {run_no})");
            if !out.contains("job daily, ") || !out.contains(&want) {
                fail!("run {run_no}: {out:?} does not say `{want}`");
            }
            let v = record()?;
            check_eq!(v["status"].as_str(), Some("ok"), "run {run_no}: status");
            check_eq!(
                v["points"][0]["point"].as_u64(),
                Some(run_no),
                "run {run_no}: point"
            );
            let removed = v["pruned"][0]["removed"].clone();
            let want_removed = if run_no == 3 {
                serde_json::json!([1])
            } else {
                serde_json::json!([])
            };
            check_eq!(removed, want_removed, "run {run_no}: points pruned");
            let pruned = if run_no == 3 {
                "pruned 1 point"
            } else {
                "pruned 0 points"
            };
            if !out.trim_end().ends_with(pruned) {
                fail!("run {run_no}: {out:?} does not end with `{pruned}`");
            }
        }
        // `backup list` ends with the last run's line (and after the
        // failures, below, with theirs).
        let l = last()?;
        if !l.starts_with("last run: job daily, ")
            || !l.contains(" ok in ")
            || !l.contains(&format!("incremental backup ({name} point 3)"))
            || !l.ends_with("pruned 1 point")
        {
            fail!("backup list after run 3 ends with {l:?}");
        }
        // keep 2: points 2 and 3 are left; point 3 is the device.
        let points: Vec<u64> = ctl_json(&["backup", "list", &d_s])?
            .as_array()
            .ok_or("not a list")?
            .iter()
            .filter_map(|p| p["point"].as_u64())
            .collect();
        check_eq!(points, vec![2, 3], "points kept");
        // A store that does not exist: failed, recorded, one line.
        std::fs::write(&conf, job("/run/blksnap/no-such-store")).map_err(|e| e.to_string())?;
        let out = run("blksnapctl", &["job", "run", &c]);
        check_eq!(out.code, 1, "exit code of the run with a missing store");
        let lines: Vec<&str> = out.stderr.lines().collect();
        if lines.len() != 1
            || !lines[0].starts_with("blksnapctl: job daily: ")
            || !lines[0].contains("no-such-store")
        {
            fail!("stderr of the failed run: {:?}", out.stderr);
        }
        let l = last()?;
        if !l.contains(" FAILED after ") || !l.contains("no-such-store") {
            fail!("backup list after the failed run ends with {l:?}");
        }
        let status = record()?;
        check_eq!(
            status["status"].as_str(),
            Some("failed"),
            "status of the failed run"
        );
        // The backup directory gone (a backup disk not mounted): failed,
        // and not made.
        std::fs::write(&conf, job(scratch.to_str().unwrap())).map_err(|e| e.to_string())?;
        std::fs::rename(&dir, &moved).map_err(|e| e.to_string())?;
        let out = run("blksnapctl", &["job", "run", &c]);
        let made = dir.exists();
        std::fs::rename(&moved, &dir).map_err(|e| e.to_string())?;
        check_eq!(
            out.code,
            1,
            "exit code of the run without its backup directory"
        );
        check_eq!(made, false, "the backup directory made by the failed run");
        let lines: Vec<&str> = out.stderr.lines().collect();
        if lines.len() != 1 || !lines[0].contains("not mounted?") {
            fail!(
                "stderr of the run without its backup directory: {:?}",
                out.stderr
            );
        }
        // The chain is as it was.
        let points: Vec<u64> = ctl_json(&["backup", "list", &d_s])?
            .as_array()
            .ok_or("not a list")?
            .iter()
            .filter_map(|p| p["point"].as_u64())
            .collect();
        check_eq!(points, vec![2, 3], "points after the failed runs");
        // Points 2 (point 1 merged into it by the prune) and 3 are the
        // device at runs 2 and 3.
        for n in [2usize, 3] {
            let _ = std::fs::remove_file(&restored);
            ctl_ok(&[
                "restore",
                "--point",
                &n.to_string(),
                &d_s,
                restored.to_str().unwrap(),
            ])?;
            check_eq!(
                std::fs::metadata(&restored)
                    .map_err(|e| e.to_string())?
                    .len(),
                size,
                "size of point {n} restored"
            );
            check_eq!(
                sha256(&restored)?,
                sums[n - 1],
                "point {n} restored, against the device at run {n}"
            );
        }
        let _ = std::fs::remove_file(&restored);
        Ok(())
    })();
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&moved);
    let _ = std::fs::remove_file(&conf);
    r
}
