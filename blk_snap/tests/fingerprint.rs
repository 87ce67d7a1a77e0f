// SPDX-License-Identifier: GPL-2.0

//! What proves a device unwritten while it was not tracked: the
//! fingerprint regions found by `probe` must change when a foreign writer
//! writes through the file system (a mount, debugfs, fsck, tune2fs), on
//! real file systems made by mkfs on the host. Tests whose tools are
//! missing say so and pass.

use blk_snap_logic::fingerprint::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tool(name: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn image(name: &str, mib: u64) -> PathBuf {
    let p = std::env::temp_dir().join(format!("blksnap-fp-{}-{name}.img", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

fn head(p: &Path, at: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; PROBE_LEN];
    let f = std::fs::File::open(p).unwrap();
    let n = f.read_at(&mut b, at).unwrap();
    b.truncate(n);
    b
}

fn bytes(p: &Path, r: Region) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; r.len as usize];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, r.offset)
        .unwrap();
    b
}

fn write_raw(p: &Path, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(data, at)
        .unwrap();
}

#[test]
fn ext4_superblock_changes_with_every_writer_through_it() {
    if !tool("mkfs.ext4") || !tool("debugfs") {
        eprintln!("no e2fsprogs: skipped");
        return;
    }
    let img = image("ext4", 32);
    let p = img.to_str().unwrap();
    run("mkfs.ext4", &["-q", "-F", p]);
    let (proof, r) = probe(&head(&img, 0)).expect("ext4 found");
    assert_eq!(proof, Proof::Ext);
    assert_eq!(
        r,
        Region {
            offset: 1024,
            len: 1024
        }
    );
    let saved = bytes(&img, r);
    // Reading changes nothing.
    run("e2fsck", &["-n", p]);
    run("debugfs", &["-R", "stat /", p]);
    assert_eq!(
        bytes(&img, r),
        saved,
        "a read-only look changed the superblock"
    );
    // A raw write into a data block beneath the file system is not seen:
    // the documented limit.
    write_raw(&img, 20 << 20, &[0x5a; 4096]);
    assert_eq!(bytes(&img, r), saved);
    // A file written by another system's tool is.
    let src = image("src", 0);
    std::fs::write(&src, b"written while not tracked").unwrap();
    run(
        "debugfs",
        &["-w", "-R", &format!("write {} newfile", src.display()), p],
    );
    let after_write = bytes(&img, r);
    assert_ne!(
        after_write, saved,
        "debugfs -w left the superblock as it was"
    );
    // So is a repair, and a tune.
    run("e2fsck", &["-fy", p]);
    let after_fsck = bytes(&img, r);
    assert_ne!(
        after_fsck, after_write,
        "e2fsck -f left the superblock as it was"
    );
    run("tune2fs", &["-c", "33", p]);
    assert_ne!(
        bytes(&img, r),
        after_fsck,
        "tune2fs left the superblock as it was"
    );
    for f in [img, src] {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn xfs_and_nothing() {
    let img = image("xfs", 300);
    if tool("mkfs.xfs") {
        run("mkfs.xfs", &["-q", "-f", img.to_str().unwrap()]);
        let (proof, r) = probe(&head(&img, 0)).expect("xfs found");
        assert_eq!(proof, Proof::Xfs);
        assert_eq!(
            r,
            Region {
                offset: 0,
                len: 4096
            }
        );
    } else {
        eprintln!("no mkfs.xfs: skipped");
    }
    // Zeroes, random data, a swap-like signature: nothing to prove it.
    assert_eq!(probe(&vec![0u8; PROBE_LEN]), None);
    let noise: Vec<u8> = (0..PROBE_LEN).map(|i| (i * 7919 % 251) as u8).collect();
    assert_eq!(probe(&noise), None);
    assert_eq!(probe(&[]), None);
    assert_eq!(probe(&[0xff; 100]), None);
    std::fs::remove_file(img).unwrap();
}

#[test]
fn btrfs_magic() {
    let mut b = vec![0u8; PROBE_LEN];
    b[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");
    assert_eq!(
        probe(&b),
        Some((
            Proof::Btrfs,
            Region {
                offset: 65536,
                len: 4096
            }
        ))
    );
    // Cut short of its superblock: nothing.
    assert_eq!(probe(&b[..PROBE_LEN - 1]), None);
}

#[test]
fn partitioned_disk_needs_every_partition_proven() {
    let mut ext = vec![0u8; PROBE_LEN];
    ext[1024 + 56..1024 + 58].copy_from_slice(&0xef53u16.to_le_bytes());
    let mut xfs = vec![0u8; PROBE_LEN];
    xfs[..4].copy_from_slice(b"XFSB");
    let raw = vec![0u8; PROBE_LEN];
    let mut out = [Region { offset: 0, len: 0 }; MAX_REGIONS];
    let n = partitioned(512, [(1 << 20, &ext[..]), (64 << 20, &xfs[..])], &mut out).unwrap();
    assert_eq!(
        out[..n],
        [
            Region {
                offset: 0,
                len: 17408
            },
            Region {
                offset: (1 << 20) + 1024,
                len: 1024
            },
            Region {
                offset: 64 << 20,
                len: 4096
            },
        ]
    );
    assert!(valid(&out[..n], 128 << 20));
    assert!(!valid(&out[..n], 64 << 20), "a region past the end");
    // 4 KiB logical blocks: the table's two blocks and the GPT entries.
    let n = partitioned(4096, [(1 << 20, &ext[..])], &mut out).unwrap();
    assert_eq!(
        out[0],
        Region {
            offset: 0,
            len: 24576
        }
    );
    assert_eq!(n, 2);
    // A partition without a file system (swap, LVM, raw): nothing proves
    // the disk.
    assert_eq!(
        partitioned(512, [(1 << 20, &ext[..]), (2 << 20, &raw[..])], &mut out),
        None
    );
    // More partitions than regions fit.
    let many: Vec<(u64, &[u8])> = (0..MAX_REGIONS as u64)
        .map(|i| (i << 20, &ext[..]))
        .collect();
    assert_eq!(partitioned(512, many, &mut out), None);
}

#[test]
fn valid_regions() {
    let r = |offset, len| Region { offset, len };
    assert!(valid(&[], 0));
    assert!(valid(&[r(0, 4096)], 4096));
    assert!(!valid(&[r(1, 4096)], 4096));
    assert!(!valid(&[r(0, 0)], 4096));
    assert!(!valid(&[r(u64::MAX - 1, 4)], u64::MAX));
    assert!(!valid(&vec![r(0, 2048); 33], 1 << 30), "more than 64 KiB");
    assert!(!valid(&vec![r(0, 1); MAX_REGIONS + 1], 1 << 30));
}
