// SPDX-License-Identifier: GPL-2.0

//! Full, incremental and differential backups of block devices.
//!
//! A backup of a device is an image file `DIR/<name>.img` (sparse: runs of
//! zeroes are not written) and a manifest `DIR/<name>.manifest.json` with the
//! device's identity and size, the CBT block size, generation and snapshot
//! number the image corresponds to, and the SHA-256 of the image.
//!
//! - full: snapshot the devices, copy each whole image.
//! - incremental: snapshot again and copy into the existing image only the
//!   blocks whose change number is newer than the manifest's. When the
//!   change map cannot be used (tracking restarted: a reboot, a detach, a
//!   module reload), read the whole snapshot image but write only the blocks
//!   whose digest differs from the one kept beside the image
//!   ([`crate::digest`]).
//! - differential: like incremental, but the base image stays as it is and the
//!   changes since the base go to `DIR/<name>.diff.img`.
//!
//! A manifest is written with status `in-progress` before an image is
//! touched and `complete` after; an interrupted backup stays visibly
//! incomplete, and the next incremental falls back to a full backup.

use crate::digest::{self, Digests};
use crate::identity::Identity;
use crate::source::{Check, Found};
use crate::{changed_ranges, Control, MapKind, SnapshotId, Tracker};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Size of one copy I/O.
pub const IO_SIZE: usize = 4 << 20;

/// What a backup is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The whole device.
    Full,
    /// Changes since the previous backup, applied to the image.
    Incremental,
    /// Changes since the base full backup, in a separate file.
    Differential,
}

/// How a backup found what to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// It copied the whole device.
    Full,
    /// The blocks the change map marks.
    Cbt,
    /// It read the whole device and wrote the blocks whose digest changed.
    Digest,
}

/// The per-block digests kept beside an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestFile {
    /// The file, relative to the manifest.
    pub file: String,
    /// The hash ([`digest::ALGORITHM`]).
    pub algorithm: String,
    /// Bytes per digest.
    pub block_size: u32,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// Whether a backup finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Being written, or interrupted: the image cannot be trusted.
    InProgress,
    /// Finished.
    Complete,
}

/// The manifest of one device's backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of this file.
    pub format: u32,
    /// The device path given when the backup was made.
    pub device: String,
    /// `major:minor` of the device.
    pub dev: String,
    /// Device identity from sysfs ([`Identity::text`]: serial, WWID,
    /// device-mapper UUID or loop file, partition, size); manifests of
    /// earlier versions hold a serial or WWID alone.
    pub identity: Option<String>,
    /// Device size in bytes.
    pub size: u64,
    /// CBT block size in bytes.
    pub block_size: u32,
    /// CBT generation the numbers belong to.
    pub generation: String,
    /// Snapshot number of the last backup (full or incremental) in the image.
    pub snapshot_number: u8,
    /// Snapshot number of the full backup the image started from.
    pub base_number: u8,
    /// What the last backup was.
    pub kind: Kind,
    /// Whether it finished.
    pub status: Status,
    /// The image file, relative to the manifest.
    pub image: String,
    /// SHA-256 of the image (of a restore point: of the device's content
    /// at that point), hex. An incremental restore point has none: reading
    /// the whole chain to compute it would cost an incremental as much as
    /// a full; its digests (checksummed here) stand for its content.
    #[serde(default)]
    pub sha256: String,
    /// Bytes read from the snapshot image by the last backup.
    pub bytes_read: u64,
    /// Bytes written to the image file by the last backup.
    pub bytes_written: u64,
    /// For a differential backup: the changed byte ranges in its file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<(u64, u64)>,
    /// How the last backup found what to copy (absent in manifests of
    /// versions before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// The image's per-block digests, if kept (absent in manifests of
    /// versions before they were, and for differential files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digests: Option<DigestFile>,
    /// A restore point's number in its chain ([`crate::points`]); absent
    /// for the raw layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<u32>,
    /// The image format: `qcow2` for restore points; absent for raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_format: Option<String>,
    /// A restore point's backing image (the previous point), a file name
    /// in the same directory; absent for a base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// When the snapshot was taken, seconds since the epoch (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<u64>,
    /// The point was an overlay that a prune merged into a new base.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merged: bool,
    /// A prune is rebuilding this point as a base: until the manifest no
    /// longer names `backing`, the image may be the overlay of `backing` or
    /// the new base (same content, no backing file).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merging: bool,
    /// The snapshot an in-progress restore point is read from: a backup
    /// killed before it destroyed it leaves it, and the next backup or
    /// prune of the chain destroys it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Byte ranges (start, end) that a check against the device
    /// ([`crate::source`]) found changed although the change map did not
    /// mark them, copied into this backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missed: Vec<(u64, u64)>,
    /// The device was the origin of an LVM snapshot when this point's
    /// snapshot was taken (the `-real` device-mapper device under it, see
    /// [`crate::stack::lvm_origin`]): a merge of that snapshot may change
    /// it after this point without a write its change map sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm_origin: Option<String>,
}

/// The current manifest format.
pub const FORMAT: u32 = 1;

impl Manifest {
    /// Reads a manifest file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a manifest: {e}", path.display()))?;
        if m.format != FORMAT {
            return Err(format!(
                "{}: manifest format {} is not {FORMAT}",
                path.display(),
                m.format
            ));
        }
        Ok(m)
    }

    /// Writes the manifest atomically (temporary file, fsync, rename).
    pub fn store(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let mut f = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A byte range of a device to copy.
pub type Extent = (u64, u64);

/// The byte ranges to copy for an incremental backup: the blocks of `map`
/// whose number is greater than `since`, merged, clipped to `size`.
pub fn plan(map: &[u8], since: u8, block_size: u32, size: u64) -> Vec<Extent> {
    let bs = u64::from(block_size);
    changed_ranges(map, since)
        .into_iter()
        .filter_map(|(s, e)| {
            let start = u64::from(s) * bs;
            let end = (u64::from(e) * bs).min(size);
            (start < end).then_some((start, end - start))
        })
        .collect()
}

/// Appends the byte ranges of the fine blocks from `first` whose answer
/// in `answers` is not `CLEAN` (written, or unknown to the fine map) to
/// `out`, merged with its last range where they touch, clipped to `size`.
pub fn fine_extents(first: u64, answers: &[u8], block_size: u64, size: u64, out: &mut Vec<Extent>) {
    for (i, &a) in answers.iter().enumerate() {
        if a == blk_snap_logic::uapi::fine::CLEAN {
            continue;
        }
        let start = (first + i as u64) * block_size;
        let end = (start + block_size).min(size);
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += end - start,
            _ => out.push((start, end - start)),
        }
    }
}

