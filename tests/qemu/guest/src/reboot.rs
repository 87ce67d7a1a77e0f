// SPDX-License-Identifier: GPL-2.0

//! CBT saved to a state device at shutdown and restored at the next boot,
//! and every way that must not be trusted (issue 21): three boots of the
//! same disks (`tests/qemu/run.sh reboot`), one phase each. The tracked
//! disks (serials `rb-*`, 32 MiB unless said) each play one part; their CBT
//! ids are their slots (`/dev/vdX` as at boot 1), as a by-path id or the
//! default id would be:
//!
//! | disk       | content | between boots 1 and 2          | boot 2 verdict |
//! |------------|---------|--------------------------------|----------------|
//! | `ctl`      | ext4    | nothing                        | restored       |
//! | `host`     | ext4    | the host writes a file into its image (debugfs -w) | EKEYREJECTED |
//! | `early`    | ext4    | boot 2 mounts and writes it before the attach | EBUSY |
//! | `swapa/b`  | ext4    | the two swap slots             | EXDEV          |
//! | `stale`    | ext4    | an incremental after the save, no save after | ESTALE |
//! | `raw`      | pattern | nothing (nothing proves it)    | ENOKEY         |
//! | `rawok`    | pattern | nothing; `accept-missed-writes`| restored       |
//! | `seal`     | pattern | a write after the save while the state device fails (its mirror does not) | ESTALE |
//! | `q` (8M)   | pattern | boot 2 writes it after its attach, before its persist | EBUSY |
//! | `r` (8M)   | pattern | the host grows it to 12 MiB    | EMEDIUMTYPE    |
//!
//! The state device is `/dev/mapper/rbstate`, linear over `blksnap-s`
//! (16 MiB), with a mirror on `blksnap-m`; `blksnap-k`, ext4, keeps the
//! backup chains (restore points) across the boots.
//!
//! - boot 1: format the state device and its mirror, `cbt boot`, a full
//!   backup of every disk, the writes W1 (files on ext4, patterns on the
//!   raw disks) with every file system unmounted after, `cbt save` (as at
//!   shutdown), then the incremental of `stale` and, the state device
//!   failing (dm `error`), a write to `seal`. The boot ends without a
//!   detach (a power-off).
//! - boot 2: the early write and the write to `q`, then `cbt boot`: each
//!   verdict as in the table; the writes W2; an incremental of every disk:
//!   `cbt` for the restored ones, `digest` (or `full` for `r`) for the
//!   others; every new point, restored to a file, equals its device. Then
//!   a writer on `rawok` and a power cut.
//! - boot 3: the state was consumed at boot 2 and not saved since: every
//!   saved state is refused (ESTALE); a digest incremental of `rawok`
//!   equals the device; a save, and the first write after it breaks the
//!   seal of that device only.
//!
//! With `BLKSNAP_TEST_OLD_MODULE=1` the state has no mirror and no line
//! accepts missed writes (to run the test against a module without them).
//!
//! These tests run only when a filter starts with `reboot_` (guest.sh
//! reboot): they need run.sh's reboot disks and their boot.

use crate::dev::{self, SECTOR};
use crate::persist::record_usable;
use crate::snap::{disk, pattern, sha256, write_pattern, Rng};
use crate::{check_eq, fail, TestResult};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The phases; guest.sh runs those of one boot by the prefix
/// `reboot_bootN_` (and the power cut alone, by its name).
pub const ALL: &[Test] = &[
    ("reboot_boot1_full_backups_writes_save", boot1),
    ("reboot_boot2_verdicts", boot2_verdicts),
    ("reboot_boot2_incrementals_equal_the_devices", boot2_chains),
    ("reboot_power_cut_boot2", power_cut),
    (
        "reboot_boot3_unclean_state_refused_digest_incremental",
        boot3,
    ),
    ("reboot_boot3_first_write_after_save_breaks_the_seal", seal),
];

/// A tracked disk: its role (serial `rb-ROLE`), whether it holds ext4,
/// whether its `track` line accepts missed writes, and the verdict of
/// boot 2's `cbt boot` (`None`: restored).
struct Role {
    name: &'static str,
    ext4: bool,
    accept: bool,
    verdict: Option<&'static str>,
}

