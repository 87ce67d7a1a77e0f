// SPDX-License-Identifier: GPL-2.0

//! What proves that nobody wrote to a device while the module could not
//! see it: a fingerprint of the device taken when its CBT state is saved,
//! compared when the state is restored at the next boot.
//!
//! A file system rewrites parts of its own metadata whenever it is mounted
//! read-write or repaired, whoever does it: another operating system, a live
//! USB, a boot without the module, the host of a virtual machine editing its
//! disk image through a mount or libguestfs, fsck. The fingerprint is the
//! exact bytes of those parts:
//!
//! - ext2/3/4: the superblock (bytes 1024..2048), whose mount count, mount
//!   and write times, state and `s_kbytes_written` change at every
//!   read-write mount, remount, journal replay and fsck repair;
//! - XFS: the first 4 KiB (the superblock, whose log sequence number
//!   changes whenever it is written back, and allocation group 0's
//!   headers); a clean unmount writes the superblock, a crash of another
//!   system that had it mounted may not (see README.md);
//! - btrfs: the primary superblock (64 KiB..68 KiB), whose generation
//!   changes at every transaction commit;
//! - a partitioned disk: the partition table (its first two logical blocks
//!   and 16 KiB of GPT entries) and the fingerprint of every partition,
//!   which must all have one.
//!
//! Raw writes beneath a file system (dd onto its blocks) change none of
//! these: no fingerprint proves their absence. A device without a file
//! system has no fingerprint at all.

use core::ops::Range;

/// Bytes read from the start of a device (or partition) to probe it: up to
/// the end of the btrfs superblock.
pub const PROBE_LEN: usize = 69632;

/// At most this many regions in one fingerprint.
pub const MAX_REGIONS: usize = 64;

/// At most this many bytes in one fingerprint.
pub const MAX_BYTES: usize = 65536;

/// What a fingerprint is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Proof {
    /// Nothing: no known file system.
    None = 0,
    /// The ext2/3/4 superblock.
    Ext = 1,
    /// The XFS superblock and allocation group 0's headers.
    Xfs = 2,
    /// The btrfs superblock.
    Btrfs = 3,
    /// A partition table and the fingerprints of all its partitions.
    Partitions = 4,
}

impl Proof {
    /// From the number stored in a record; unknown numbers prove nothing.
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Ext,
            2 => Self::Xfs,
            3 => Self::Btrfs,
            4 => Self::Partitions,
            _ => Self::None,
        }
    }

    /// A name for logs and user space.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Ext => "ext4 superblock",
            Self::Xfs => "XFS superblock",
            Self::Btrfs => "btrfs superblock",
            Self::Partitions => "partition table and file systems",
        }
    }
}

/// A byte range of the device, `offset..offset + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub len: u32,
}

impl Region {
    /// The byte range.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.len)
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// The file system at the start of `head` (the first bytes of a device or
/// partition, up to [`PROBE_LEN`]) and the region of it that proves
/// nobody wrote to it, relative to its start.
pub fn probe(head: &[u8]) -> Option<(Proof, Region)> {
    // ext2/3/4: magic 0xEF53 at byte 56 of the superblock at 1024.
    if head.len() >= 2048 && le16(head, 1024 + 56) == Some(0xef53) {
        return Some((
            Proof::Ext,
            Region {
                offset: 1024,
                len: 1024,
            },
        ));
    }
    if head.len() >= 4096 && head[0..4] == *b"XFSB" {
        return Some((
            Proof::Xfs,
            Region {
                offset: 0,
                len: 4096,
            },
        ));
    }
    if head.len() >= PROBE_LEN && head[65536 + 64..65536 + 72] == *b"_BHRfS_M" {
        return Some((
            Proof::Btrfs,
            Region {
                offset: 65536,
                len: 4096,
            },
        ));
    }
    None
}

/// The regions of a partitioned disk, whose logical blocks are
/// `logical_block_size` bytes, written to `out` (room for [`MAX_REGIONS`]):
/// its partition table, then for each partition (its first byte on the
/// disk and its probe) the region its file system proves. Returns how many;
/// `None` if a partition has nothing to prove it, or there are too many.
pub fn partitioned<'a>(
    logical_block_size: u32,
    partitions: impl IntoIterator<Item = (u64, &'a [u8])>,
    out: &mut [Region],
) -> Option<usize> {
    let table = Region {
        offset: 0,
        len: 2 * logical_block_size.max(512) + 16384,
    };
    *out.first_mut()? = table;
    let mut n = 1;
    let mut bytes = table.len as usize;
    for (start, head) in partitions {
        let (_, r) = probe(head)?;
        if n == out.len().min(MAX_REGIONS) || bytes + r.len as usize > MAX_BYTES {
            return None;
        }
        out[n] = Region {
            offset: start.checked_add(r.offset)?,
            len: r.len,
        };
        bytes += r.len as usize;
        n += 1;
    }
    Some(n)
}

/// Whether `regions` are valid for a device of `size` bytes: within it,
/// not empty, at most [`MAX_REGIONS`] of at most [`MAX_BYTES`] in all.
pub fn valid(regions: &[Region], size: u64) -> bool {
    let mut bytes = 0usize;
    regions.len() <= MAX_REGIONS
        && regions.iter().all(|r| {
            bytes += r.len as usize;
            r.len > 0
                && r.offset
                    .checked_add(u64::from(r.len))
                    .is_some_and(|e| e <= size)
        })
        && bytes <= MAX_BYTES
}