/// What changed since the take numbered `since`, as the change map of the
/// snapshot says ([`plan`]), narrowed by the fine map ([`refine`]): the
/// extents a CBT incremental copies. `block_size` is the CBT block size,
/// `size` the device's.
pub fn changed_since(
    tracker: &Tracker,
    since: u8,
    block_size: u32,
    size: u64,
) -> Result<Vec<Extent>, String> {
    let map = tracker
        .read_cbt_map(MapKind::Snapshot)
        .map_err(|e| e.to_string())?;
    let coarse = plan(&map, since, block_size, size);
    Ok(refine(tracker, since, &coarse, size)?.0)
}

/// Narrows `extents`, the changed CBT blocks since the take numbered
/// `since`, to the fine blocks that the module's fine map says were written
/// in them (or does not know about: those stay whole). Without the
/// extension (an upstream module) they stay as they are. Returns the
/// extents and the fine block size (0 without the extension).
pub fn refine(
    tracker: &Tracker,
    since: u8,
    extents: &[Extent],
    size: u64,
) -> Result<(Vec<Extent>, u32), String> {
    let info = match tracker.read_fine(since, 0, &mut []) {
        Ok(info) => info,
        Err(e) if e.errno == nix::errno::Errno::ENOTTY => return Ok((extents.to_vec(), 0)),
        Err(e) => return Err(e.to_string()),
    };
    let bs = u64::from(info.block_size);
    let mut out = Vec::new();
    let mut answers = Vec::new();
    for &(start, len) in extents {
        let mut pos = start / bs;
        let end = (start + len).div_ceil(bs);
        while pos < end {
            let n = (end - pos).min(1 << 20);
            answers.resize(n as usize, 0);
            tracker
                .read_fine(since, pos, &mut answers)
                .map_err(|e| e.to_string())?;
            fine_extents(pos, &answers, bs, size, &mut out);
            pos += n;
        }
    }
    Ok((out, info.block_size))
}

/// Total bytes of `extents`.
pub fn total(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.1).sum()
}

/// Where a device's files go.
pub fn paths(dir: &Path, device: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let name = device
        .to_string_lossy()
        .trim_start_matches("/dev/")
        .replace('/', "_");
    (
        dir.join(format!("{name}.img")),
        dir.join(format!("{name}.manifest.json")),
        dir.join(format!("{name}.diff.img")),
    )
}

/// The identity a manifest records of a device ([`Identity::text`]), if
/// it can be read.
pub fn identity(device: &Path) -> Option<String> {
    Identity::read(device).ok().map(|i| i.text())
}

/// What an incremental (or differential) of a device is made as, and why
/// it is not what was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// What is made.
    pub kind: Kind,
    /// How it finds what to copy.
    pub method: Method,
    /// Why the change map is not used, if it is not.
    pub why: Option<String>,
}

/// How to make an incremental (or differential, `kind`) of `device`, whose
/// last backup is `prev`, now that its snapshot is taken: the device has
/// `size` bytes, CBT generation `generation` and identity `identity`. The
/// change map is used only on positive evidence that it describes the
/// device the last backup was made of, since then: the same size, the
/// same generation (the same tracking since then: a state restored after a
/// reboot only on the kernel's proof, see README), and a recorded identity
/// that matches it now (a disk without a serial or other unique name is
/// told by its size and partition only: the generation is the proof
/// there), and no LVM snapshot of it, now (`origin`: the `-real` device
/// under it, see [`crate::stack::lvm_origin`]) or at the last point, whose
/// merge (`lvconvert --merge`) would have changed it under its change map.
/// Otherwise an incremental with usable
/// digests reads the whole device ([`Method::Digest`]); a device of
/// another size, or a differential, gets a full backup.
pub fn choose(
    prev: &Manifest,
    kind: Kind,
    device: &Path,
    size: u64,
    generation: &str,
    identity: &Result<Identity, String>,
    origin: Option<&str>,
) -> Choice {
    let dev = device.display();
    let what = match prev.point {
        Some(n) => format!("point {n}"),
        None => "the last backup".to_string(),
    };
    if kind == Kind::Full {
        return Choice {
            kind,
            method: Method::Full,
            why: None,
        };
    }
    if prev.size != size {
        return Choice {
            kind: Kind::Full,
            method: Method::Full,
            why: Some(format!(
                "the device size changed from {} to {size}",
                prev.size
            )),
        };
    }
    let mut why = Vec::new();
    match (prev.identity.as_deref(), identity) {
        (_, Err(e)) => why.push(format!("the identity of {dev} cannot be read ({e})")),
        (None, Ok(_)) => why.push(format!("{what} records no identity of its device")),
        (Some(rec), Ok(now)) if !crate::identity::matches(rec, now) => why.push(format!(
            "identity of {dev} is {now}, {what} was made of {rec}",
            now = now.text()
        )),
        _ => {}
    }
    if prev.generation != generation {
        why.push(format!(
            "the change tracking generation changed ({} -> {generation}): tracking was restarted",
            prev.generation
        ));
    }
    // A merge writes the snapshot's chunks back to the device under the
    // origin, not through it: its change map never sees them.
    if let Some(o) = origin {
        why.push(format!(
            "{dev} is the origin of an LVM snapshot ({o} under it): a merge of the snapshot (lvconvert --merge) changes it without writes its change map sees"
        ));
    } else if let Some(o) = &prev.lvm_origin {
        why.push(format!(
            "{what} was made while {dev} was the origin of an LVM snapshot ({o} under it): a merge since then would have changed it without writes its change map sees"
        ));
    }
    if why.is_empty() {
        return Choice {
            kind,
            method: Method::Cbt,
            why: None,
        };
    }
    let why = Some(why.join("; and "));
    if kind == Kind::Incremental && prev.digests.is_some() {
        Choice {
            kind,
            method: Method::Digest,
            why,
        }
    } else {
        Choice {
            kind: Kind::Full,
            method: Method::Full,
            why,
        }
    }
}

