// SPDX-License-Identifier: GPL-2.0

//! A chain of restore points checked against its device: `verify --source`
//! and `backup incremental --verify-source`.
//!
//! A change map can be wrong behind our back: a write the module never saw
//! (another OS booted on the disk, a host that edits a VM's disk image, a
//! write before tracking started) is in no map, so no incremental copies
//! it, and `verify` cannot notice: a point's digests are built from what it
//! copied. The check reads the device (a snapshot of it) whole, digests it
//! in the blocks of the digest files, and compares with the newest complete
//! point, taking into account what the change map says changed since that
//! point (the same plan an incremental would copy). A block that differs
//! from the point is
//!
//! - explained when the blocks the plan copies make it equal to the device
//!   (the point's block, with the planned pieces taken from the device);
//! - missed otherwise: an incremental would leave it as the point has it.
//!
//! When the change map cannot say (another generation, another device),
//! every differing block is reported as such, without a verdict.

use crate::backup::{self, Extent, Kind, Method, Outcome, Progress};
use crate::digest::{Digests, BLOCK, LEN};
use crate::identity::Identity;
use crate::{points, Control, Tracker};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// The pieces in which a missed block is compared with the point, to say
/// where it differs: the fine map's block.
pub const PIECE: u64 = 4096;

/// A block that differs from the point although the change map does not
/// explain it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Missed {
    /// Its number (of [`BLOCK`] bytes).
    pub block: usize,
    /// Its first byte.
    pub start: u64,
    /// The byte after it.
    pub end: u64,
    /// The byte ranges of its [`PIECE`]s that differ, merged.
    pub differ: Vec<(u64, u64)>,
}

/// The check of a device's content, piece by piece, against a point.
pub struct Check<'a> {
    prev: &'a Digests,
    plan: Option<&'a [Extent]>,
    /// The digests of the device's content, as read.
    pub now: Digests,
    /// Blocks that differ from the point.
    pub differ: u64,
    /// Of those, the blocks the change map explains.
    pub explained: u64,
    /// Of those, the blocks it does not explain.
    pub missed: Vec<Missed>,
    /// When the change map cannot say: the blocks that differ.
    pub unexplained: Vec<usize>,
}

impl<'a> Check<'a> {
    /// A check against a point of digests `prev`, with `plan`, the byte
    /// ranges (sorted, not overlapping) an incremental would copy, or
    /// `None` when the change map cannot say.
    pub fn new(prev: &'a Digests, plan: Option<&'a [Extent]>) -> Self {
        Self {
            prev,
            plan,
            now: Digests::new(prev.size()),
            differ: 0,
            explained: 0,
            missed: Vec::new(),
            unexplained: Vec::new(),
        }
    }

    /// The parts of bytes `s..e` the plan copies.
    fn covered(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let plan = self.plan.unwrap_or(&[]);
        let first = plan.partition_point(|&(start, len)| start + len <= s);
        plan[first..]
            .iter()
            .take_while(|&&(start, _)| start < e)
            .map(|&(start, len)| (start.max(s), (start + len).min(e)))
            .filter(|(a, b)| a < b)
            .collect()
    }

