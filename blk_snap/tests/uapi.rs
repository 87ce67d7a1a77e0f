// SPDX-License-Identifier: GPL-2.0

//! The UAPI must reproduce every layout fact of the upstream proposal: the C
//! headers (compiled with the host C compiler) and the Rust mirrors used by the
//! module both print the facts, and both must equal the reference list.

use blk_snap_logic::uapi::*;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn reference() -> String {
    let ours = repo().join("tests/uapi/upstream-uapi-layout.txt");
    let text = std::fs::read_to_string(&ours).expect("tests/uapi/upstream-uapi-layout.txt");
    // The shared reference beside the checkout is the source of truth; when it
    // is there, our copy must not have drifted from it.
    let shared = std::env::var_os("BLKSNAP_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/reference"))
        .join("upstream-uapi-layout.txt");
    if let Ok(shared_text) = std::fs::read_to_string(&shared) {
        assert_eq!(
            text,
            shared_text,
            "tests/uapi copy differs from {}",
            shared.display()
        );
    }
    assert_eq!(text.lines().count(), 48, "the reference lists 48 facts");
    text
}

fn compare(what: &str, got: &str) {
    let want = reference();
    let mut diffs = Vec::new();
    for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
        if w != g {
            diffs.push(format!("line {}: want `{w}`, got `{g}`", i + 1));
        }
    }
    assert_eq!(
        want.lines().count(),
        got.lines().count(),
        "{what}: line count"
    );
    assert!(
        diffs.is_empty(),
        "{what} differs from the reference:\n{}",
        diffs.join("\n")
    );
}