/// `major:minor` of a device.
pub fn dev_string(device: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(device).map_err(|e| format!("{}: {e}", device.display()))?;
    let rdev = md.rdev();
    Ok(format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ))
}

/// Reports progress of a copy; the CLI shows a bar on a terminal.
pub trait Progress {
    /// `done` of `total` bytes are copied.
    fn update(&self, done: u64, total: u64);
}

/// No progress reports.
pub struct Quiet;

impl Progress for Quiet {
    fn update(&self, _done: u64, _total: u64) {}
}

/// A page-aligned buffer for direct I/O.
pub(crate) struct Buffer(Vec<u8>, usize);

impl Buffer {
    pub(crate) fn new(len: usize) -> Self {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        Self(v, off)
    }

    pub(crate) fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.0[self.1..self.1 + len]
    }

    pub(crate) fn slice(&self, len: usize) -> &[u8] {
        &self.0[self.1..self.1 + len]
    }
}

/// Counts of one copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Copied {
    /// Bytes read from the snapshot image.
    pub read: u64,
    /// Bytes written to the backup file (zero runs of a new file are skipped).
    pub written: u64,
}

/// Opens a snapshot image for direct reads.
fn open_image(src: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(src)
        .map_err(|e| format!("open {}: {e}", src.display()))
}

/// Digests a copy keeps up to date: the blocks it read whole get their new
/// digest; those it read only part of are listed in `partial`, to be
/// digested again from the backup file ([`rehash`]).
pub struct Tap<'a> {
    /// The digests.
    pub digests: &'a mut Digests,
    /// Blocks read in part.
    pub partial: Vec<usize>,
}

/// Reads `extents` of the snapshot image `src` with O_DIRECT, in pieces of
/// up to [`IO_SIZE`] that start on multiples of it within each extent, and
/// hands each to `piece` with its offset. Stops with an error when `stop`
/// is set. Returns the bytes read.
pub(crate) fn read_extents(
    src: &Path,
    extents: &[Extent],
    stop: &AtomicBool,
    progress: &dyn Progress,
    mut piece: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let img = open_image(src)?;
    let mut buf = Buffer::new(IO_SIZE);
    let all = total(extents);
    let mut read = 0;
    for &(start, len) in extents {
        let mut off = start;
        while off < start + len {
            if stop.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            let n = (start + len - off).min(IO_SIZE as u64) as usize;
            // Direct I/O wants whole sectors; the device size is one.
            let data = buf.get(n);
            img.read_exact_at(data, off)
                .map_err(|e| format!("read {} at {off}: {e}", src.display()))?;
            read += n as u64;
            piece(off, data)?;
            off += n as u64;
            progress.update(read, all);
        }
    }
    Ok(read)
}

/// Where a copy writes: a backup file or a restore point.
pub trait Sink {
    /// Writes `data` at byte `off`; returns the bytes it wrote (runs of
    /// zeroes that need no write are not counted).
    fn put(&self, data: &[u8], off: u64) -> Result<u64, String>;
}

/// A backup file updated in place: every byte is written.
pub struct InPlace<'a>(pub &'a File);

impl Sink for InPlace<'_> {
    fn put(&self, data: &[u8], off: u64) -> Result<u64, String> {
        self.0
            .write_all_at(data, off)
            .map_err(|e| format!("write at {off}: {e}"))?;
        Ok(data.len() as u64)
    }
}

/// A new, empty (sparse) file: 4 KiB blocks of zeroes are not written.
pub struct Sparse<'a>(pub &'a File);

impl Sink for Sparse<'_> {
    fn put(&self, data: &[u8], off: u64) -> Result<u64, String> {
        let mut written = 0;
        for (i, block) in data.chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                let at = off + (i * 4096) as u64;
                self.0
                    .write_all_at(block, at)
                    .map_err(|e| format!("write at {at}: {e}"))?;
                written += block.len() as u64;
            }
        }
        Ok(written)
    }
}

/// Copies `extents` of the snapshot image `src` into `dst` at the same
/// offsets ([`read_extents`]). Every byte read goes through `hash` too, if
/// given, and updates the digests of `tap`. Stops with an error when
/// `stop` is set.
#[allow(clippy::too_many_arguments)]
pub fn copy_extents(
    src: &Path,
    dst: &dyn Sink,
    extents: &[Extent],
    mut hash: Option<&mut Sha256>,
    mut tap: Option<&mut Tap<'_>>,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<Copied, String> {
    let mut written = 0;
    let read = read_extents(src, extents, stop, progress, |off, data| {
        if let Some(h) = hash.as_mut() {
            h.update(data);
        }
        if let Some(t) = tap.as_mut() {
            for i in t.digests.absorb(off, data) {
                if t.partial.last() != Some(&i) {
                    t.partial.push(i);
                }
            }
        }
        written += dst.put(data, off)?;
        Ok(())
    })?;
    Ok(Copied { read, written })
}

/// Reads the whole snapshot image `src` of `size` bytes with O_DIRECT
/// through the digest pipeline ([`digest::pipeline`]: the blocks are
/// digested on other threads while the next piece is read) and hands each
/// piece with the digests of its blocks to `consume`. Stops with an error
/// when `stop` is set. Returns the bytes read.
pub(crate) fn read_digested(
    src: &Path,
    size: u64,
    stop: &AtomicBool,
    progress: &dyn Progress,
    consume: &mut digest::Consume<'_>,
) -> Result<u64, String> {
    let img = open_image(src)?;
    let mut read = 0;
    digest::pipeline(
        size,
        IO_SIZE,
        digest::threads(),
        &mut |off, buf| {
            if stop.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            // Direct I/O wants whole sectors; the device size is one.
            img.read_exact_at(buf, off)
                .map_err(|e| format!("read {} at {off}: {e}", src.display()))?;
            read += buf.len() as u64;
            progress.update(read, size);
            Ok(())
        },
        consume,
    )?;
    Ok(read)
}

