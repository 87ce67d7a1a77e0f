// SPDX-License-Identifier: GPL-2.0

//! Host tests of the CLI and the backup library: argument parsing, manifests,
//! verification and incremental planning.

use blksnap::backup::{
    choose, copy_checked, copy_known, plan, sha256_file, total, verify, Choice, DigestFile,
    InPlace, Kind, Manifest, Method, Quiet, Status, FORMAT,
};
use blksnap::digest::{Digests, BLOCK};
use blksnap::identity::Identity;
use proptest::prelude::*;
use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blksnapctl"))
}

/// Runs `blksnapctl verify IMAGE --manifest M`.
fn verify_cli(img: &std::path::Path, manifest: &std::path::Path) -> std::process::Output {
    bin()
        .arg("verify")
        .arg(img)
        .arg("--manifest")
        .arg(manifest)
        .output()
        .unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blksnapctl-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn usage_errors_exit_with_2_and_help_has_examples() {
    for args in [
        &["backup", "full", "/dev/x"][..],
        &["backup", "full", "--store", "/s", "--to", "/d"],
        &["snapshot", "create"],
        &["cbt", "mark", "/dev/x", "12"],
        &["snapshot", "add", "not-a-uuid", "/dev/x"],
        &["nosuchcommand"],
        // verify --source needs --store; --repair and --store need it;
        // it checks one device's chain, not --device's or a raw image's.
        &["verify", "--source", "/dev/x", "/b"],
        &["verify", "/b", "--repair"],
        &["verify", "/b", "--store", "/s"],
        &[
            "verify", "--source", "/dev/x", "/b", "--store", "/s", "--device", "x",
        ],
        &[
            "verify",
            "--source",
            "/dev/x",
            "/b",
            "--store",
            "/s",
            "--manifest",
            "m",
        ],
        &[
            "backup",
            "incremental",
            "/dev/x",
            "--store",
            "/s",
            "--to",
            "/d",
            "--differential",
            "--verify-source",
        ],
    ] {
        let out = bin().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let help = bin().arg("--help").output().unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(
        text.contains("Examples:")
            && text.contains("backup incremental")
            && text.contains("verify --source"),
        "{text}"
    );
}

#[test]
fn missing_control_device_is_a_one_line_error() {
    // The host has no blksnap module: a clear, single line and status 1.
    let out = bin().arg("version").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/dev/blksnap-control"), "{err}");
}

#[test]
fn man_pages_and_completions_are_generated() {
    let d = tmp("man");
    let out = bin().args(["generate", "man"]).arg(&d).output().unwrap();
    assert!(out.status.success());
    let page = std::fs::read_to_string(d.join("blksnapctl-backup-incremental.1")).unwrap();
    assert!(page.contains("differential"), "{page}");
    let out = bin()
        .args(["generate", "completions", "bash"])
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("blksnapctl"));
    std::fs::remove_dir_all(d).ok();
}

fn manifest(image: &str, sha: &str, size: u64) -> Manifest {
    Manifest {
        format: FORMAT,
        device: "/dev/vdb".into(),
        dev: "254:16".into(),
        identity: Some("serial-1".into()),
        size,
        block_size: 65536,
        generation: "0d4f2a9c-0000-4000-8000-000000000001".into(),
        snapshot_number: 3,
        base_number: 1,
        kind: Kind::Incremental,
        status: Status::Complete,
        image: image.into(),
        sha256: sha.into(),
        bytes_read: 1 << 20,
        bytes_written: 1 << 20,
        ranges: vec![(0, 4096), (1 << 20, 8192)],
        method: Some(Method::Cbt),
        digests: Some(DigestFile {
            file: "vdb.digests".into(),
            algorithm: "blake3".into(),
            block_size: 65536,
            sha256: "cd".into(),
        }),
        point: None,
        image_format: None,
        backing: None,
        time: None,
        merged: false,
        merging: false,
        snapshot: None,
        missed: Vec::new(),
        lvm_origin: None,
    }
}

#[test]
fn manifests_round_trip() {
    let d = tmp("manifest");
    let m = manifest("vdb.img", "ab", 1 << 30);
    let p = d.join("vdb.manifest.json");
    m.store(&p).unwrap();
    assert_eq!(Manifest::load(&p).unwrap(), m);
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(
        text.contains("\"status\": \"complete\"") && text.contains("\"kind\": \"incremental\""),
        "{text}"
    );
    // A manifest of a version before methods and digests loads without
    // them (an incremental after a tracking restart then falls back to full).
    let mut old = manifest("vdb.img", "ab", 1 << 30);
    old.method = None;
    old.digests = None;
    let old_text = serde_json::to_string(&old).unwrap();
    assert!(!old_text.contains("digests") && !old_text.contains("method"));
    std::fs::write(&p, &old_text).unwrap();
    assert_eq!(Manifest::load(&p).unwrap(), old);
    // Unknown formats and garbage are refused with the file's name.
    std::fs::write(&p, text.replace("\"format\": 1", "\"format\": 9")).unwrap();
    assert!(Manifest::load(&p).unwrap_err().contains("format 9"));
    std::fs::write(&p, "{").unwrap();
    assert!(Manifest::load(&p).unwrap_err().contains("not a manifest"));
    std::fs::remove_dir_all(d).ok();
}

#[test]
fn verify_checks_size_status_and_checksum() {
    let d = tmp("verify");
    let img = d.join("vdb.img");
    let data: Vec<u8> = (0..(3u32 << 12)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let sum = sha256_file(&img, data.len() as u64).unwrap();
    let p = d.join("m.json");
    manifest("vdb.img", &sum, data.len() as u64)
        .store(&p)
        .unwrap();
    assert_eq!(verify(&img, &p).unwrap(), sum);
    let ok = verify_cli(&img, &p);
    assert!(ok.status.success());
    // One flipped byte.
    let mut bad = data.clone();
    bad[5000] ^= 1;
    std::fs::write(&img, &bad).unwrap();
    assert!(verify(&img, &p).unwrap_err().contains("checksum"));
    let out = verify_cli(&img, &p);
    assert_eq!(out.status.code(), Some(3));
    // An incomplete backup never verifies.
    std::fs::write(&img, &data).unwrap();
    let mut m = manifest("vdb.img", &sum, data.len() as u64);
    m.status = Status::InProgress;
    m.store(&p).unwrap();
    assert!(verify(&img, &p).unwrap_err().contains("did not complete"));
    std::fs::remove_dir_all(d).ok();
}

proptest! {
    /// The plan covers exactly the bytes of the blocks whose number is newer,
    /// clipped to the device.
    #[test]
    fn plan_copies_exactly_the_newer_blocks(
        map in prop::collection::vec(0u8..6, 0..300),
        since in 0u8..6,
        shift in 9u32..14,
        tail in 0u64..4096
    ) {
        let bs = 1u32 << shift;
        let size = (map.len() as u64 * u64::from(bs)).saturating_sub(tail.min(u64::from(bs) - 1));
        let extents = plan(&map, since, bs, size);
        let mut covered = vec![false; size as usize];
        let mut last_end = None;
        for &(s, l) in &extents {
            prop_assert!(l > 0 && s + l <= size);
            if let Some(e) = last_end { prop_assert!(s > e, "extents are merged and ordered"); }
            last_end = Some(s + l);
            for b in s..s + l { covered[b as usize] = true; }
        }
        for (byte, c) in covered.iter().enumerate() {
            let block = byte / bs as usize;
            prop_assert_eq!(*c, map[block] > since, "byte {}", byte);
        }
        prop_assert_eq!(total(&extents), covered.iter().filter(|c| **c).count() as u64);
    }
}

#[test]
fn fine_answers_become_merged_extents() {
    use blksnap::backup::fine_extents;
    let mut out = Vec::new();
    // Blocks 10.. of 4 KiB: written, clean, unknown, written, then clean.
    fine_extents(10, &[1, 0, 2, 1, 0], 4096, 1 << 30, &mut out);
    assert_eq!(out, vec![(40960, 4096), (49152, 8192)]);
    // The next call's first block touches the last range: merged.
    fine_extents(14, &[1], 4096, 1 << 30, &mut out);
    assert_eq!(out, vec![(40960, 4096), (49152, 12288)]);
    // Clipped to a device size that ends inside a block.
    let mut out = Vec::new();
    fine_extents(0, &[0, 1], 4096, 4096 + 512, &mut out);
    assert_eq!(out, vec![(4096, 512)]);
}

/// The decision of an incremental: the change map only for the device the
/// last point was made of (same size, generation, a unique identity that
/// matches); the digest method where the sizes match and the point has
/// digests; else a full backup. Each refusal says why.
#[test]
fn incremental_uses_the_change_map_only_on_the_same_device() {
    let dev = std::path::Path::new("/dev/vdb");
    let size = 1u64 << 30;
    let vdb = Identity {
        disk: Some("serial=blksnap-p".into()),
        partition: None,
        sectors: size >> 9,
    };
    let mut prev = manifest("point-0003.qcow2", "", size);
    prev.point = Some(3);
    prev.identity = Some(vdb.text());
    let generation = prev.generation.clone();
    let choice = |prev: &Manifest, kind, size, generation: &str, id: &Result<Identity, String>| {
        choose(prev, kind, dev, size, generation, id, None)
    };
    let cbt = Choice {
        kind: Kind::Incremental,
        method: Method::Cbt,
        why: None,
    };
    assert_eq!(
        choice(
            &prev,
            Kind::Incremental,
            size,
            &generation,
            &Ok(vdb.clone())
        ),
        cbt
    );
    // The first manifest format: the serial alone, a whole disk.
    let mut old = prev.clone();
    old.identity = Some("blksnap-p".into());
    assert_eq!(
        choice(&old, Kind::Incremental, size, &generation, &Ok(vdb.clone())),
        cbt
    );

    // Another disk of the same size in its place: digests.
    let other = Identity {
        disk: Some("serial=blksnap-x".into()),
        ..vdb.clone()
    };
    let c = choice(
        &prev,
        Kind::Incremental,
        size,
        &generation,
        &Ok(other.clone()),
    );
    assert_eq!((c.kind, c.method), (Kind::Incremental, Method::Digest));
    assert_eq!(
        c.why.as_deref(),
        Some(
            "identity of /dev/vdb is serial=blksnap-x,sectors=2097152, \
             point 3 was made of serial=blksnap-p,sectors=2097152"
        )
    );
    // Without digests, or a differential: a full backup.
    let mut nodig = prev.clone();
    nodig.digests = None;
    let c = choice(
        &nodig,
        Kind::Incremental,
        size,
        &generation,
        &Ok(other.clone()),
    );
    assert_eq!((c.kind, c.method), (Kind::Full, Method::Full));
    assert!(c.why.unwrap().starts_with("identity of /dev/vdb is"));
    let c = choice(
        &prev,
        Kind::Differential,
        size,
        &generation,
        &Ok(other.clone()),
    );
    assert_eq!((c.kind, c.method), (Kind::Full, Method::Full));
    // A partition of the same disk at another place, or the old format's
    // serial for a partition: not proven.
    let part = Identity {
        partition: Some((1, 2048)),
        ..vdb.clone()
    };
    let c = choice(
        &old,
        Kind::Incremental,
        size,
        &generation,
        &Ok(part.clone()),
    );
    assert_eq!(c.method, Method::Digest, "{c:?}");
    let mut p1 = prev.clone();
    p1.identity = Some(part.text());
    let moved = Identity {
        partition: Some((1, 4096)),
        ..vdb.clone()
    };
    assert_eq!(
        choice(&p1, Kind::Incremental, size, &generation, &Ok(part)),
        cbt
    );
    assert_eq!(
        choice(&p1, Kind::Incremental, size, &generation, &Ok(moved)).method,
        Method::Digest
    );

    // An LVM snapshot of the device now, or when the last point was made:
    // a merge changes the device under its change map.
    let c = choose(
        &prev,
        Kind::Incremental,
        dev,
        size,
        &generation,
        &Ok(vdb.clone()),
        Some("bsvg-lv-real"),
    );
    assert_eq!((c.kind, c.method), (Kind::Incremental, Method::Digest));
    assert_eq!(
        c.why.as_deref(),
        Some(
            "/dev/vdb is the origin of an LVM snapshot (bsvg-lv-real under it): a merge of the \
             snapshot (lvconvert --merge) changes it without writes its change map sees"
        )
    );
    let mut was = prev.clone();
    was.lvm_origin = Some("bsvg-lv-real".into());
    let c = choice(&was, Kind::Incremental, size, &generation, &Ok(vdb.clone()));
    assert_eq!((c.kind, c.method), (Kind::Incremental, Method::Digest));
    assert!(
        c.why
            .as_deref()
            .unwrap()
            .starts_with("point 3 was made while /dev/vdb was the origin of an LVM snapshot"),
        "{c:?}"
    );
    let c = choice(
        &was,
        Kind::Differential,
        size,
        &generation,
        &Ok(vdb.clone()),
    );
    assert_eq!((c.kind, c.method), (Kind::Full, Method::Full));

    // No identity in the manifest, none readable now, nothing unique now.
    let mut none = prev.clone();
    none.identity = None;
    let c = choice(
        &none,
        Kind::Incremental,
        size,
        &generation,
        &Ok(vdb.clone()),
    );
    assert_eq!(c.method, Method::Digest);
    assert_eq!(
        c.why.as_deref(),
        Some("point 3 records no identity of its device")
    );
    let c = choice(
        &prev,
        Kind::Incremental,
        size,
        &generation,
        &Err("gone".into()),
    );
    assert_eq!(c.method, Method::Digest);
    assert_eq!(
        c.why.as_deref(),
        Some("the identity of /dev/vdb cannot be read (gone)")
    );
    let bare = Identity {
        disk: None,
        partition: None,
        sectors: size >> 9,
    };
    let mut bare_prev = prev.clone();
    bare_prev.identity = Some(bare.text());
    // Nothing unique: the same size and generation are the proof.
    let c = choice(
        &bare_prev,
        Kind::Incremental,
        size,
        &generation,
        &Ok(bare.clone()),
    );
    assert_eq!(c.method, Method::Cbt, "{:?}", c.why);
    // But another size is another identity.
    let bigger = Identity {
        sectors: (size >> 9) + 8,
        ..bare
    };
    let c = choice(
        &bare_prev,
        Kind::Incremental,
        size,
        &generation,
        &Ok(bigger),
    );
    assert_eq!(c.method, Method::Digest);

    // The generation: digests, with both reasons when the identity differs too.
    let c = choice(&prev, Kind::Incremental, size, "another", &Ok(vdb.clone()));
    assert_eq!(c.method, Method::Digest);
    assert!(c.why.unwrap().contains("generation changed"));
    let c = choice(
        &prev,
        Kind::Incremental,
        size,
        "another",
        &Ok(other.clone()),
    );
    let why = c.why.unwrap();
    assert!(
        why.contains("identity of") && why.contains("generation changed"),
        "{why}"
    );
    // The size: full, whatever the rest.
    let c = choice(
        &prev,
        Kind::Incremental,
        size * 2,
        &generation,
        &Ok(vdb.clone()),
    );
    assert_eq!((c.kind, c.method), (Kind::Full, Method::Full));
    assert_eq!(
        c.why.as_deref(),
        Some("the device size changed from 1073741824 to 2147483648")
    );
    // A full is a full.
    assert_eq!(
        choice(&prev, Kind::Full, size, &generation, &Ok(vdb)).method,
        Method::Full
    );
}

/// An incremental with --verify-source, on files: the previous backup in
/// place, a "snapshot image" that differs from it in blocks the plan (the
/// change map) copies and in blocks it does not. The backup ends equal to
/// the image, its digests the image's, and the check names exactly the
/// blocks the plan missed (a block the plan copies in part, with another
/// part written unseen, among them).
#[test]
fn checked_incremental_copies_what_the_map_missed() {
    use std::os::unix::fs::FileExt;
    let d = tmp("checked");
    let size = 64 * BLOCK + 4096;
    let old: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let mut new = old.clone();
    let b = BLOCK as usize;
    // Seen: block 3 whole, 4 KiB of block 10.
    new[3 * b..4 * b].fill(0x33);
    new[10 * b + 4096..10 * b + 8192].fill(0x10);
    // Unseen: 4 KiB of block 20, 512 bytes of block 10 beside the seen
    // piece, the short last block.
    new[20 * b + 8192..20 * b + 12288].fill(0x20);
    new[10 * b + 40960..10 * b + 41472].fill(0x11);
    new[64 * b + 100] ^= 0xff;
    let plan = [
        (3 * BLOCK, BLOCK),
        (10 * BLOCK + 4096, 4096),
        (40 * BLOCK, 8192),
    ];
    let img = d.join("snapshot.img");
    let bak = d.join("backup.img");
    std::fs::write(&img, &new).unwrap();
    std::fs::write(&bak, &old).unwrap();
    let mut prev = Digests::new(size);
    assert!(prev.absorb(0, &old).is_empty());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&bak)
        .unwrap();
    let (c, found) = copy_checked(
        &img,
        &InPlace(&f),
        &plan,
        &mut prev,
        &mut |s, buf| f.read_exact_at(buf, s).map_err(|e| e.to_string()),
        &std::sync::atomic::AtomicBool::new(false),
        &Quiet,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&bak).unwrap(),
        new,
        "the backup equals the image"
    );
    let mut want = Digests::new(size);
    want.absorb(0, &new);
    assert_eq!(prev, want, "the digests are the image's");
    assert_eq!(c.read, size);
    // The plan's 3 pieces, then blocks 10, 20, 64 whole.
    assert_eq!(c.written, BLOCK + 4096 + 8192 + 2 * BLOCK + 4096);
    assert_eq!((found.differ, found.explained), (4, 1));
    let missed: Vec<(usize, Vec<(u64, u64)>)> = found
        .missed
        .iter()
        .map(|m| (m.block, m.differ.clone()))
        .collect();
    assert_eq!(
        missed,
        [
            (10, vec![(10 * BLOCK + 40960, 10 * BLOCK + 45056)]),
            (20, vec![(20 * BLOCK + 8192, 20 * BLOCK + 12288)]),
            (64, vec![(64 * BLOCK, 64 * BLOCK + 4096)]),
        ]
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// The repair's copy: given the image's digests (read before), it reads
/// and writes only the blocks whose digest differs from the previous
/// backup's, and the backup then equals the image.
#[test]
fn known_digests_copy_only_what_differs() {
    let d = tmp("known");
    let size = 16 * BLOCK + 512;
    let old: Vec<u8> = (0..size).map(|i| (i * 5 % 241) as u8).collect();
    let mut new = old.clone();
    let b = BLOCK as usize;
    new[2 * b + 7] ^= 1;
    new[3 * b..4 * b].fill(0);
    new[16 * b + 3] ^= 1;
    let img = d.join("snapshot.img");
    let bak = d.join("backup.img");
    std::fs::write(&img, &new).unwrap();
    std::fs::write(&bak, &old).unwrap();
    let mut prev = Digests::new(size);
    prev.absorb(0, &old);
    let mut known = Digests::new(size);
    known.absorb(0, &new);
    let f = std::fs::OpenOptions::new().write(true).open(&bak).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    assert!(copy_known(
        &img,
        &InPlace(&f),
        &mut prev.clone(),
        Digests::new(size + 512),
        &stop,
        &Quiet
    )
    .is_err());
    let c = copy_known(&img, &InPlace(&f), &mut prev, known.clone(), &stop, &Quiet).unwrap();
    assert_eq!(c.read, 2 * BLOCK + 512, "blocks 2-3 and the short last one");
    assert_eq!(std::fs::read(&bak).unwrap(), new);
    assert_eq!(prev, known);
    std::fs::remove_dir_all(&d).unwrap();
}
