// SPDX-License-Identifier: GPL-2.0

//! Host tests of `blksnapctl restore`, `verify` and `backup prune` on a
//! chain of restore points made by qemu-img (as a backup lays them out):
//! what they print and their exit status when a point's qcow2 header was
//! tampered with.

use blksnap::backup::sha256_file;
use blksnap::digest::{self, Digests};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blksnapctl"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blksnapctl-points-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `qemu-img ARGS` in `dir`, which must succeed.
fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("qemu-img (Debian package qemu-utils) is needed by this test");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Point `n` of `chain`: its image from the raw file `raw` (a base, or an
/// overlay of point `n - 1` holding what differs), its digests and its
/// complete manifest, as a backup writes them.
fn point(chain: &Path, n: u32, raw: &Path, content: &[u8]) {
    let image = format!("point-{n:04}.qcow2");
    let backing = (n > 1).then(|| format!("point-{:04}.qcow2", n - 1));
    let raw = raw.to_str().unwrap();
    match &backing {
        None => qemu_img(chain, &["convert", "-O", "qcow2", raw, &image]),
        Some(b) => qemu_img(
            chain,
            &[
                "convert", "-O", "qcow2", "-B", b, "-F", "qcow2", raw, &image,
            ],
        ),
    }
    let size = content.len() as u64;
    let mut digests = Digests::new(size);
    digests.absorb(0, content);
    let df = chain.join(format!("point-{n:04}.digests"));
    digests.store(&df).unwrap();
    let m = serde_json::json!({
        "format": 1,
        "device": "/dev/vdb",
        "dev": "254:16",
        "identity": null,
        "size": size,
        "block_size": 65536,
        "generation": "0d4f2a9c-0000-4000-8000-000000000001",
        "snapshot_number": n,
        "base_number": 1,
        "kind": if n == 1 { "full" } else { "incremental" },
        "status": "complete",
        "image": image,
        "sha256": sha256_file(Path::new(raw), size).unwrap(),
        "bytes_read": size,
        "bytes_written": size,
        "method": if n == 1 { "full" } else { "cbt" },
        "digests": {
            "file": df.file_name().unwrap().to_str().unwrap(),
            "algorithm": digest::ALGORITHM,
            "block_size": digest::BLOCK,
            "sha256": sha256_file(&df, std::fs::metadata(&df).unwrap().len()).unwrap(),
        },
        "point": n,
        "image_format": "qcow2",
        "backing": backing,
        "time": 1_795_729_445u64 + u64::from(n),
    });
    std::fs::write(
        chain.join(format!("point-{n:04}.json")),
        serde_json::to_string_pretty(&m).unwrap(),
    )
    .unwrap();
}

/// Every file of a directory but the lock, with its content.
fn files(d: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != ".lock")
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A chain of two points restores and verifies; once point 2's qcow2
/// header names a copy of point 1 outside the chain (same content, so
/// only the check of the header can tell), restore exits 1 naming the
/// point, the file and the backing file without creating its target,
/// verify exits 3 with point 2 FAILED and point 1 OK, and prune exits 1
/// and changes nothing.
#[test]
fn cli_refuses_a_chain_whose_header_names_another_file() {
    let root = scratch("cli");
    let chain = root.join("vdb");
    std::fs::create_dir_all(&chain).unwrap();
    let size = 1 << 20;
    let mut c1 = vec![0u8; size];
    for (i, b) in c1.iter_mut().enumerate() {
        *b = (i / 4096 % 251) as u8 + 1;
    }
    let mut c2 = c1.clone();
    c2[70_000..78_192].fill(0xa5);
    c2[512 << 10..(512 << 10) + 65536].fill(0);
    for (n, c) in [(1, &c1), (2, &c2)] {
        let raw = root.join(format!("content-{n}.raw"));
        std::fs::write(&raw, c).unwrap();
        point(&chain, n, &raw, c);
    }
    let dir = root.to_str().unwrap();

    // Untampered: restored equal to the content, verified.
    let t = root.join("restored.raw");
    let out = bin()
        .args(["restore", "--point", "2", dir])
        .arg(&t)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(std::fs::read(&t).unwrap() == c2, "restored content");
    let out = bin().args(["verify", dir]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));

    // Point 2 backed by a copy of point 1 outside the chain.
    let other = root.join("point-0001-copy.qcow2");
    std::fs::copy(chain.join("point-0001.qcow2"), &other).unwrap();
    let other = other.to_str().unwrap();
    qemu_img(
        &chain,
        &[
            "rebase",
            "-u",
            "-b",
            other,
            "-F",
            "qcow2",
            "point-0002.qcow2",
        ],
    );
    let before = files(&chain);
    let t2 = root.join("restored-2.raw");
    let out = bin()
        .args(["restore", "--point", "2", dir])
        .arg(&t2)
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "restore: {err}");
    assert!(
        err.contains("point 2")
            && err.contains("point-0002.qcow2")
            && err.contains(&format!("backing file \"{other}\"")),
        "restore: {err}"
    );
    assert!(!t2.exists(), "restore created its target");

    let out = bin().args(["verify", dir]).output().unwrap();
    let (o, err) = text(&out);
    assert_eq!(out.status.code(), Some(3), "verify: {o} {err}");
    assert!(o.contains("point 1: OK"), "verify: {o}");
    let bad = o
        .lines()
        .find(|l| l.starts_with("point 2: FAILED: "))
        .unwrap_or_else(|| panic!("verify: {o}"));
    assert!(bad.contains(&format!("backing file \"{other}\"")), "{bad}");

    let out = bin()
        .args(["backup", "prune", dir, "--keep", "1"])
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "prune: {err}");
    assert!(err.contains("point-0002.qcow2"), "prune: {err}");
    assert!(files(&chain) == before, "prune changed the chain");
    std::fs::remove_dir_all(&root).unwrap();
}