/// Reads the whole snapshot image `src` and writes to `dst` the blocks of
/// `digests` whose digest differs, setting their new digest: an
/// incremental backup without a change map.
pub fn copy_changed_blocks(
    src: &Path,
    dst: &dyn Sink,
    digests: &mut Digests,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<Copied, String> {
    let mut written = 0;
    let size = digests.size();
    let read = read_digested(src, size, stop, progress, &mut |off, data, sums| {
        // Pieces start on multiples of IO_SIZE, a multiple of the block:
        // every block here is whole (the last one ends the device).
        let first = (off / digest::BLOCK) as usize;
        for (k, (block, sum)) in data.chunks(digest::BLOCK as usize).zip(sums).enumerate() {
            if digests.get(first + k) == Some(sum) {
                continue;
            }
            written += dst.put(block, off + k as u64 * digest::BLOCK)?;
            digests.set(first + k, *sum);
        }
        Ok(())
    })?;
    Ok(Copied { read, written })
}

/// Writes to `dst` the blocks of the snapshot image `src` whose digest in
/// `known` (the image's, computed by an earlier read of it) differs from
/// `digests` (the previous backup's), and makes `digests` the image's: a
/// digest incremental that reads only what it writes.
pub fn copy_known(
    src: &Path,
    dst: &dyn Sink,
    digests: &mut Digests,
    known: Digests,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<Copied, String> {
    if known.size() != digests.size() {
        return Err("the digests read are of another size".into());
    }
    let mut extents: Vec<Extent> = Vec::new();
    for i in (0..known.blocks()).filter(|&i| known.get(i) != digests.get(i)) {
        let (s, e) = known.span(i);
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += e - s,
            _ => extents.push((s, e - s)),
        }
    }
    let c = copy_extents(src, dst, &extents, None, None, stop, progress)?;
    *digests = known;
    Ok(c)
}

/// An incremental that checks its device ([`crate::source`]): reads the
/// whole snapshot image `src`, writes to `dst` what `plan` (the change
/// map's extents) holds and every block that differs from the previous
/// backup (digests `prev`) although the plan does not make it equal to the
/// device (`point` reads `dst`'s content, through its backing chain), then
/// makes `prev` the image's digests. Returns the counts and what the check
/// found.
#[allow(clippy::too_many_arguments)]
pub fn copy_checked(
    src: &Path,
    dst: &dyn Sink,
    plan: &[Extent],
    prev: &mut Digests,
    point: &mut crate::digest::ReadAt<'_>,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<(Copied, Found), String> {
    let mut written = 0;
    let size = prev.size();
    let (read, found, now) = {
        let mut check = Check::new(prev, Some(plan));
        let read = read_digested(src, size, stop, progress, &mut |off, data, sums| {
            let end = off + data.len() as u64;
            let first = plan.partition_point(|&(s, len)| s + len <= off);
            for &(s, len) in plan[first..].iter().take_while(|&&(s, _)| s < end) {
                let (a, b) = (s.max(off), (s + len).min(end));
                written += dst.put(&data[(a - off) as usize..(b - off) as usize], a)?;
            }
            for i in check.piece(off, data, sums, point)? {
                let (s, e) = check.now.span(i);
                written += dst.put(&data[(s - off) as usize..(e - off) as usize], s)?;
            }
            Ok(())
        })?;
        (read, Found::of(&check, None), check.now)
    };
    *prev = now;
    Ok((Copied { read, written }, found))
}

/// Says what a check of `device` against `what` (the previous backup)
/// found, loudly where the change map missed blocks, copied into `into`.
/// (`WARNING,` and not `WARNING:`, which is what a kernel splat says: the
/// test harness fails a run whose console shows one.)
pub(crate) fn report_check(device: &Path, f: &Found, what: &str, into: &str, log: &dyn Fn(&str)) {
    let dev = device.display();
    if f.missed.is_empty() {
        log(&format!(
            "{dev}: checked against the device: {} blocks differ from {what}, all of them marked by the change map",
            f.differ
        ));
        return;
    }
    log(&format!(
        "{dev}: WARNING, the change map MISSED {} blocks of {} KiB ({} bytes) that differ from {what}: something wrote to the device unseen by the tracking (another OS, a host editing the disk image, a write before tracking started...); they are copied into {into}, which equals the device:",
        f.missed.len(),
        digest::BLOCK >> 10,
        f.missed.iter().map(|m| m.end - m.start).sum::<u64>()
    ));
    for l in f.missed_lines(32) {
        log(&format!("{dev}:   missed {l}"));
    }
}

/// Digests `blocks` again from the backup file `path`.
pub fn rehash(path: &Path, digests: &mut Digests, blocks: &[usize]) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; digest::BLOCK as usize];
    for &i in blocks {
        let (s, e) = digests.span(i);
        let data = &mut buf[..(e - s) as usize];
        f.read_exact_at(data, s)
            .map_err(|e| format!("{}: read at {s}: {e}", path.display()))?;
        digests.set(i, digest::hash(data));
    }
    Ok(())
}

/// SHA-256 of a file's first `size` bytes (a sparse tail reads as zeroes).
pub fn sha256_file(path: &Path, size: u64) -> Result<String, String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; IO_SIZE];
    let mut left = size;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        let got = f
            .read(&mut buf[..n])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if got == 0 {
            // Past the end of a short file: zeroes.
            buf[..n].fill(0);
            h.update(&buf[..n]);
            left -= n as u64;
            continue;
        }
        h.update(&buf[..got]);
        left -= got as u64;
    }
    Ok(hex(&h.finalize()))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Options of a backup run.