    /// Takes `data`, the device's bytes from `off` (a multiple of
    /// [`BLOCK`]), with `sums`, the digests of its blocks. For a block that
    /// differs from the point and that the plan does not copy whole,
    /// `point` reads the point's block (`point(start, buf)`). Returns the
    /// blocks found missed here.
    pub fn piece(
        &mut self,
        off: u64,
        data: &[u8],
        sums: &[[u8; LEN]],
        point: &mut crate::digest::ReadAt<'_>,
    ) -> Result<Vec<usize>, String> {
        let first = (off / BLOCK) as usize;
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for (k, (block, sum)) in data.chunks(BLOCK as usize).zip(sums).enumerate() {
            let i = first + k;
            self.now.set(i, *sum);
            if self.prev.get(i) == Some(sum) {
                continue;
            }
            self.differ += 1;
            if self.plan.is_none() {
                self.unexplained.push(i);
                continue;
            }
            let (s, e) = self.now.span(i);
            let covered = self.covered(s, e);
            if covered.iter().map(|(a, b)| b - a).sum::<u64>() == e - s {
                self.explained += 1;
                continue;
            }
            // What an incremental would leave there: the point's block
            // with the planned pieces copied from the device.
            buf.resize(block.len(), 0);
            point(s, &mut buf)?;
            for (a, b) in covered {
                let (a, b) = ((a - s) as usize, (b - s) as usize);
                buf[a..b].copy_from_slice(&block[a..b]);
            }
            if buf == block {
                self.explained += 1;
                continue;
            }
            let mut differ: Vec<(u64, u64)> = Vec::new();
            for (p, (x, y)) in buf
                .chunks(PIECE as usize)
                .zip(block.chunks(PIECE as usize))
                .enumerate()
            {
                if x == y {
                    continue;
                }
                let a = s + p as u64 * PIECE;
                let b = a + x.len() as u64;
                match differ.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => differ.push((a, b)),
                }
            }
            self.missed.push(Missed {
                block: i,
                start: s,
                end: e,
                differ,
            });
            out.push(i);
        }
        Ok(out)
    }

    /// The byte ranges of the unexplained blocks, merged.
    pub fn unexplained_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &i in &self.unexplained {
            let (s, e) = self.now.span(i);
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }
}

/// What a check found, for a report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Found {
    /// Whether the change map could say what changed since the point.
    pub cbt: bool,
    /// Why it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
    /// Blocks of [`BLOCK`] bytes that differ from the point.
    pub differ: u64,
    /// Of those, the blocks the change map explains.
    pub explained: u64,
    /// The blocks it missed.
    pub missed: Vec<Missed>,
    /// When it could not say: the byte ranges that differ, merged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unexplained: Vec<(u64, u64)>,
}

impl Found {
    /// The summary of a finished check; `why_not` when the change map
    /// could not say.
    pub fn of(c: &Check<'_>, why_not: Option<String>) -> Self {
        Self {
            cbt: why_not.is_none(),
            why_not,
            differ: c.differ,
            explained: c.explained,
            missed: c.missed.clone(),
            unexplained: c.unexplained_ranges(),
        }
    }

    /// The missed blocks as byte ranges, merged.
    pub fn missed_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for m in &self.missed {
            match out.last_mut() {
                Some(last) if last.1 == m.start => last.1 = m.end,
                _ => out.push((m.start, m.end)),
            }
        }
        out
    }

    /// One line per missed block, at most `max` (and a line for the rest).
    pub fn missed_lines(&self, max: usize) -> Vec<String> {
        let mut out: Vec<String> = self
            .missed
            .iter()
            .take(max)
            .map(|m| {
                let d: Vec<String> = m.differ.iter().map(|(a, b)| format!("{a}..{b}")).collect();
                format!(
                    "bytes {}..{} (block {} of {} KiB): differ at {}",
                    m.start,
                    m.end,
                    m.block,
                    BLOCK >> 10,
                    d.join(", ")
                )
            })
            .collect();
        if self.missed.len() > max {
            out.push(format!("... and {} more blocks", self.missed.len() - max));
        }
        out
    }
}

/// What `verify --source` is asked.
pub struct Options<'a> {
    /// The device.
    pub device: &'a Path,
    /// The backup directory (or the device's chain in it).
    pub dir: &'a Path,
    /// The difference storage for the snapshot.
    pub store: &'a Path,
    /// Its limit in sectors.
    pub limit_sectors: u64,
    /// Make a new point when blocks were missed.
    pub repair: bool,
    /// Set to interrupt.
    pub stop: &'a AtomicBool,
    /// Progress reports.
    pub progress: &'a dyn Progress,
    /// Messages for the user.
    pub log: &'a dyn Fn(&str),
    /// The hooks run around the take ([`crate::hooks`]).
    pub hooks: &'a crate::hooks::Hooks,
}

/// What `verify --source` found (and made).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The device.
    pub device: String,
    /// The chain.
    pub chain: PathBuf,
    /// The point compared with: the newest complete one.
    pub point: u32,
    /// Device size in bytes.
    pub size: u64,
    /// Bytes read from the snapshot image by the check.
    pub bytes_read: u64,
    /// What it found.
    #[serde(flatten)]
    pub found: Found,
    /// The point `--repair` made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Outcome>,
    /// The hooks run around the take, and the freeze window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<crate::hooks::Ran>,
}