/// Compiles tests/uapi/layout.c and runs it with `args`.
fn c_layout(args: &[&str]) -> String {
    let out = std::env::temp_dir().join(format!(
        "blksnap-layout-{}-{}",
        std::process::id(),
        args.len()
    ));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-Wall", "-Wextra", "-Werror", "-I"])
        .arg(repo().join("include/uapi"))
        .arg(repo().join("tests/uapi/layout.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "compiling tests/uapi/layout.c failed");
    let printed = Command::new(&out).args(args).output().expect("run layout");
    std::fs::remove_file(&out).ok();
    assert!(printed.status.success());
    String::from_utf8(printed.stdout).unwrap()
}

/// Appends `sizeof NAME N` for a Rust mirror to the layout text `$s`.
macro_rules! size {
    ($s:ident, $c:literal, $t:ty) => {
        $s += &format!("sizeof {} {}\n", $c, size_of::<$t>());
    };
}

/// Appends `offsetof NAME.FIELD N` for a Rust mirror to the layout text `$s`.
macro_rules! off {
    ($s:ident, $c:literal, $t:ty, $f:ident) => {
        $s += &format!(
            "offsetof {}.{} {}\n",
            $c,
            stringify!($f),
            offset_of!($t, $f)
        );
    };
}

/// Appends `ioctl NAME 0xN` for an ioctl number constant to `$s`.
macro_rules! ioctl {
    ($s:ident, $n:ident) => {
        $s += &format!("ioctl {} {:#x}\n", stringify!($n), $n);
    };
}

#[test]
fn c_headers_match_upstream_layout() {
    compare("C headers", &c_layout(&[]));
}

/// Our extensions are not upstream facts, but the C header and the Rust
/// mirror must agree on them too.
#[test]
fn extensions_agree_between_c_and_rust() {
    let mut s = String::new();
    size!(
        s,
        "blksnap_snapshot_create_storage",
        BlksnapSnapshotCreateStorage
    );
    off!(
        s,
        "blksnap_snapshot_create_storage",
        BlksnapSnapshotCreateStorage,
        flags
    );
    off!(
        s,
        "blksnap_snapshot_create_storage",
        BlksnapSnapshotCreateStorage,
        limit_sect
    );
    off!(
        s,
        "blksnap_snapshot_create_storage",
        BlksnapSnapshotCreateStorage,
        id
    );
    size!(
        s,
        "blksnap_snapshot_append_storage",
        BlksnapSnapshotAppendStorage
    );
    off!(
        s,
        "blksnap_snapshot_append_storage",
        BlksnapSnapshotAppendStorage,
        bdev_path
    );
    off!(
        s,
        "blksnap_snapshot_append_storage",
        BlksnapSnapshotAppendStorage,
        count
    );
    off!(
        s,
        "blksnap_snapshot_append_storage",
        BlksnapSnapshotAppendStorage,
        reserved
    );
    off!(
        s,
        "blksnap_snapshot_append_storage",
        BlksnapSnapshotAppendStorage,
        ranges
    );
    size!(s, "blksnap_event_low_free_space", BlksnapEventLowFreeSpace);
    s += &format!(
        "ioctl IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE {:#x}\n",
        IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE
    );
    s += &format!(
        "ioctl IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE {:#x}\n",
        IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE
    );
    size!(s, "blksnap_cbtfine", BlksnapCbtfine);
    off!(s, "blksnap_cbtfine", BlksnapCbtfine, block_shift);
    off!(s, "blksnap_cbtfine", BlksnapCbtfine, reserved);
    off!(s, "blksnap_cbtfine", BlksnapCbtfine, offset);
    off!(s, "blksnap_cbtfine", BlksnapCbtfine, count);
    off!(s, "blksnap_cbtfine", BlksnapCbtfine, buffer);
    off!(s, "blksnap_cbtfine", BlksnapCbtfine, memory);
    off!(s, "blksnap_cbtfine", BlksnapCbtfine, memory_limit);
    s += &format!(
        "enum CBTMAP_ACTIVE {} MEMORY {} DEVICES {} low_free_space {}\n",
        ctl::CBTMAP_ACTIVE,
        storage::MEMORY,
        storage::DEVICES,
        event::LOW_FREE_SPACE
    );
    s += &format!(
        "enum CBTFINE {} CLEAN {} WRITTEN {} UNKNOWN {}\n",
        ctl::CBTFINE,
        fine::CLEAN,
        fine::WRITTEN,
        fine::UNKNOWN
    );
    size!(s, "blksnap_cbtpersist", BlksnapCbtpersistFull);
    off!(s, "blksnap_cbtpersist", BlksnapCbtpersist, flags);
    off!(s, "blksnap_cbtpersist", BlksnapCbtpersist, restored);
    off!(s, "blksnap_cbtpersist", BlksnapCbtpersist, generation);
    // The second part follows the first, which ends at `generation`.
    let v1 = size_of::<BlksnapCbtpersist>();
    for (f, o) in [
        ("identity", offset_of!(BlksnapCbtpersistExt, identity)),
        (
            "writes_before",
            offset_of!(BlksnapCbtpersistExt, writes_before),
        ),
        ("proof", offset_of!(BlksnapCbtpersistExt, proof)),
        ("reserved", offset_of!(BlksnapCbtpersistExt, reserved)),
    ] {
        s += &format!("offsetof blksnap_cbtpersist.{f} {}\n", v1 + o);
    }
    size!(s, "blksnap_cbt_state_device", BlksnapCbtStateDevice);
    off!(s, "blksnap_cbt_state_device", BlksnapCbtStateDevice, flags);
    off!(
        s,
        "blksnap_cbt_state_device",
        BlksnapCbtStateDevice,
        reserved
    );
    off!(
        s,
        "blksnap_cbt_state_device",
        BlksnapCbtStateDevice,
        records
    );
    off!(s, "blksnap_cbt_state_device", BlksnapCbtStateDevice, clean);
    size!(s, "blksnap_cbt_save", BlksnapCbtSave);
    off!(s, "blksnap_cbt_save", BlksnapCbtSave, reserved);
    off!(s, "blksnap_cbt_save", BlksnapCbtSave, bytes);
    s += &format!(
        "ioctl IOCTL_BLKSNAP_CBT_STATE_DEVICE {:#x}\n",
        IOCTL_BLKSNAP_CBT_STATE_DEVICE
    );
    s += &format!(
        "ioctl IOCTL_BLKSNAP_CBT_SAVE {:#x}\n",
        IOCTL_BLKSNAP_CBT_SAVE
    );
    s += &format!(
        "enum CBTPERSIST {} FORMAT {} MIRROR {} UNVERIFIED {}\n",
        ctl::CBTPERSIST,
        CBT_STATE_FORMAT,
        CBT_STATE_MIRROR,
        CBTPERSIST_UNVERIFIED
    );
    {
        use blk_snap_logic::fingerprint::Proof;
        s += &format!(
            "enum PROOF {} {} {} {} {}\n",
            Proof::None as u32,
            Proof::Ext as u32,
            Proof::Xfs as u32,
            Proof::Btrfs as u32,
            Proof::Partitions as u32
        );
    }
    assert_eq!(c_layout(&["ext"]), s);
    // Extensions must not reuse upstream numbers.
    const { assert!(ctl::CBTMAP_ACTIVE > ctl::SNAPSHOTINFO && event::LOW_FREE_SPACE > event::NO_SPACE) };
    const { assert!(ctl::CBTFINE > ctl::CBTMAP_ACTIVE) };
    const { assert!(ctl::CBTPERSIST > ctl::CBTFINE) };
}

#[test]
fn rust_mirrors_match_upstream_layout() {
    let mut s = String::new();
    size!(s, "blkfilter_attach", BlkfilterAttach);
    off!(s, "blkfilter_attach", BlkfilterAttach, opt);
    off!(s, "blkfilter_attach", BlkfilterAttach, optlen);
    size!(s, "blkfilter_detach", BlkfilterDetach);
    size!(s, "blkfilter_ctl", BlkfilterCtl);
    off!(s, "blkfilter_ctl", BlkfilterCtl, cmd);
    off!(s, "blkfilter_ctl", BlkfilterCtl, optlen);
    off!(s, "blkfilter_ctl", BlkfilterCtl, opt);
    size!(s, "blksnap_uuid", BlksnapUuid);
    size!(s, "blksnap_cbtinfo", BlksnapCbtinfo);
    off!(s, "blksnap_cbtinfo", BlksnapCbtinfo, block_size);
    off!(s, "blksnap_cbtinfo", BlksnapCbtinfo, block_count);
    off!(s, "blksnap_cbtinfo", BlksnapCbtinfo, generation_id);
    off!(s, "blksnap_cbtinfo", BlksnapCbtinfo, changes_number);
    size!(s, "blksnap_cbtmap", BlksnapCbtmap);
    off!(s, "blksnap_cbtmap", BlksnapCbtmap, length);
    off!(s, "blksnap_cbtmap", BlksnapCbtmap, buffer);
    size!(s, "blksnap_sectors", BlksnapSectors);
    size!(s, "blksnap_cbtdirty", BlksnapCbtdirty);
    off!(s, "blksnap_cbtdirty", BlksnapCbtdirty, dirty_sectors);
    size!(s, "blksnap_snapshotadd", BlksnapSnapshotadd);
    size!(s, "blksnap_snapshotinfo", BlksnapSnapshotinfo);
    off!(s, "blksnap_snapshotinfo", BlksnapSnapshotinfo, image);
    size!(s, "blksnap_version", BlksnapVersion);
    size!(s, "blksnap_snapshot_create", BlksnapSnapshotCreate);
    off!(
        s,
        "blksnap_snapshot_create",
        BlksnapSnapshotCreate,
        diff_storage_filename
    );
    off!(s, "blksnap_snapshot_create", BlksnapSnapshotCreate, id);
    size!(s, "blksnap_snapshot_collect", BlksnapSnapshotCollect);
    off!(s, "blksnap_snapshot_collect", BlksnapSnapshotCollect, ids);
    size!(s, "blksnap_snapshot_event", BlksnapSnapshotEvent);
    off!(
        s,
        "blksnap_snapshot_event",
        BlksnapSnapshotEvent,
        timeout_ms
    );
    off!(s, "blksnap_snapshot_event", BlksnapSnapshotEvent, code);
    off!(
        s,
        "blksnap_snapshot_event",
        BlksnapSnapshotEvent,
        time_label
    );
    off!(s, "blksnap_snapshot_event", BlksnapSnapshotEvent, data);
    size!(s, "blksnap_event_corrupted", BlksnapEventCorrupted);
    size!(s, "blksnap_event_no_space", BlksnapEventNoSpace);
    ioctl!(s, BLKFILTER_ATTACH);
    ioctl!(s, BLKFILTER_DETACH);
    ioctl!(s, BLKFILTER_CTL);
    ioctl!(s, IOCTL_BLKSNAP_VERSION);
    ioctl!(s, IOCTL_BLKSNAP_SNAPSHOT_CREATE);
    ioctl!(s, IOCTL_BLKSNAP_SNAPSHOT_DESTROY);
    ioctl!(s, IOCTL_BLKSNAP_SNAPSHOT_TAKE);
    ioctl!(s, IOCTL_BLKSNAP_SNAPSHOT_COLLECT);
    ioctl!(s, IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT);
    s += &format!(
        "enum CBTINFO {} CBTMAP {} CBTDIRTY {} SNAPSHOTADD {} SNAPSHOTINFO {}\n",
        ctl::CBTINFO,
        ctl::CBTMAP,
        ctl::CBTDIRTY,
        ctl::SNAPSHOTADD,
        ctl::SNAPSHOTINFO
    );
    s += &format!(
        "events corrupted {} no_space {}\n",
        event::CORRUPTED,
        event::NO_SPACE
    );
    s += &format!("names {} {}\n", BLKSNAP_CTL, BLKSNAP_FILTER_NAME);
    compare("Rust mirrors", &s);
}

#[test]
fn cbtinfo_bytes_match_memory_layout() {
    let info = BlksnapCbtinfo {
        device_capacity: 0x0102_0304_0506_0708,
        block_size: 65536,
        block_count: 17,
        generation_id: BlksnapUuid {
            b: *b"0123456789abcdef",
        },
        changes_number: 42,
    };
    let bytes = info.to_ne_bytes();
    // SAFETY: reading the initialized fields through a byte view; the padding
    // is compared separately below.
    let raw = unsafe {
        std::slice::from_raw_parts(
            (&info as *const BlksnapCbtinfo).cast::<u8>(),
            size_of::<BlksnapCbtinfo>(),
        )
    };
    assert_eq!(&bytes[..33], &raw[..33]);
    assert!(bytes[33..].iter().all(|&b| b == 0), "padding is zeroed");
}

/// The layouts a 32-bit x86 process uses (`uapi::compat`) are those of the C
/// header compiled with `-m32`, where the module's compat handlers expect
/// them. Skipped (with a note) where the C compiler cannot build for i386.
#[test]
fn compat_layouts_match_the_32bit_c_header() {
    let out = std::env::temp_dir().join(format!("blksnap-layout32-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .args(["-m32", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(repo().join("include/uapi"))
        .arg(repo().join("tests/uapi/layout.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        eprintln!("note: no 32-bit C compiler (gcc-multilib); compat layouts not checked");
        return;
    }
    let printed = Command::new(&out).output().expect("run the 32-bit layout");
    std::fs::remove_file(&out).ok();
    let c = String::from_utf8(printed.stdout).unwrap();
    use blk_snap_logic::uapi::compat;
    let mut rust = String::new();
    size!(rust, "blkfilter_attach", compat::BlkfilterAttach);
    size!(rust, "blksnap_cbtdirty", compat::BlksnapCbtdirty);
    size!(
        rust,
        "blksnap_snapshot_collect",
        compat::BlksnapSnapshotCollect
    );
    rust += &format!("sizeof blksnap_cbtinfo {}\n", compat::CBTINFO_SIZE);
    rust += &format!("ioctl BLKFILTER_ATTACH {:#x}\n", compat::BLKFILTER_ATTACH);
    rust += &format!(
        "ioctl IOCTL_BLKSNAP_SNAPSHOT_COLLECT {:#x}\n",
        compat::IOCTL_BLKSNAP_SNAPSHOT_COLLECT
    );
    for line in rust.lines() {
        assert!(
            c.lines().any(|l| l == line),
            "32-bit C layout lacks `{line}`"
        );
    }
}