const ROLES: &[Role] = &[
    Role {
        name: "ctl",
        ext4: true,
        accept: false,
        verdict: None,
    },
    Role {
        name: "host",
        ext4: true,
        accept: false,
        verdict: Some("EKEYREJECTED"),
    },
    Role {
        name: "early",
        ext4: true,
        accept: false,
        verdict: Some("EBUSY"),
    },
    Role {
        name: "swapa",
        ext4: true,
        accept: false,
        verdict: Some("EXDEV"),
    },
    Role {
        name: "swapb",
        ext4: true,
        accept: false,
        verdict: Some("EXDEV"),
    },
    Role {
        name: "stale",
        ext4: true,
        accept: false,
        verdict: Some("ESTALE"),
    },
    Role {
        name: "raw",
        ext4: false,
        accept: false,
        verdict: Some("ENOKEY"),
    },
    Role {
        name: "rawok",
        ext4: false,
        accept: true,
        verdict: None,
    },
    Role {
        name: "seal",
        ext4: false,
        accept: true,
        verdict: Some("ESTALE"),
    },
    Role {
        name: "q",
        ext4: false,
        accept: true,
        verdict: Some("EBUSY"),
    },
    Role {
        name: "r",
        ext4: false,
        accept: true,
        verdict: Some("EMEDIUMTYPE"),
    },
];

/// The state device's dm name and its size.
const STATE_DM: &str = "rbstate";
const STATE_BYTES: u64 = 16 << 20;
/// The 4 KiB blocks W1 and W2 write on the raw disks (the smallest is
/// 8 MiB: 2048 blocks).
const W1: &[u64] = &[3, 700, 1500, 2001];
const W2: &[u64] = &[17, 701, 1500, 1800];
/// Pattern seeds: the fill, W1, W2, the power cut writer, the seal write.
const SEED_FILL: u64 = 101;
const SEED_W1: u64 = 102;
const SEED_W2: u64 = 103;
const SEED_CUT: u64 = 104;
const SEED_SEAL: u64 = 105;
const SEED_SEAL6: u64 = 106;

/// The line run.sh waits for to cut the power.
pub const MARKER: &str = "power-cut-now";

fn role(name: &str) -> &'static Role {
    ROLES.iter().find(|r| r.name == name).unwrap()
}

/// The node of a role's disk now.
fn node(r: &Role) -> Result<PathBuf, String> {
    disk(&format!("rb-{}", r.name))
}

/// The host directory for what a phase tells the next ones:
/// `$BLKSNAP_RESULTS/backups`.
fn facts_dir() -> Result<PathBuf, String> {
    let dir = std::env::var_os("BLKSNAP_RESULTS")
        .map(|d| PathBuf::from(d).join("backups"))
        .ok_or("BLKSNAP_RESULTS is not set (guest.sh sets it)")?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Writes `text` to `backups/NAME` on the host, synced.
fn save_file(name: &str, text: &str) -> TestResult {
    let path = facts_dir()?.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn load_file(name: &str) -> Result<String, String> {
    let path = facts_dir()?.join(name);
    std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (did the earlier boot's phase pass?)",
            path.display()
        )
    })
}