/// `verify --source`: takes a snapshot of the device, reads it whole and
/// checks it against the newest complete point of its chain, with what the
/// change map says changed since (see the module's description). With
/// `repair`, when blocks were missed, makes a new point (a digest
/// incremental over the same snapshot, reading only the blocks that
/// differ): the new point equals the device. Holds the chain's lock.
pub fn verify(opts: &Options<'_>) -> Result<Report, String> {
    let dev = opts.device.display().to_string();
    let chain = points::chain(opts.dir, Some(&dev))?;
    let lock = points::Lock::take(&chain)?;
    let ctl = Control::open().map_err(|e| e.to_string())?;
    points::destroy_stale_snapshots(&chain, &ctl, opts.log)?;
    let latest = points::latest(&chain)?
        .ok_or_else(|| format!("{}: no complete restore point", chain.display()))?;
    let m = latest.manifest.clone();
    let f = m.digests.as_ref().ok_or_else(|| {
        format!(
            "point {}: its manifest names no digests: nothing to compare the device with",
            latest.number
        )
    })?;
    let prev = backup::load_digests(&chain, f, m.size)
        .map_err(|e| format!("point {}: {e}", latest.number))?;
    crate::stack::check_store(opts.store, &[opts.device.to_path_buf()])?;
    let tracker = Tracker::open(opts.device).map_err(|e| e.to_string())?;
    if tracker.cbt_info().is_err() {
        tracker.attach().map_err(|e| e.to_string())?;
        (opts.log)(&format!(
            "{dev}: change tracking started: its change map says nothing of the time before"
        ));
    }
    let id = ctl
        .snapshot_create(opts.store, opts.limit_sectors)
        .map_err(|e| e.to_string())?;
    let _guard = backup::SnapshotGuard(&ctl, id);
    tracker.snapshot_add(&id).map_err(|e| e.to_string())?;
    let origin = crate::stack::lvm_origin(opts.device);
    let hook_devices = [opts.device.to_path_buf()];
    let ctx = crate::hooks::Context {
        snapshot: id.to_string(),
        devices: &hook_devices,
    };
    let (_frozen, ran) = opts.hooks.around(&ctx, opts.log, || {
        backup::take(&ctl, &id, &hook_devices, opts.log)
    })?;
    let origin = origin.or_else(|| crate::stack::lvm_origin(opts.device));
    let info = tracker.cbt_info().map_err(|e| e.to_string())?;
    let snap = tracker.snapshot_info().map_err(|e| e.to_string())?;
    if snap.error_code != 0 {
        return Err(format!(
            "{dev}: the snapshot failed with error {}",
            snap.error_code
        ));
    }
    let image = PathBuf::from(format!("/dev/{}", snap.image));
    let size = info.device_capacity;
    if size != m.size {
        return Err(format!(
            "{dev}: {size} bytes, point {} has {}: the device changed size, the next incremental is a full backup",
            latest.number, m.size
        ));
    }
    // What an incremental would copy now, if the change map may be used.
    let choice = backup::choose(
        &m,
        Kind::Incremental,
        opts.device,
        size,
        &info.generation,
        &Identity::read(opts.device),
        origin.as_deref(),
    );
    let plan = if choice.method == Method::Cbt {
        Some(backup::changed_since(
            &tracker,
            m.snapshot_number,
            info.block_size,
            size,
        )?)
    } else {
        (opts.log)(&format!(
            "{dev}: the change map cannot say what changed since point {}: {}; every block that differs is reported",
            latest.number,
            choice.why.as_deref().unwrap_or("")
        ));
        None
    };
    // Opened through its chain, every image checked against its manifest.
    let point_img = points::open_point(&chain, latest.number)?;
    let (read, found, now) = {
        let mut check = Check::new(&prev, plan.as_deref());
        let read = backup::read_digested(
            &image,
            size,
            opts.stop,
            opts.progress,
            &mut |off, data, sums| {
                check
                    .piece(off, data, sums, &mut |s, buf| {
                        point_img
                            .read(buf, s)
                            .map_err(|e| format!("{}: read at {s}: {e}", latest.image.display()))
                    })
                    .map(|_| ())
            },
        )?;
        (read, Found::of(&check, choice.why.clone()), check.now)
    };
    let mut report = Report {
        device: dev.clone(),
        chain: chain.clone(),
        point: latest.number,
        size,
        bytes_read: read,
        found,
        repaired: None,
        hooks: (!opts.hooks.is_empty()).then_some(ran),
    };
    if !opts.repair || report.found.missed.is_empty() {
        return Ok(report);
    }
    // The repair: a digest incremental over this snapshot, which reads
    // only the blocks whose digest differs (known now).
    let mut d = backup::Device {
        path: opts.device.to_path_buf(),
        tracker,
        previous: Some(m),
        kind: Kind::Incremental,
        method: Method::Digest,
        digests: Some(prev),
        known: Some(now),
        _lock: Some(lock),
        previous_image: Some(points::open_point(&chain, latest.number)?),
        lvm_origin: origin,
    };
    let devices = [opts.device.to_path_buf()];
    let bopts = backup::Options {
        devices: &devices,
        store: opts.store,
        limit_sectors: opts.limit_sectors,
        dir: chain.parent().unwrap_or(Path::new(".")),
        kind: Kind::Incremental,
        stop: opts.stop,
        progress: opts.progress,
        log: opts.log,
        keep_snapshot: false,
        layout: backup::Layout::Points,
        verify_source: false,
        // The snapshot is taken: no hooks.
        hooks: &crate::hooks::NONE,
    };
    if points::chain_dir(bopts.dir, opts.device) != chain {
        return Err(format!(
            "{}: not the chain a backup of {dev} writes ({}): not repaired",
            chain.display(),
            points::chain_dir(bopts.dir, opts.device).display()
        ));
    }
    let mut out = points::backup_device(&mut d, &bopts, &id)?;
    // The manifest says what the check found, as a backup with
    // --verify-source does.
    let mut pm = backup::Manifest::load(&out.manifest)?;
    pm.missed = report.found.missed_ranges();
    pm.bytes_read += read;
    pm.store(&out.manifest)?;
    out.copied.read += read;
    out.verified = Some(report.found.clone());
    report.repaired = Some(out);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest;

    /// A device of 6 blocks and a short one; the point holds `old`.
    fn setup() -> (Vec<u8>, Digests) {
        let size = 6 * BLOCK + 1024;
        let old: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
        let mut d = Digests::new(size);
        assert!(d.absorb(0, &old).is_empty());
        (old, d)
    }

    /// Runs a check of `new` against `old` with `plan`, in pieces of
    /// `step` bytes.
    fn run(
        old: &[u8],
        prev: &Digests,
        new: &[u8],
        plan: Option<&[Extent]>,
        step: usize,
    ) -> (Found, Digests, Vec<usize>) {
        let mut c = Check::new(prev, plan);
        let mut found = Vec::new();
        for (p, piece) in new.chunks(step).enumerate() {
            let off = (p * step) as u64;
            let sums = digest::hash_blocks(piece, 2);
            found.extend(
                c.piece(off, piece, &sums, &mut |s, buf| {
                    buf.copy_from_slice(&old[s as usize..s as usize + buf.len()]);
                    Ok(())
                })
                .unwrap(),
            );
        }
        let f = Found::of(&c, plan.is_none().then(|| "no map".to_string()));
        (f, c.now, found)
    }

    #[test]
    fn missed_blocks_are_found_exactly() {
        let (old, prev) = setup();
        let mut new = old.clone();
        // Explained: block 1 written whole (the plan copies it whole), a
        // 4 KiB piece of block 3 that the plan copies.
        new[BLOCK as usize..2 * BLOCK as usize].fill(7);
        let b3 = 3 * BLOCK as usize;
        new[b3 + 8192..b3 + 12288].fill(9);
        // Missed: 4 KiB of block 2 (no plan there), 4 KiB of block 3 next
        // to the planned piece, and 100 bytes of the short last block.
        let b2 = 2 * BLOCK as usize;
        new[b2 + 4096..b2 + 8192].fill(1);
        new[b3 + 20480..b3 + 20490].fill(2);
        let b6 = 6 * BLOCK as usize;
        new[b6 + 10..b6 + 110].fill(3);
        // The plan also copies block 5 (unchanged) and part of block 0
        // (unchanged): nothing to say about those.
        let plan = [
            (0, 4096),
            (BLOCK, BLOCK),
            (3 * BLOCK + 8192, 4096),
            (5 * BLOCK, BLOCK),
        ];
        for step in [BLOCK as usize, 4 * BLOCK as usize] {
            let (f, now, found) = run(&old, &prev, &new, Some(&plan), step);
            assert_eq!(found, [2, 3, 6]);
            assert_eq!((f.differ, f.explained), (4, 1));
            assert_eq!(
                f.missed,
                [
                    Missed {
                        block: 2,
                        start: 2 * BLOCK,
                        end: 3 * BLOCK,
                        differ: vec![(2 * BLOCK + 4096, 2 * BLOCK + 8192)]
                    },
                    Missed {
                        block: 3,
                        start: 3 * BLOCK,
                        end: 4 * BLOCK,
                        differ: vec![(3 * BLOCK + 20480, 3 * BLOCK + 24576)]
                    },
                    Missed {
                        block: 6,
                        start: 6 * BLOCK,
                        end: 6 * BLOCK + 1024,
                        differ: vec![(6 * BLOCK, 6 * BLOCK + 1024)]
                    },
                ]
            );
            assert!(f.cbt && f.unexplained.is_empty());
            assert_eq!(
                f.missed_ranges(),
                [(2 * BLOCK, 4 * BLOCK), (6 * BLOCK, 6 * BLOCK + 1024)]
            );
            // The digests read are the new content's.
            let mut want = Digests::new(new.len() as u64);
            want.absorb(0, &new);
            assert_eq!(now, want);
        }
        // Block 3's planned piece alone: explained.
        let mut only = old.clone();
        only[b3 + 8192..b3 + 12288].fill(9);
        let (f, _, found) = run(&old, &prev, &only, Some(&plan), BLOCK as usize);
        assert!(found.is_empty() && f.missed.is_empty());
        assert_eq!((f.differ, f.explained), (1, 1));
        // Nothing changed, whatever the plan: nothing differs.
        let (f, _, _) = run(&old, &prev, &old, Some(&plan), BLOCK as usize);
        assert_eq!((f.differ, f.explained, f.missed.len()), (0, 0, 0));
        let lines = Found::of(
            &{
                let mut c = Check::new(&prev, Some(&plan));
                let sums = digest::hash_blocks(&new, 1);
                c.piece(0, &new, &sums, &mut |s, buf| {
                    buf.copy_from_slice(&old[s as usize..s as usize + buf.len()]);
                    Ok(())
                })
                .unwrap();
                c
            },
            None,
        )
        .missed_lines(2);
        assert_eq!(
            lines,
            [
                "bytes 131072..196608 (block 2 of 64 KiB): differ at 135168..139264",
                "bytes 196608..262144 (block 3 of 64 KiB): differ at 217088..221184",
                "... and 1 more blocks"
            ]
        );
    }

    #[test]
    fn without_a_map_every_difference_is_unexplained() {
        let (old, prev) = setup();
        let mut new = old.clone();
        new[5..6].fill(0xff);
        new[BLOCK as usize + 9] ^= 1;
        new[4 * BLOCK as usize] ^= 1;
        let (f, _, found) = run(&old, &prev, &new, None, 2 * BLOCK as usize);
        assert!(found.is_empty() && f.missed.is_empty() && !f.cbt);
        assert_eq!(f.differ, 3);
        assert_eq!(f.unexplained, [(0, 2 * BLOCK), (4 * BLOCK, 5 * BLOCK)]);
    }

    #[test]
    fn covered_parts() {
        let prev = Digests::new(8 * BLOCK);
        let plan = [(100, 50), (BLOCK - 10, 20), (3 * BLOCK, 2 * BLOCK)];
        let c = Check::new(&prev, Some(&plan));
        assert_eq!(c.covered(0, BLOCK), [(100, 150), (BLOCK - 10, BLOCK)]);
        assert_eq!(c.covered(BLOCK, 2 * BLOCK), [(BLOCK, BLOCK + 10)]);
        assert_eq!(c.covered(2 * BLOCK, 3 * BLOCK), []);
        assert_eq!(c.covered(4 * BLOCK, 5 * BLOCK), [(4 * BLOCK, 5 * BLOCK)]);
    }
}