pub struct Options<'a> {
    /// The devices, backed up from one snapshot.
    pub devices: &'a [PathBuf],
    /// The difference storage for the snapshot.
    pub store: &'a Path,
    /// Its limit in sectors.
    pub limit_sectors: u64,
    /// Where the backups go.
    pub dir: &'a Path,
    /// What to make; an incremental or differential falls back to full
    /// when it cannot be made.
    pub kind: Kind,
    /// Set to interrupt the backup.
    pub stop: &'a AtomicBool,
    /// Progress reports.
    pub progress: &'a dyn Progress,
    /// Messages for the user.
    pub log: &'a dyn Fn(&str),
    /// Leave the snapshot in place after a successful backup, to compare
    /// its images with the backups; the caller destroys it.
    pub keep_snapshot: bool,
    /// How the backups are kept.
    pub layout: Layout,
    /// Check incrementals against the device ([`crate::source`]): read it
    /// whole, and copy the blocks the change map missed too.
    pub verify_source: bool,
    /// The hooks run around the take ([`crate::hooks`]).
    pub hooks: &'a crate::hooks::Hooks,
}

/// How the backups of a device are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One raw image `DIR/<name>.img` updated in place by incrementals.
    Raw,
    /// A chain of restore points in qcow2, `DIR/<name>/point-NNNN.qcow2`
    /// ([`crate::points`]).
    Points,
}

/// The result of a backup run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The snapshot, if it was kept.
    pub snapshot: Option<String>,
    /// The file systems frozen for the take besides those the kernel
    /// freezes (on devices stacked over the snapshot's): mount points.
    pub frozen: Vec<PathBuf>,
    /// One outcome per device.
    pub devices: Vec<Outcome>,
    /// The hooks run around the take, and the freeze window; a failed
    /// `post-thaw` hook is here (the backup is complete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<crate::hooks::Ran>,
}

/// The result for one device.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The device.
    pub device: String,
    /// What was made (a fallback shows here).
    pub kind: Kind,
    /// How it found what to copy.
    pub method: Method,
    /// Device size in bytes.
    pub size: u64,
    /// The counts.
    pub copied: Copied,
    /// The manifest.
    pub manifest: PathBuf,
    /// The snapshot image the backup was read from.
    pub image: PathBuf,
    /// The restore point made, for the points layout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<u32>,
    /// The backup file written.
    pub file: PathBuf,
    /// What a check against the device found (`verify_source`), the
    /// missed blocks copied into this backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<Found>,
}

pub(crate) struct Device {
    pub(crate) path: PathBuf,
    pub(crate) tracker: Tracker,
    pub(crate) previous: Option<Manifest>,
    pub(crate) kind: Kind,
    pub(crate) method: Method,
    /// The digests of the previous backup's image, for an incremental.
    pub(crate) digests: Option<Digests>,
    /// The digests of the snapshot image, when they were read before
    /// (`verify --source --repair`): a digest incremental then reads only
    /// the blocks that differ.
    pub(crate) known: Option<Digests>,
    /// The chain's lock, for the points layout.
    pub(crate) _lock: Option<crate::points::Lock>,
    /// The previous point opened through its chain, every image checked
    /// against its manifest, for an incremental restore point to read
    /// through.
    pub(crate) previous_image: Option<crate::qcow::Image>,
    /// What made the device the origin of an LVM snapshot at the take,
    /// recorded in the manifest ([`Manifest::lvm_origin`]).
    pub(crate) lvm_origin: Option<String>,
}

/// Destroys the snapshot when dropped.
pub(crate) struct SnapshotGuard<'a>(pub(crate) &'a Control, pub(crate) SnapshotId);

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.snapshot_destroy(&self.1);
    }
}

/// Why the snapshot of a device cannot be trusted, if it cannot: the error
/// it failed with (`error_code`: it is corrupted, by a full store, a
/// stalled copy-on-write, a device gone...), or its state cannot be read.
/// A backup asks before it starts and again before its point or manifest
/// says complete: image reads of a corrupted snapshot fail, but a snapshot
/// that fails after the last read would otherwise go unnoticed.
pub(crate) fn snapshot_failed(tracker: &Tracker) -> Option<String> {
    match tracker.snapshot_info() {
        Ok(s) if s.error_code == 0 => None,
        Ok(s) => Some(format!(
            "the snapshot failed with error {} ({})",
            s.error_code,
            nix::errno::Errno::from_raw(-s.error_code).desc()
        )),
        Err(e) => Some(format!("the snapshot's state cannot be read: {e}")),
    }
}