/// Runs `blksnapctl --json ARGS`; it must exit 0 and print JSON.
fn ctl(args: &[&str]) -> Result<Value, String> {
    let out = std::process::Command::new("blksnapctl")
        .arg("--json")
        .args(args)
        .output()
        .map_err(|e| format!("blksnapctl: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        fail!(
            "blksnapctl {} ({}): {}{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_str(&stdout)
        .map_err(|e| format!("blksnapctl {}: not JSON ({e}): {stdout}", args.join(" ")))
}

/// The backup disk (serial `blksnap-k`, ext4) mounted while this lives; the
/// chains are in its directory `backups`.
struct Backups {
    mnt: PathBuf,
    dir: PathBuf,
}

impl Backups {
    fn mount() -> Result<Self, String> {
        let dev = disk("blksnap-k")?;
        let mnt = PathBuf::from("/run/blksnap-keep");
        std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
        dev::run("mount", &[dev.to_str().unwrap(), mnt.to_str().unwrap()])?;
        let dir = mnt.join("backups");
        let b = Self { mnt, dir };
        std::fs::create_dir_all(&b.dir).map_err(|e| format!("{}: {e}", b.dir.display()))?;
        Ok(b)
    }
}

impl Drop for Backups {
    fn drop(&mut self) {
        if let Err(err) = dev::run("umount", &[self.mnt.to_str().unwrap()]) {
            println!("    {err}");
        }
    }
}

/// Prints how long the phase has taken so far, after each step.
struct Clock(Instant);

impl Clock {
    fn step(&self, what: &str) {
        println!("    {:6.1} s: {what}", self.0.elapsed().as_secs_f64());
    }
}

/// `/dev/mapper/rbstate`, linear over the state disk.
fn state_dm() -> Result<PathBuf, String> {
    let s = disk("blksnap-s")?;
    let path = Path::new("/dev/mapper").join(STATE_DM);
    if !path.exists() {
        let table = format!("0 {} linear {} 0", STATE_BYTES / SECTOR, s.display());
        dev::run("dmsetup", &["create", STATE_DM, "--table", &table])?;
        dev::udev_settle();
    }
    Ok(path)
}

fn mirrored() -> bool {
    !crate::persist::old_module()
}

/// The configuration of `cbt boot`, with the slots of boot 1 as ids.
fn config_text() -> Result<String, String> {
    let mut s = format!("state /dev/mapper/{STATE_DM}");
    if mirrored() {
        s += &format!(" {}", disk("blksnap-m")?.display());
    }
    s += "\n";
    for r in ROLES {
        let n = node(r)?;
        s += &format!(
            "track {}{}\n",
            n.display(),
            if r.accept && !crate::persist::old_module() {
                " accept-missed-writes"
            } else {
                ""
            }
        );
    }
    Ok(s)
}

const CONFIG: &str = "/run/blksnap-cbt.conf";

/// `cbt boot --config` with the configuration boot 1 wrote; returns the
/// verdict of each id (`restored` or the errno's name).
fn cbt_boot() -> Result<BTreeMap<String, String>, String> {
    std::fs::write(CONFIG, load_file("cbt.conf")?).map_err(|e| e.to_string())?;
    let v = ctl(&["cbt", "boot", "--config", CONFIG])?;
    let mut out = BTreeMap::new();
    for d in v["devices"]
        .as_array()
        .ok_or(format!("no devices in {v}"))?
    {
        let id = d["id"].as_str().unwrap_or("?").to_string();
        let verdict = if d["restored"] == true {
            "restored".to_string()
        } else {
            d["refused"].as_str().unwrap_or("none saved").to_string()
        };
        out.insert(id, verdict);
    }
    Ok(out)
}

/// Writes the pattern `seed` over the 4 KiB blocks `blocks`.
fn write_blocks(data: &Path, blocks: &[u64], seed: u64) -> TestResult {
    for b in blocks {
        write_pattern(data, b * 8, 8, seed)?;
    }
    Ok(())
}

/// Mounts an ext4 disk, writes `name` (256 KiB of the pattern `seed`),
/// syncs, unmounts.
fn write_file(dev: &Path, name: &str, seed: u64) -> TestResult {
    let mnt = PathBuf::from("/run/rb-mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    dev::run("mount", &[dev.to_str().unwrap(), mnt.to_str().unwrap()])?;
    let r = (|| -> TestResult {
        let mut buf = vec![0u8; 256 << 10];
        pattern(&mut buf, 0, seed);
        let p = mnt.join(name);
        std::fs::write(&p, &buf).map_err(|e| format!("{}: {e}", p.display()))?;
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| e.to_string())
    })();
    let u = dev::run("umount", &[mnt.to_str().unwrap()]);
    r?;
    u.map(|_| ())
}

/// The writes W1 or W2 to a role's disk.
fn writes(r: &Role, dev: &Path, which: u64, seed: u64) -> TestResult {
    if r.ext4 {
        write_file(dev, &format!("w{which}"), seed)
    } else {
        write_blocks(dev, if which == 1 { W1 } else { W2 }, seed)
    }
}

/// `backup KIND` of `devs` (one snapshot) into the chains; returns each
/// device's outcome by node.
fn backup(b: &Backups, kind: &str, devs: &[PathBuf]) -> Result<BTreeMap<String, Value>, String> {
    let store = dev::scratch().join("reboot-store");
    std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
    let mut args = vec!["backup", kind];
    let names: Vec<String> = devs.iter().map(|d| d.display().to_string()).collect();
    args.extend(names.iter().map(|s| s.as_str()));
    let dir = b.dir.to_str().unwrap();
    args.extend([
        "--store",
        store.to_str().unwrap(),
        "--limit",
        "256M",
        "--to",
        dir,
    ]);
    let v = ctl(&args)?;
    let mut out = BTreeMap::new();
    for d in v["devices"]
        .as_array()
        .ok_or(format!("no devices in {v}"))?
    {
        out.insert(d["device"].as_str().unwrap_or("?").to_string(), d.clone());
    }
    Ok(out)
}

/// Restores point `point` of the chain of `dev` to a file and compares it
/// with the device; returns the line of the transcript.
fn point_equals_device(b: &Backups, dev: &Path, point: u64) -> Result<String, String> {
    let name = dev.file_name().unwrap().to_str().unwrap();
    let out = dev::scratch().join(format!("rb-restore-{name}.raw"));
    let _ = std::fs::remove_file(&out);
    let p = point.to_string();
    let v = ctl(&[
        "restore",
        "--point",
        &p,
        b.dir.to_str().unwrap(),
        out.to_str().unwrap(),
        "--device",
        name,
    ])?;
    let got = v["sha256"].as_str().unwrap_or("").to_string();
    let want = sha256(dev)?;
    let _ = std::fs::remove_file(&out);
    if got != want {
        fail!(
            "point {point} of {} ({got}) differs from the device ({want})",
            dev.display()
        );
    }
    Ok(format!("point {point} equals the device ({})", &want[..16]))
}

/// The index of a role's record on the state device: the order of the
/// `track` lines, which `cbt boot` registers in.
fn record_of(r: &Role) -> u32 {
    ROLES.iter().position(|x| x.name == r.name).unwrap() as u32
}

fn boot1() -> TestResult {
    let clock = Clock(Instant::now());
    let b = Backups::mount()?;
    let state = state_dm()?;
    let conf = config_text()?;
    save_file("cbt.conf", &conf)?;
    ctl(&["cbt", "state-device", state.to_str().unwrap(), "--format"])?;
    let m = disk("blksnap-m")?;
    if mirrored() {
        ctl(&[
            "cbt",
            "state-device",
            m.to_str().unwrap(),
            "--format",
            "--mirror",
        ])?;
    }
    let mut devs = Vec::new();
    for r in ROLES {
        let n = node(r)?;
        if !r.ext4 {
            write_pattern(&n, 0, dev::size_sectors(&n)?, SEED_FILL)?;
        }
        devs.push(n);
    }
    clock.step("state device formatted, raw disks filled");
    let verdicts = cbt_boot()?;
    for (id, v) in &verdicts {
        check_eq!(
            v.as_str(),
            "none saved",
            "cbt boot's verdict for {id} at boot 1"
        );
    }
    let fulls = backup(&b, "full", &devs)?;
    clock.step("full backups");
    for d in &devs {
        let o = &fulls[&d.display().to_string()];
        check_eq!(
            o["method"].as_str(),
            Some("full"),
            "method of {}",
            d.display()
        );
    }
    for (r, d) in ROLES.iter().zip(&devs) {
        writes(r, d, 1, SEED_W1)?;
    }
    clock.step("W1 written, file systems unmounted");
    // As the shutdown hook does, once nothing writes.
    let v = ctl(&["cbt", "save"])?;
    check_eq!(
        v["devices"].as_u64(),
        Some(ROLES.len() as u64),
        "devices saved"
    );
    // The checks from here on do not stop the phase: the scenario of boot
    // 2 is set up whatever they find (to run it against an older module).
    let mut wrong = Vec::new();
    let mut expect = |what: String, got: bool, want: bool| {
        if got != want {
            println!("    WRONG: {what}: got {got}, want {want}");
            wrong.push(what);
        }
    };
    for r in ROLES {
        expect(
            format!("{}'s record usable after the save", r.name),
            record_usable(&state, record_of(r))?,
            true,
        );
    }
    // An incremental after the save: the take breaks stale's seal, and
    // nothing saves again before the boot ends.
    let stale = node(role("stale"))?;
    let o = backup(&b, "incremental", std::slice::from_ref(&stale))?;
    println!(
        "    stale: incremental after the save: {} by {}",
        o[&stale.display().to_string()]["kind"],
        o[&stale.display().to_string()]["method"]
    );
    expect(
        "stale's record usable once its incremental (a take) after the save returned".into(),
        record_usable(&state, record_of(role("stale")))?,
        false,
    );
    expect(
        "ctl's record usable after stale's incremental".into(),
        record_usable(&state, record_of(role("ctl")))?,
        true,
    );
    // The state device fails; a write to seal goes on and is recorded on
    // the mirror only.
    let table = format!("0 {} error", STATE_BYTES / SECTOR);
    dev::run("dmsetup", &["suspend", STATE_DM])?;
    dev::run("dmsetup", &["load", STATE_DM, "--table", &table])?;
    dev::run("dmsetup", &["resume", STATE_DM])?;
    let seal = node(role("seal"))?;
    let start = Instant::now();
    write_pattern(&seal, 77 * 8, 8, SEED_SEAL6)?;
    println!(
        "    seal: a write after the save, the state device failing, took {} ms",
        start.elapsed().as_millis()
    );
    if mirrored() {
        expect(
            "seal's record usable on the mirror after the write".into(),
            record_usable(&m, record_of(role("seal")))?,
            false,
        );
        expect(
            "ctl's record usable on the mirror".into(),
            record_usable(&m, record_of(role("ctl")))?,
            true,
        );
    }
    clock.step("stale's incremental and seal's write after the save");
    // Nothing writes the tracked disks from here on: the boot ends with
    // them attached, as a power-off does.
    if !wrong.is_empty() {
        fail!("{}", wrong.join("; "));
    }
    Ok(())
}

fn boot2_verdicts() -> TestResult {
    let clock = Clock(Instant::now());
    state_dm()?;
    // Before the attach: the early disk is mounted and written (as fsck or
    // a remount would).
    write_file(&node(role("early"))?, "early", 7)?;
    // q is attached, then written, then persisted.
    let q = node(role("q"))?;
    dev::run("blksnapctl", &["attach", q.to_str().unwrap()])?;
    dev::write_direct(&q, 0, 8, 0x77)?;
    clock.step("early written before its attach, q after its attach");
    let verdicts = cbt_boot()?;
    clock.step("cbt boot");
    // The ids are the slots of boot 1: map them back to the roles.
    let conf = load_file("cbt.conf")?;
    let ids: Vec<&str> = conf
        .lines()
        .filter_map(|l| l.strip_prefix("track "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let mut wrong = Vec::new();
    for (r, id) in ROLES.iter().zip(ids) {
        let got = verdicts.get(id).map(|s| s.as_str()).unwrap_or("missing");
        let want = r.verdict.unwrap_or("restored");
        let now = node(r)?;
        println!(
            "    {:6} id {id} (now {}): {got}{}",
            r.name,
            now.display(),
            if got == want {
                String::new()
            } else {
                format!("   <- want {want}")
            }
        );
        if got != want {
            wrong.push(format!("{} {got} (want {want})", r.name));
        }
    }
    save_file(
        "boot2-verdicts",
        &verdicts
            .iter()
            .map(|(k, v)| format!("{k} {v}\n"))
            .collect::<String>(),
    )?;
    if !wrong.is_empty() {
        fail!("wrong verdicts: {}", wrong.join(", "));
    }
    Ok(())
}

fn boot2_chains() -> TestResult {
    let clock = Clock(Instant::now());
    let b = Backups::mount()?;
    let mut devs = Vec::new();
    for r in ROLES {
        let n = node(r)?;
        writes(r, &n, 2, SEED_W2)?;
        devs.push(n);
    }
    clock.step("W2 written");
    let incs = backup(&b, "incremental", &devs)?;
    clock.step("incrementals");
    let mut wrong = Vec::new();
    for (r, d) in ROLES.iter().zip(&devs) {
        let o = &incs[&d.display().to_string()];
        let method = o["method"].as_str().unwrap_or("?").to_string();
        let want = match (r.name, r.verdict) {
            ("r", _) => "full",
            (_, None) => "cbt",
            _ => "digest",
        };
        let point = o["point"].as_u64().unwrap_or(0);
        let line = match point_equals_device(&b, d, point) {
            Ok(l) => l,
            Err(e) => {
                wrong.push(format!("{}: {e}", r.name));
                format!("DIFFERS: {e}")
            }
        };
        println!(
            "    {:6} {}: incremental by {method} (read {}, wrote {}): {line}",
            r.name,
            d.display(),
            o["copied"]["read"],
            o["copied"]["written"]
        );
        if method != want {
            wrong.push(format!("{} by {method} (want {want})", r.name));
        }
    }
    clock.step("points restored and compared");
    if !wrong.is_empty() {
        fail!("{}", wrong.join("; "));
    }
    Ok(())
}

/// The power cut: a writer of random 4 KiB blocks to `rawok` (O_DIRECT),
/// the marker once it has written some, then its progress every half
/// second. run.sh kills QEMU after the marker; if it does not within 60 s,
/// this fails.
fn power_cut() -> TestResult {
    let data = node(role("rawok"))?;
    let bytes = dev::size_sectors(&data)? * SECTOR;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2u64)
        .map(|i| {
            let (data, stop, written) = (data.clone(), stop.clone(), written.clone());
            std::thread::spawn(move || -> TestResult {
                let f = dev::open_direct(&data, true)?;
                let mut buf = dev::AlignedBuf::new(4096, 0);
                let mut rng = Rng(0x05ee_dc07 + i);
                while !stop.load(Ordering::Relaxed) {
                    let b = rng.below(bytes / 4096);
                    pattern(buf.as_mut_slice(), b * 8, SEED_CUT);
                    f.write_all_at(buf.as_slice(), b * 4096)
                        .map_err(|e| format!("write at 4 KiB block {b}: {e}"))?;
                    written.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let start = Instant::now();
    while written.load(Ordering::Relaxed) < 32 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = (|| {
        let n = written.load(Ordering::Relaxed);
        if n < 32 {
            fail!("the writer wrote only {n} blocks in 30 s");
        }
        println!("    {MARKER}: writer at {n} blocks");
        let marked = Instant::now();
        while marked.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(500));
            println!(
                "    power cut pending: writer at {} blocks",
                written.load(Ordering::Relaxed)
            );
        }
        fail!("still running 60 s after the marker: the host did not cut the power")
    })();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().map_err(|_| "writer panicked".to_string())??;
    }
    r
}

fn boot3() -> TestResult {
    let clock = Clock(Instant::now());
    let b = Backups::mount()?;
    state_dm()?;
    let verdicts = cbt_boot()?;
    let stale: Vec<_> = verdicts.values().filter(|v| *v == "ESTALE").collect();
    println!(
        "    {} of {} saved states refused as not clean",
        stale.len(),
        verdicts.len()
    );
    for (id, v) in &verdicts {
        check_eq!(
            v.as_str(),
            "ESTALE",
            "the verdict for {id} after boot 2 consumed the state and lost power"
        );
    }
    let data = node(role("rawok"))?;
    let o = backup(&b, "incremental", std::slice::from_ref(&data))?;
    let o = &o[&data.display().to_string()];
    clock.step("incremental backup");
    check_eq!(
        (o["kind"].as_str(), o["method"].as_str()),
        (Some("incremental"), Some("digest")),
        "rawok's incremental after the refusal: (kind, method)"
    );
    if o["copied"]["written"].as_u64() == Some(0) {
        fail!("the digest incremental wrote nothing, but boot 2's writer changed blocks");
    }
    let line = point_equals_device(&b, &data, o["point"].as_u64().unwrap_or(0))?;
    println!("    rawok: {line}");
    Ok(())
}

/// `cbt save` seals the disks: the first write to `rawok` after it passes
/// (at once) and leaves its record broken, ctl's usable. Every disk is
/// detached at the end, whatever happened, so that the module can unload.
fn seal() -> TestResult {
    let state = state_dm()?;
    let data = node(role("rawok"))?;
    let r = (|| {
        check_eq!(
            ctl(&["cbt", "save"])?["devices"].as_u64(),
            Some(ROLES.len() as u64),
            "devices saved by cbt save"
        );
        let (rec, ctl_rec) = (record_of(role("rawok")), record_of(role("ctl")));
        check_eq!(
            (record_usable(&state, rec)?, record_usable(&state, ctl_rec)?),
            (true, true),
            "records (rawok, ctl) after the save"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let d = data.clone();
        let start = Instant::now();
        std::thread::spawn(move || {
            let _ = tx.send(write_pattern(&d, 4242 * 8, 8, SEED_SEAL));
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(r) => r?,
            Err(_) => fail!(
                "the first write after the save did not complete within 10 s; {}",
                dev::blocked_tasks()
            ),
        }
        println!(
            "    the first write after the save took {} ms",
            start.elapsed().as_millis()
        );
        check_eq!(
            (record_usable(&state, rec)?, record_usable(&state, ctl_rec)?),
            (false, true),
            "records (rawok, ctl) after a write to rawok"
        );
        let got = dev::read_direct(&data, 4242 * 8, 8)?;
        let mut want = vec![0u8; 4096];
        pattern(&mut want, 4242 * 8, SEED_SEAL);
        check_eq!(got == want, true, "the data of the held write");
        Ok(())
    })();
    let mut detached = Ok(String::new());
    for role in ROLES {
        if let Ok(n) = node(role) {
            let d = dev::run("blksnapctl", &["detach", n.to_str().unwrap()]);
            if detached.is_ok() {
                detached = d;
            }
        }
    }
    r?;
    detached.map(|_| ())
}
