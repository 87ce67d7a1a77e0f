// SPDX-License-Identifier: GPL-2.0

//! CBT maps saved to a state device at shutdown and restored at the next
//! boot: three boots of the same disks (`tests/qemu/run.sh reboot`), one
//! phase each. Disks: `blksnap-p` (64 MiB), the tracked data disk,
//! `blksnap-s` (16 MiB), the state device, and `blksnap-k`, an ext4 file
//! system (run.sh makes it) that keeps the backup chain across the boots:
//! written over 9p, a 64 MiB backup took 85 s under TCG, on a disk of its
//! own a few seconds. What a phase must tell the next one (the device
//! name, the generation, the blocks written) and a copy of each manifest
//! are on the host, in `$BLKSNAP_RESULTS/backups`.
//!
//! - boot 1: format the state device, fill the disk, persist (nothing
//!   saved), a full backup, then the writes W1, then `cbt save`: the state
//!   header says clean. Nothing writes the disk after that (guest.sh leaves
//!   the module loaded: a detach would break the seal, as at a real
//!   shutdown, where the machine powers off with the filter attached).
//! - boot 2: the state is clean and is consumed when the state device is
//!   opened; persist restores the map (generation of boot 1's full backup,
//!   the CBT blocks of W1 changed); the writes W2; the incremental uses the
//!   map and copies only the CBT blocks of W1 and W2; the image equals the
//!   device. Then (test `reboot_power_cut_boot2`, run by guest.sh after the
//!   kmemleak scan) a writer, a marker line, and run.sh kills QEMU.
//! - boot 3: the state is not clean, persist refuses it (ESTALE), the
//!   incremental reads the whole device by digest and equals it; then
//!   `cbt save` seals the disk and the first write breaks the seal.
//!
//! These tests run only when a filter starts with `reboot_` (guest.sh
//! reboot): they need run.sh's reboot disks and their boot.

use crate::backup::same;
use crate::dev::{self, SECTOR};
use crate::snap::{disk, e, pattern, sha256, write_pattern, Rng};
use crate::{check_eq, fail, TestResult};
use blksnap::backup::{self, Manifest, Method, Status};
use blksnap::{MapKind, Tracker};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The phases; guest.sh runs those of one boot by the prefix
/// `reboot_bootN_` (and the power cut alone, by its name).
pub const ALL: &[Test] = &[
    ("reboot_boot1_full_backup_then_writes_then_save", boot1),
    ("reboot_boot2_restored_map_drives_the_incremental", boot2),
    ("reboot_power_cut_boot2", power_cut),
    (
        "reboot_boot3_unclean_state_refused_digest_incremental",
        boot3,
    ),
    ("reboot_boot3_first_write_after_save_breaks_the_seal", seal),
];

/// The id the data disk's CBT is saved under.
const ID: &str = "blksnap-p";
/// The data disk's size.
const DATA_BYTES: u64 = 64 << 20;
/// The state device's size.
const STATE_BYTES: u64 = 16 << 20;
/// The 4 KiB blocks written in boot 1 after the full backup, before the save.
const W1: &[u64] = &[3, 1000, 5000, 9001, 16383];
/// The 4 KiB blocks written in boot 2 after the restore: one in a CBT block
/// of W1 (1001 beside 1000), one a block of W1 again (5000).
const W2: &[u64] = &[17, 1001, 5000, 7777, 12000];
/// Pattern seeds: the fill, W1, W2, the power cut writer, the seal write.
const SEED_FILL: u64 = 101;
const SEED_W1: u64 = 102;
const SEED_W2: u64 = 103;
const SEED_CUT: u64 = 104;
const SEED_SEAL: u64 = 105;
/// The 4 KiB block of the seal write in boot 3.
const SEAL_BLOCK: u64 = 4242;
/// Two small disks whose saved states boot 2 must refuse: blksnap-q is
/// written between its attach and its persist; run.sh grows blksnap-r from
/// 8 to 12 MiB between boots 1 and 2.
const REFUSED: [(&str, &str); 2] = [("blksnap-q", "EBUSY"), ("blksnap-r", "EMEDIUMTYPE")];

/// The line run.sh waits for to cut the power.
pub const MARKER: &str = "power-cut-now";