/// Makes a backup of `opts.devices`.
pub fn run(opts: &Options<'_>) -> Result<Report, String> {
    std::fs::create_dir_all(opts.dir).map_err(|e| format!("{}: {e}", opts.dir.display()))?;
    crate::stack::check_store(opts.store, opts.devices)?;
    let ctl = Control::open().map_err(|e| e.to_string())?;
    let mut devices = Vec::new();
    if opts.layout == Layout::Points && opts.kind == Kind::Differential {
        return Err(
            "a differential backup is made in the raw layout (--format raw); restore points are incrementals"
                .into(),
        );
    }
    for path in opts.devices {
        let tracker = Tracker::open(path).map_err(|e| e.to_string())?;
        let (_, manifest, _) = paths(opts.dir, path);
        let mut kind = opts.kind;
        let mut previous = None;
        let mut previous_image = None;
        let mut lock = None;
        if opts.layout == Layout::Points {
            let chain = crate::points::chain_dir(opts.dir, path);
            let l = crate::points::Lock::take(&chain)?;
            crate::points::destroy_stale_snapshots(&chain, &ctl, opts.log)?;
            if kind != Kind::Full {
                match crate::points::latest(&chain)? {
                    // A chain that does not read as its manifests say is
                    // not built on.
                    Some(p) => match crate::points::open_point(&chain, p.number) {
                        Ok(img) => {
                            previous = Some(p.manifest);
                            previous_image = Some(img);
                        }
                        Err(e) => {
                            (opts.log)(&format!(
                                "{}: the last restore point cannot be built on: {e}; making a full backup instead",
                                path.display()
                            ));
                            kind = Kind::Full;
                        }
                    },
                    None => {
                        return Err(format!(
                            "{}: no complete restore point in {} for an incremental backup; make a full backup first",
                            path.display(),
                            chain.display()
                        ))
                    }
                }
            }
            lock = Some(l);
        } else if kind != Kind::Full {
            // Checked before anything changes on the device.
            match Manifest::load(&manifest) {
                Ok(m) => previous = Some(m),
                Err(e) => {
                    return Err(format!(
                        "{}: no usable manifest for an incremental backup ({e}); make a full backup first",
                        path.display()
                    ))
                }
            }
        }
        if tracker.cbt_info().is_err() {
            tracker.attach().map_err(|e| e.to_string())?;
            (opts.log)(&format!("{}: change tracking started", path.display()));
        }
        if let Some(m) = &previous {
            if m.status != Status::Complete {
                (opts.log)(&format!(
                    "{}: the previous backup did not complete; making a full backup instead",
                    path.display()
                ));
                kind = Kind::Full;
            }
        }
        devices.push(Device {
            path: path.clone(),
            tracker,
            previous,
            kind,
            method: if kind == Kind::Full {
                Method::Full
            } else {
                Method::Cbt
            },
            digests: None,
            known: None,
            _lock: lock,
            previous_image,
            lvm_origin: None,
        });
    }

    let id = ctl
        .snapshot_create(opts.store, opts.limit_sectors)
        .map_err(|e| e.to_string())?;
    let guard = SnapshotGuard(&ctl, id);
    for d in &devices {
        d.tracker.snapshot_add(&id).map_err(|e| e.to_string())?;
    }
    // Whether each device is the origin of an LVM snapshot, looked at
    // before and after the take: one that was at either time is recorded.
    let origins: Vec<Option<String>> = devices
        .iter()
        .map(|d| crate::stack::lvm_origin(&d.path))
        .collect();
    let ctx = crate::hooks::Context {
        snapshot: id.to_string(),
        devices: opts.devices,
    };
    let (frozen, ran) = opts
        .hooks
        .around(&ctx, opts.log, || take(&ctl, &id, opts.devices, opts.log))?;
    for (d, o) in devices.iter_mut().zip(origins) {
        d.lvm_origin = o.or_else(|| crate::stack::lvm_origin(&d.path));
    }

    // The take starts a new CBT generation if tracking restarted or the
    // device changed size: only now can the numbers be compared.
    let mut why_digest = Vec::new();
    for d in devices.iter_mut() {
        let (Some(m), Kind::Incremental | Kind::Differential) = (&d.previous, d.kind) else {
            why_digest.push(None);
            continue;
        };
        let info = d.tracker.cbt_info().map_err(|e| e.to_string())?;
        let c = choose(
            m,
            d.kind,
            &d.path,
            info.device_capacity,
            &info.generation,
            &Identity::read(&d.path),
            d.lvm_origin.as_deref(),
        );
        if let (Kind::Full, Some(why)) = (c.kind, &c.why) {
            (opts.log)(&format!(
                "{}: {why}; making a full backup instead",
                d.path.display()
            ));
        }
        d.kind = c.kind;
        d.method = c.method;
        why_digest.push(c.why.filter(|_| c.method == Method::Digest));
    }
    // The digests an incremental compares (digest method) or keeps up to
    // date (change map).
    for (d, why) in devices.iter_mut().zip(why_digest) {
        let (Some(m), Kind::Incremental) = (&d.previous, d.kind) else {
            continue;
        };
        let why = why.unwrap_or_default();
        let Some(f) = &m.digests else {
            continue;
        };
        let digest_dir = if opts.layout == Layout::Points {
            crate::points::chain_dir(opts.dir, &d.path)
        } else {
            opts.dir.to_path_buf()
        };
        match load_digests(&digest_dir, f, m.size) {
            Ok(digests) => d.digests = Some(digests),
            Err(e) if d.method == Method::Digest => {
                (opts.log)(&format!(
                    "{}: {why}, and {e}; making a full backup instead",
                    d.path.display()
                ));
                d.kind = Kind::Full;
                d.method = Method::Full;
            }
            Err(e) => (opts.log)(&format!(
                "{}: {e}; the image's digests are dropped",
                d.path.display()
            )),
        }
        if d.method == Method::Digest {
            (opts.log)(&format!(
                "{}: the change map is not used: {why}; reading the whole device and writing the blocks whose digest changed",
                d.path.display()
            ));
        }
    }
    if opts.verify_source {
        for d in devices.iter().filter(|d| d.method != Method::Cbt) {
            (opts.log)(&format!(
                "{}: --verify-source: a {} backup copies every block that differs: nothing for the check to add",
                d.path.display(),
                if d.method == Method::Digest { "digest" } else { "full" }
            ));
        }
    }

    let mut out = Vec::new();
    for d in devices.iter_mut() {
        out.push(match opts.layout {
            Layout::Raw => backup_device(d, opts)?,
            Layout::Points => crate::points::backup_device(d, opts, &id)?,
        });
    }
    let snapshot = if opts.keep_snapshot {
        std::mem::forget(guard);
        Some(id.to_string())
    } else {
        None
    };
    Ok(Report {
        snapshot,
        frozen,
        devices: out,
        hooks: (!opts.hooks.is_empty()).then_some(ran),
    })
}