/// The data disk and the state device.
fn disks() -> Result<(PathBuf, PathBuf), String> {
    let (p, s) = (disk("blksnap-p")?, disk("blksnap-s")?);
    check_eq!(
        dev::size_sectors(&p)? * SECTOR,
        DATA_BYTES,
        "size of the data disk {}",
        p.display()
    );
    check_eq!(
        dev::size_sectors(&s)? * SECTOR,
        STATE_BYTES,
        "size of the state device {}",
        s.display()
    );
    Ok((p, s))
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

/// Writes what a later boot must know, one `key value...` line each, to
/// `backups/NAME`.
fn save_facts(name: &str, facts: &[(&str, String)]) -> TestResult {
    let path = facts_dir()?.join(name);
    let text: String = facts.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    // On the host's file system (9p): written through before a power cut.
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads what [`save_facts`] wrote in an earlier boot.
fn load_facts(name: &str) -> Result<BTreeMap<String, String>, String> {
    let path = facts_dir()?.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (did the earlier boot's phase pass?)",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn fact<'a>(facts: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str, String> {
    facts
        .get(key)
        .map(|s| s.as_str())
        .ok_or_else(|| format!("no `{key}` in the facts of the earlier boot"))
}

fn blocks_str(blocks: &[u64]) -> String {
    blocks
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The backup disk (serial `blksnap-k`, ext4) mounted while this lives; the
/// backups are in its directory `backups`.
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

/// The data disk must have the name it had in boot 1: the backup files are
/// named after it.
fn same_name(facts: &BTreeMap<String, String>, data: &Path) -> TestResult {
    check_eq!(
        fact(facts, "data")?,
        data.to_str().unwrap(),
        "the data disk's node (boot 1's backups are named after it)"
    );
    Ok(())
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

/// A number of a JSON reply.
fn num(v: &Value, key: &str) -> Result<u64, String> {
    v[key]
        .as_u64()
        .ok_or_else(|| format!("no number `{key}` in {v}"))
}

/// A string of a JSON reply.
fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v[key]
        .as_str()
        .ok_or_else(|| format!("no string `{key}` in {v}"))
}

/// What `cbt state-device` said: (records, clean).
fn state_device(state: &Path, format: bool) -> Result<(u64, bool), String> {
    let mut args = vec!["cbt", "state-device", state.to_str().unwrap()];
    if format {
        args.push("--format");
    }
    let v = ctl(&args)?;
    let clean = v["clean"]
        .as_bool()
        .ok_or_else(|| format!("cbt state-device: no `clean` in {v}"))?;
    Ok((num(&v, "records")?, clean))
}

/// What `cbt persist` said: (restored, refused, generation).
fn persist(data: &Path) -> Result<(bool, Option<String>, String), String> {
    persist_as(data, ID)
}

/// `cbt persist` of `dev` under `id`.
fn persist_as(dev: &Path, id: &str) -> Result<(bool, Option<String>, String), String> {
    let v = ctl(&["cbt", "persist", dev.to_str().unwrap(), "--id", id])?;
    let restored = v["restored"]
        .as_bool()
        .ok_or_else(|| format!("cbt persist: no `restored` in {v}"))?;
    let refused = v["refused"].as_str().map(str::to_string);
    Ok((restored, refused, text(&v, "generation")?.to_string()))
}

/// `cbt save`: the number of devices saved.
fn save() -> Result<u64, String> {
    num(&ctl(&["cbt", "save"])?, "devices")
}

/// Whether the state device's header says clean: magic `BLKSNAPS` at byte
/// 0, flags (u32 LE) at byte 12, bit 0. Read with O_DIRECT (the kernel
/// writes it past the page cache), without O_EXCL (the module holds it).
fn header_clean(state: &Path) -> Result<bool, String> {
    let b = dev::read_direct(state, 0, 8)?;
    if &b[..8] != b"BLKSNAPS" {
        fail!(
            "no state header on {}: the first bytes are {:02x?}",
            state.display(),
            &b[..16]
        );
    }
    let flags = u32::from_le_bytes(b[12..16].try_into().unwrap());
    Ok(flags & 1 != 0)
}

/// `blksnapctl backup KIND DATA` into the backups directory; returns the
/// device's outcome from the JSON report. A copy of the manifest goes to the
/// host as `backups/NAME.manifest.json`.
fn backup(b: &Backups, kind: &str, data: &Path, name: &str) -> Result<Value, String> {
    let store = dev::scratch().join("reboot-store");
    std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
    let dir = &b.dir;
    let v = ctl(&[
        "backup",
        kind,
        data.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--limit",
        "256M",
        "--to",
        dir.to_str().unwrap(),
        "--format",
        "raw",
    ])?;
    let o = v["devices"][0].clone();
    if o.is_null() {
        fail!("backup {kind}: no device in the report {v}");
    }
    let (_, manifest, _) = backup::paths(dir, data);
    let copy = facts_dir()?.join(format!("{name}.manifest.json"));
    std::fs::copy(&manifest, &copy).map_err(|e| format!("{}: {e}", copy.display()))?;
    println!(
        "    backup {kind}: {} by {}, read {} bytes, wrote {}",
        o["kind"], o["method"], o["copied"]["read"], o["copied"]["written"]
    );
    Ok(o)
}

/// The manifest of the data disk's backups.
fn manifest(b: &Backups, data: &Path) -> Result<(PathBuf, Manifest), String> {
    let (img, manifest, _) = backup::paths(&b.dir, data);
    let m = Manifest::load(&manifest)?;
    check_eq!(
        m.status,
        Status::Complete,
        "status of {}",
        manifest.display()
    );
    Ok((img, m))
}

/// The CBT blocks of `block_size` bytes that 4 KiB blocks fall in.
fn coarse(blocks: &BTreeSet<u64>, block_size: u64) -> BTreeSet<u64> {
    blocks.iter().map(|b| b * 4096 / block_size).collect()
}

/// Writes the pattern `seed` over the 4 KiB blocks `blocks`.
fn write_blocks(data: &Path, blocks: &[u64], seed: u64) -> TestResult {
    for b in blocks {
        write_pattern(data, b * 8, 8, seed)?;
    }
    Ok(())
}

/// Checks that each 4 KiB block of `blocks` of `file` holds pattern `seed`.
fn has_blocks(file: &Path, blocks: &[u64], seed: u64) -> TestResult {
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (mut got, mut want) = (vec![0u8; 4096], vec![0u8; 4096]);
    for &b in blocks {
        f.read_exact_at(&mut got, b * 4096)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        pattern(&mut want, b * 8, seed);
        if got != want {
            fail!(
                "{}: 4 KiB block {b} does not hold the pattern {seed}",
                file.display()
            );
        }
    }
    Ok(())
}

fn boot1() -> TestResult {
    let clock = Clock(Instant::now());
    let (data, state) = disks()?;
    let b = Backups::mount()?;
    let (records, _) = state_device(&state, true)?;
    check_eq!(
        records,
        0,
        "saved states on the state device just formatted"
    );
    let sectors = dev::size_sectors(&data)?;
    write_pattern(&data, 0, sectors, SEED_FILL)?;
    clock.step("state device formatted, data disk filled");
    let (restored, refused, generation) = persist(&data)?;
    check_eq!(
        (restored, refused),
        (false, None),
        "cbt persist with nothing saved: (restored, refused)"
    );
    for (serial, _) in REFUSED {
        let (restored, refused, _) = persist_as(&disk(serial)?, serial)?;
        check_eq!(
            (restored, refused),
            (false, None),
            "cbt persist of {serial} with nothing saved: (restored, refused)"
        );
    }
    let o = backup(&b, "full", &data, "boot1-full")?;
    clock.step("full backup");
    check_eq!(text(&o, "method")?, "full", "method of the full backup");
    let (img, m) = manifest(&b, &data)?;
    check_eq!(m.method, Some(Method::Full), "the manifest's method");
    check_eq!(
        m.generation,
        generation,
        "the full backup's generation (cbt persist said)"
    );
    same(&img, &data, sectors * SECTOR)?;
    clock.step("the image equals the device");
    write_blocks(&data, W1, SEED_W1)?;
    // The map before the save: W1's CBT blocks, changed after the backup.
    let t = Tracker::open(&data).map_err(e)?;
    let info = t.cbt_info().map_err(e)?;
    let bs = u64::from(info.block_size);
    let map = t.read_cbt_map(MapKind::Active).map_err(e)?;
    drop(t);
    let changed: BTreeSet<u64> = (0..map.len() as u64)
        .filter(|&i| map[i as usize] > m.snapshot_number)
        .collect();
    check_eq!(
        changed,
        coarse(&W1.iter().copied().collect(), bs),
        "CBT blocks changed since the full backup (W1)"
    );
    save_facts(
        "boot1",
        &[
            ("data", data.to_str().unwrap().to_string()),
            ("generation", generation.clone()),
            ("block_size", bs.to_string()),
            ("snapshot_number", m.snapshot_number.to_string()),
            ("w1", blocks_str(W1)),
        ],
    )?;
    check_eq!(save()?, 3, "devices saved by cbt save");
    check_eq!(
        header_clean(&state)?,
        true,
        "state header clean after the save"
    );
    println!(
        "    saved: generation {generation}, CBT blocks of {bs} bytes, W1 {:?} in CBT blocks {:?}",
        W1, changed
    );
    // Nothing writes the data disk from here on.
    Ok(())
}

fn boot2() -> TestResult {
    let clock = Clock(Instant::now());
    let (data, state) = disks()?;
    let b = Backups::mount()?;
    let facts = load_facts("boot1")?;
    same_name(&facts, &data)?;
    let (records, clean) = state_device(&state, false)?;
    check_eq!(
        (records, clean),
        (3, true),
        "cbt state-device after a clean shutdown: (records, clean)"
    );
    // Saved clean, and refused all the same: q was written after its attach
    // and before its persist, r changed size.
    for (serial, why) in REFUSED {
        let dev = disk(serial)?;
        let t = Tracker::open(&dev).map_err(e)?;
        t.attach().map_err(e)?;
        if serial == "blksnap-q" {
            dev::write_direct(&dev, 0, 8, 0x77)?;
        }
        let (restored, refused, _) = persist_as(&dev, serial)?;
        t.detach().map_err(e)?;
        check_eq!(
            (restored, refused.as_deref()),
            (false, Some(why)),
            "cbt persist of {serial}: (restored, refused)"
        );
        println!("    {serial}: saved state refused with {why}");
    }
    check_eq!(
        header_clean(&state)?,
        false,
        "state header clean once the state device was opened (consumed)"
    );
    let (restored, refused, generation) = persist(&data)?;
    check_eq!(
        (restored, refused),
        (true, None),
        "cbt persist of the saved state: (restored, refused)"
    );
    let (img, m) = manifest(&b, &data)?;
    check_eq!(
        generation,
        m.generation,
        "restored generation (boot 1's full backup's)"
    );
    check_eq!(
        generation.as_str(),
        fact(&facts, "generation")?,
        "restored generation (boot 1's)"
    );
    let t = Tracker::open(&data).map_err(e)?;
    let info = t.cbt_info().map_err(e)?;
    let bs = u64::from(info.block_size);
    check_eq!(
        bs.to_string(),
        fact(&facts, "block_size")?.to_string(),
        "CBT block size"
    );
    check_eq!(info.generation, generation, "generation in CBTINFO");
    let map = t.read_cbt_map(MapKind::Active).map_err(e)?;
    drop(t);
    let w1: BTreeSet<u64> = W1.iter().copied().collect();
    let changed: BTreeSet<u64> = (0..map.len() as u64)
        .filter(|&i| map[i as usize] > m.snapshot_number)
        .collect();
    check_eq!(
        changed,
        coarse(&w1, bs),
        "restored map: CBT blocks changed since the full backup (W1)"
    );
    write_blocks(&data, W2, SEED_W2)?;
    let o = backup(&b, "incremental", &data, "boot2-incremental")?;
    clock.step("incremental backup");
    check_eq!(
        (text(&o, "kind")?, text(&o, "method")?),
        ("incremental", "cbt"),
        "the incremental after the restore: (kind, method)"
    );
    let all: BTreeSet<u64> = w1.iter().chain(W2).copied().collect();
    let read = num(&o["copied"], "read")?;
    let (low, high) = (all.len() as u64 * 4096, coarse(&all, bs).len() as u64 * bs);
    println!(
        "    incremental read {read} bytes: W1 and W2 are {} blocks of 4 KiB ({low} bytes) in {} CBT blocks ({high} bytes)",
        all.len(),
        coarse(&all, bs).len()
    );
    if read < low || read > high {
        fail!(
            "the incremental read {read} bytes; want from {low} (the 4 KiB blocks of W1 and W2) to {high} (their CBT blocks)"
        );
    }
    let (_, m2) = manifest(&b, &data)?;
    check_eq!(m2.method, Some(Method::Cbt), "the manifest's method");
    check_eq!(m2.generation, generation, "the manifest's generation");
    check_eq!(m2.bytes_read, read, "the manifest's bytes read");
    // Block by block first, for a clearer failure than a checksum.
    let w1_only: Vec<u64> = W1.iter().filter(|b| !W2.contains(b)).copied().collect();
    has_blocks(&img, &w1_only, SEED_W1)?;
    has_blocks(&img, W2, SEED_W2)?;
    same(&img, &data, DATA_BYTES)?;
    clock.step("the image equals the device");
    save_facts(
        "boot2",
        &[("w2", blocks_str(W2)), ("image_sha256", sha256(&img)?)],
    )
}

/// The power cut: a writer of random 4 KiB blocks to the data disk
/// (O_DIRECT), the marker once it has written some, then its progress every
/// half second. run.sh kills QEMU after the marker; if it does not within
/// 60 s, this fails.
fn power_cut() -> TestResult {
    let (data, _) = disks()?;
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
                    let b = rng.below(DATA_BYTES / 4096);
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
    let (data, state) = disks()?;
    let b = Backups::mount()?;
    let facts = load_facts("boot1")?;
    same_name(&facts, &data)?;
    let (records, clean) = state_device(&state, false)?;
    check_eq!(
        (records, clean),
        (3, false),
        "cbt state-device after a power cut: (records, clean)"
    );
    let (restored, refused, generation) = persist(&data)?;
    check_eq!(
        (restored, refused.as_deref()),
        (false, Some("ESTALE")),
        "cbt persist of a state not saved clean: (restored, refused)"
    );
    if generation == fact(&facts, "generation")? {
        fail!("the refused state's generation {generation} is in use");
    }
    let (img, before) = manifest(&b, &data)?;
    let o = backup(&b, "incremental", &data, "boot3-incremental")?;
    clock.step("incremental backup");
    check_eq!(
        (text(&o, "kind")?, text(&o, "method")?),
        ("incremental", "digest"),
        "the incremental after the refusal: (kind, method)"
    );
    check_eq!(
        num(&o["copied"], "read")?,
        DATA_BYTES,
        "bytes the digest incremental read"
    );
    if num(&o["copied"], "written")? == 0 {
        fail!("the digest incremental wrote nothing, but boot 2's writer changed blocks");
    }
    let (_, m) = manifest(&b, &data)?;
    check_eq!(m.method, Some(Method::Digest), "the manifest's method");
    check_eq!(m.generation, generation, "the manifest's generation");
    if m.generation == before.generation {
        fail!("the manifest's generation did not change");
    }
    same(&img, &data, DATA_BYTES)?;
    clock.step("the image equals the device");
    Ok(())
}

/// `cbt save` seals the data disk: the first write after it passes (at
/// once) and leaves the state header not clean. The disk is detached at the
/// end, whatever happened, so that the module can unload.
fn seal() -> TestResult {
    let (data, state) = disks()?;
    let r = (|| {
        check_eq!(save()?, 1, "devices saved by cbt save");
        check_eq!(
            header_clean(&state)?,
            true,
            "state header clean after the save"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let d = data.clone();
        let start = Instant::now();
        std::thread::spawn(move || {
            let _ = tx.send(write_pattern(&d, SEAL_BLOCK * 8, 8, SEED_SEAL));
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
            header_clean(&state)?,
            false,
            "state header clean after a write to the sealed disk"
        );
        has_blocks(&data, &[SEAL_BLOCK], SEED_SEAL)
    })();
    let detached = dev::run("blksnapctl", &["detach", data.to_str().unwrap()]);
    r?;
    detached.map(|_| ())
}