/// Takes snapshot `id` of `devices`. The kernel freezes the file systems
/// of the devices and of a whole disk's partitions; those on devices
/// stacked over them (LVM logical volumes, dm-crypt, md on a partition of
/// the disk), which its freeze does not reach, are frozen here around the
/// take (see [`crate::stack::Frozen`]), so that the snapshot holds them
/// clean, not as a power cut would leave them. Returns their mount points.
pub fn take(
    ctl: &Control,
    id: &SnapshotId,
    devices: &[PathBuf],
    log: &dyn Fn(&str),
) -> Result<Vec<PathBuf>, String> {
    let mounts = crate::stack::stacked_mounts(devices).unwrap_or_else(|e| {
        log(&format!(
            "cannot list the file systems on devices stacked over the snapshot's ({e}): \
             they are not frozen, the snapshot holds them as a power cut would leave them"
        ));
        Vec::new()
    });
    let start = std::time::Instant::now();
    let frozen = crate::stack::Frozen::freeze(&mounts);
    let paths = frozen.paths();
    let taken = ctl.snapshot_take(id);
    // Nothing is printed before the thaw: stderr may go to a logger that
    // writes to a frozen file system.
    let notes = frozen.thaw();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    for n in &notes {
        log(n);
    }
    if !paths.is_empty() {
        log(&format!(
            "froze {} for the take ({ms:.0} ms): on devices stacked over the snapshot's, beyond the kernel's freeze",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    taken.map_err(|e| e.to_string())?;
    Ok(paths)
}

fn backup_device(d: &mut Device, opts: &Options<'_>) -> Result<Outcome, String> {
    let info = d.tracker.cbt_info().map_err(|e| e.to_string())?;
    if let Some(why) = snapshot_failed(&d.tracker) {
        return Err(format!("{}: {why}", d.path.display()));
    }
    let snap = d.tracker.snapshot_info().map_err(|e| e.to_string())?;
    let image = PathBuf::from(format!("/dev/{}", snap.image));
    let (img_path, manifest_path, diff_path) = paths(opts.dir, &d.path);
    let digest_path = img_path.with_extension("digests");
    let size = info.device_capacity;

    let mut m = Manifest {
        format: FORMAT,
        device: d.path.display().to_string(),
        dev: dev_string(&d.path)?,
        identity: identity(&d.path),
        size,
        block_size: info.block_size,
        generation: info.generation.clone(),
        snapshot_number: info.changes_number,
        base_number: info.changes_number,
        kind: d.kind,
        status: Status::InProgress,
        image: img_path.file_name().unwrap().to_string_lossy().to_string(),
        sha256: String::new(),
        bytes_read: 0,
        bytes_written: 0,
        ranges: Vec::new(),
        method: Some(d.method),
        digests: None,
        point: None,
        image_format: None,
        backing: None,
        time: None,
        merged: false,
        merging: false,
        snapshot: None,
        missed: Vec::new(),
        lvm_origin: d.lvm_origin.clone(),
    };
    let mut method = d.method;
    let mut verified = None;
    let (copied, manifest) = match d.kind {
        Kind::Full => {
            m.store(&manifest_path)?;
            let mut digests = Digests::new(size);
            let (c, sum) = copy_to_new_file(
                &image,
                &img_path,
                &[(0, size)],
                size,
                Some(&mut digests),
                opts,
            )?;
            m.sha256 = sum;
            m.digests = Some(store_digests(&digests, &digest_path)?);
            (c, manifest_path)
        }
        Kind::Incremental | Kind::Differential => {
            let prev = d.previous.as_ref().ok_or("no previous manifest")?;
            m.base_number = prev.base_number;
            let img_len = std::fs::metadata(&img_path).map(|md| md.len()).unwrap_or(0);
            if img_len != size {
                return Err(format!(
                    "{}: {} bytes, but the device has {}: make a full backup",
                    img_path.display(),
                    img_len,
                    size
                ));
            }
            // The digests of the image as it is, if it has usable ones.
            let mut digests = d.digests.take();
            if method == Method::Digest && digests.is_none() {
                return Err(format!(
                    "{}: the change map cannot be used and the image has no usable digests: make a full backup",
                    d.path.display()
                ));
            }
            if d.kind == Kind::Incremental {
                let mut inprogress = prev.clone();
                inprogress.status = Status::InProgress;
                inprogress.store(&manifest_path)?;
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&img_path)
                    .map_err(|e| format!("{}: {e}", img_path.display()))?;
                let c = match (method, digests.as_mut()) {
                    (Method::Digest, Some(digests)) => {
                        copy_changed_blocks(&image, &InPlace(&f), digests, opts.stop, opts.progress)
                            .map_err(|e| format!("{}: {e}", img_path.display()))?
                    }
                    (_, Some(digests)) if opts.verify_source => {
                        method = Method::Cbt;
                        let extents =
                            changed_since(&d.tracker, prev.snapshot_number, info.block_size, size)?;
                        let (c, found) = copy_checked(
                            &image,
                            &InPlace(&f),
                            &extents,
                            digests,
                            &mut |s, buf| {
                                f.read_exact_at(buf, s).map_err(|e| {
                                    format!("{}: read at {s}: {e}", img_path.display())
                                })
                            },
                            opts.stop,
                            opts.progress,
                        )
                        .map_err(|e| format!("{}: {e}", img_path.display()))?;
                        report_check(&d.path, &found, "the last backup", "the image", opts.log);
                        m.missed = found.missed_ranges();
                        verified = Some(found);
                        c
                    }
                    (_, digests) => {
                        method = Method::Cbt;
                        if opts.verify_source {
                            (opts.log)(&format!(
                                "{}: WARNING, --verify-source: the last backup has no usable digests: the device is not checked",
                                d.path.display()
                            ));
                        }
                        let extents =
                            changed_since(&d.tracker, prev.snapshot_number, info.block_size, size)?;
                        let mut tap = digests.map(|digests| Tap {
                            digests,
                            partial: Vec::new(),
                        });
                        let c = copy_extents(
                            &image,
                            &InPlace(&f),
                            &extents,
                            None,
                            tap.as_mut(),
                            opts.stop,
                            opts.progress,
                        )
                        .map_err(|e| format!("{}: {e}", img_path.display()))?;
                        if let Some(t) = tap {
                            f.sync_all().map_err(|e| e.to_string())?;
                            rehash(&img_path, t.digests, &t.partial)?;
                        }
                        c
                    }
                };
                f.sync_all().map_err(|e| e.to_string())?;
                m.sha256 = sha256_file(&img_path, size)?;
                if let Some(digests) = &digests {
                    m.digests = Some(store_digests(digests, &digest_path)?);
                }
                (c, manifest_path)
            } else {
                // The base and its manifest stay untouched; the changes go
                // to a new file with a manifest of its own.
                let extents = changed_since(&d.tracker, prev.base_number, info.block_size, size)?;
                m.image = diff_path.file_name().unwrap().to_string_lossy().to_string();
                let (c, sum) = copy_to_new_file(&image, &diff_path, &extents, size, None, opts)?;
                m.sha256 = sum;
                m.ranges = extents;
                (c, manifest_path.with_extension("diff.json"))
            }
        }
    };
    m.method = Some(method);
    m.bytes_read = copied.read;
    m.bytes_written = copied.written;
    // What was copied is the snapshot's only if it did not fail meanwhile.
    if let Some(why) = snapshot_failed(&d.tracker) {
        m.store(&manifest)?;
        return Err(format!(
            "{}: {why} while the backup was copied: {} stays marked in-progress; the next incremental is a full backup",
            d.path.display(),
            manifest.display()
        ));
    }
    m.status = Status::Complete;
    m.store(&manifest)?;
    Ok(Outcome {
        device: m.device,
        kind: d.kind,
        method,
        size,
        copied,
        manifest,
        image,
        point: None,
        file: opts.dir.join(&m.image),
        verified,
    })
}

/// Writes `digests` to `path`; returns what the manifest says of them.
pub(crate) fn store_digests(digests: &Digests, path: &Path) -> Result<DigestFile, String> {
    digests.store(path)?;
    Ok(DigestFile {
        file: path.file_name().unwrap().to_string_lossy().to_string(),
        algorithm: digest::ALGORITHM.into(),
        block_size: digest::BLOCK as u32,
        sha256: sha256_file(
            path,
            std::fs::metadata(path).map_err(|e| e.to_string())?.len(),
        )?,
    })
}

/// Reads the digests a manifest names, checking them against it.
pub(crate) fn load_digests(dir: &Path, f: &DigestFile, size: u64) -> Result<Digests, String> {
    if f.algorithm != digest::ALGORITHM || u64::from(f.block_size) != digest::BLOCK {
        return Err(format!(
            "digests of {} bytes by {} are not ours ({} bytes by {})",
            f.block_size,
            f.algorithm,
            digest::BLOCK,
            digest::ALGORITHM
        ));
    }
    // A name in the backup's own directory, of a regular file: a manifest
    // that names anything else is not followed.
    if f.file.is_empty() || f.file.contains('/') || f.file == "." || f.file == ".." {
        return Err(format!(
            "the manifest names the digests file {:?}: only a file of {} is read",
            f.file,
            dir.display()
        ));
    }
    let path = dir.join(&f.file);
    let md = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !md.file_type().is_file() {
        return Err(format!(
            "{}: not a regular file: the digests are not read from it",
            path.display()
        ));
    }
    let len = md.len();
    let sum = sha256_file(&path, len)?;
    if sum != f.sha256 {
        return Err(format!(
            "{}: checksum {sum} does not match the manifest's {}",
            path.display(),
            f.sha256
        ));
    }
    Digests::load(&path, size)
}

/// Copies `extents` of the snapshot image into a new sparse file `path` of
/// `size` bytes, written as `path.partial` and renamed when complete.
/// Returns the counts and the file's SHA-256, computed while copying when the
/// extents are the whole device. Sets `digests` to those of the new file.
fn copy_to_new_file(
    image: &Path,
    path: &Path,
    extents: &[Extent],
    size: u64,
    digests: Option<&mut Digests>,
    opts: &Options<'_>,
) -> Result<(Copied, String), String> {
    let tmp = path.with_extension("img.partial");
    let f = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.set_len(size)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let whole = extents == [(0, size)];
    let mut hash = Sha256::new();
    let mut tap = digests.map(|digests| Tap {
        digests,
        partial: Vec::new(),
    });
    let c = copy_extents(
        image,
        &Sparse(&f),
        extents,
        whole.then_some(&mut hash),
        tap.as_mut(),
        opts.stop,
        opts.progress,
    )
    .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.sync_all()
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(t) = tap {
        // Blocks the copy did not read whole (none for a whole device):
        // digested from the file, zeroes where it did not write.
        rehash(path, t.digests, &t.partial)?;
    }
    let sum = if whole {
        hex(&hash.finalize())
    } else {
        sha256_file(path, size)?
    };
    Ok((c, sum))
}

/// Checks an image against its manifest; returns the checksum.
pub fn verify(image: &Path, manifest: &Path) -> Result<String, String> {
    let m = Manifest::load(manifest)?;
    if m.status != Status::Complete {
        return Err(format!(
            "{}: the backup did not complete",
            manifest.display()
        ));
    }
    let len = std::fs::metadata(image)
        .map_err(|e| format!("{}: {e}", image.display()))?
        .len();
    if len != m.size {
        return Err(format!(
            "{}: {} bytes, the manifest says {}",
            image.display(),
            len,
            m.size
        ));
    }
    let sum = sha256_file(image, m.size)?;
    if sum != m.sha256 {
        return Err(format!(
            "{}: checksum {} does not match the manifest's {}",
            image.display(),
            sum,
            m.sha256
        ));
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_read_from_the_backups_own_directory_only() {
        let dir = std::env::temp_dir().join(format!("blksnap-dg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let d = Digests::new(1 << 20);
        let f = store_digests(&d, &dir.join("ok.digests")).unwrap();
        assert!(load_digests(&dir, &f, 1 << 20).is_ok());
        std::os::unix::fs::symlink(dir.join("ok.digests"), dir.join("link.digests")).unwrap();
        std::fs::copy(dir.join("ok.digests"), dir.join("sub/x.digests")).unwrap();
        // A good digests file outside the directory.
        let outside = format!("blksnap-dg-{}-outside.digests", std::process::id());
        let outside_path = dir.parent().unwrap().join(&outside);
        std::fs::copy(dir.join("ok.digests"), &outside_path).unwrap();
        let up = format!("../{outside}");
        for (name, want) in [
            (up.as_str(), "only a file of"),
            ("sub/x.digests", "only a file of"),
            ("/etc/passwd", "only a file of"),
            ("..", "only a file of"),
            ("", "only a file of"),
            ("link.digests", "not a regular file"),
        ] {
            let bad = DigestFile {
                file: name.into(),
                ..f.clone()
            };
            let e = load_digests(&dir, &bad, 1 << 20).unwrap_err();
            assert!(e.contains(want), "{name}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(outside_path).unwrap();
    }
}
