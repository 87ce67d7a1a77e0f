// SPDX-License-Identifier: GPL-2.0

//! The on-disk format of the CBT state device: where the change maps of the
//! tracked devices are saved at shutdown and found at the next boot.
//!
//! ```text
//! byte 0      header, 64 bytes used of the first 4 KiB block:
//!             magic "BLKSNAPS", version (u32), flags (u32, bit 0: clean),
//!             sequence (u64), records (u32), reserved (u32),
//!             record bytes (u64), FNV-1a 64 of the record area (u64),
//!             FNV-1a 64 of the 48 header bytes before it (u64)
//! byte 4096   the record area: per device, a 112-byte record header
//!             (id[64], capacity in sectors u64, block shift u32, reserved
//!             u32, block count u64, active number u8, previous number u8,
//!             6 reserved, generation[16]), then its active map and its
//!             read map (a byte per CBT block each), padded to 8 bytes
//! ```
//!
//! All numbers are little-endian. A save writes the record area first, then
//! the header with a preflush and FUA: a header is only ever on disk after
//! the records it describes, and its checksums catch a torn write. Only a
//! header with the clean flag lets a record be used.

use core::ops::Range;

/// The header's magic bytes.
pub const MAGIC: [u8; 8] = *b"BLKSNAPS";
/// The format version.
pub const VERSION: u32 = 1;
/// The header flag: saved by a clean shutdown, not used since.
pub const FLAG_CLEAN: u32 = 1;
/// Bytes of the header that are used.
pub const HEADER_LEN: usize = 64;
/// Where the record area starts.
pub const AREA_OFFSET: u64 = 4096;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 112;
/// Bytes of a device id, NUL-padded.
pub const ID_LEN: usize = 64;

/// Why a state device's contents cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    /// No state header: never formatted, or something else.
    NoHeader,
    /// A header of a version this code does not know.
    Version(u32),
    /// The header's checksum is wrong.
    HeaderSum,
    /// The record area's checksum is wrong, or it is cut short.
    RecordSum,
    /// A record does not fit the area, or says something impossible.
    BadRecord,
}

/// The header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub flags: u32,
    pub sequence: u64,
    pub records: u32,
    pub area_len: u64,
    pub area_sum: u64,
}

/// The fixed part of a device's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub id: [u8; ID_LEN],
    pub capacity_sectors: u64,
    pub block_shift: u32,
    pub block_count: u64,
    pub active: u8,
    pub previous: u8,
    pub generation: [u8; 16],
}

/// FNV-1a, 64 bits, continued from `h` (start with [`FNV_START`]): catches
/// torn and stale writes, not tampering (only root can write the device).
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The FNV-1a offset basis.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        b[24..28].copy_from_slice(&self.records.to_le_bytes());
        b[32..40].copy_from_slice(&self.area_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.area_sum.to_le_bytes());
        let sum = fnv1a(FNV_START, &b[..48]);
        b[48..56].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Reads a header from the first bytes of the device.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < HEADER_LEN || b[0..8] != MAGIC {
            return Err(FormatError::NoHeader);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        if u64_at(b, 48) != fnv1a(FNV_START, &b[..48]) {
            return Err(FormatError::HeaderSum);
        }
        Ok(Self {
            flags: u32_at(b, 12),
            sequence: u64_at(b, 16),
            records: u32_at(b, 24),
            area_len: u64_at(b, 32),
            area_sum: u64_at(b, 40),
        })
    }

    /// Whether the records were saved by a clean shutdown.
    pub fn clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }
}

/// Bytes of a record with `block_count` blocks: its header, two maps and
/// the padding to 8 bytes. `None` if that overflows.
pub fn record_len(block_count: u64) -> Option<usize> {
    let maps = usize::try_from(block_count).ok()?.checked_mul(2)?;
    let len = RECORD_HEADER_LEN.checked_add(maps)?;
    len.checked_add(7).map(|l| l & !7)
}

impl RecordHeader {
    /// The 112 record header bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..64].copy_from_slice(&self.id);
        b[64..72].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[72..76].copy_from_slice(&self.block_shift.to_le_bytes());
        b[80..88].copy_from_slice(&self.block_count.to_le_bytes());
        b[88] = self.active;
        b[89] = self.previous;
        b[96..112].copy_from_slice(&self.generation);
        b
    }

    fn decode(b: &[u8]) -> Self {
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&b[0..64]);
        let mut generation = [0u8; 16];
        generation.copy_from_slice(&b[96..112]);
        Self {
            id,
            capacity_sectors: u64_at(b, 64),
            block_shift: u32_at(b, 72),
            block_count: u64_at(b, 80),
            active: b[88],
            previous: b[89],
            generation,
        }
    }

    /// The id up to its first NUL.
    pub fn id(&self) -> &[u8] {
        id_bytes(&self.id)
    }
}

/// The bytes of a NUL-padded id up to its first NUL.
pub fn id_bytes(id: &[u8; ID_LEN]) -> &[u8] {
    let n = id.iter().position(|&c| c == 0).unwrap_or(ID_LEN);
    &id[..n]
}

/// A record found in the area: its header and where its maps are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub header: RecordHeader,
    pub active: Range<usize>,
    pub read: Range<usize>,
}

/// Checks the record area of `header` and calls `each` for every record in
/// it, in order. Fails on the first defect, before any call if the checksum
/// is wrong.
pub fn decode_records(
    header: &Header,
    area: &[u8],
    mut each: impl FnMut(Found) -> Result<(), FormatError>,
) -> Result<(), FormatError> {
    let len = usize::try_from(header.area_len).map_err(|_| FormatError::RecordSum)?;
    let area = area.get(..len).ok_or(FormatError::RecordSum)?;
    if fnv1a(FNV_START, area) != header.area_sum {
        return Err(FormatError::RecordSum);
    }
    let mut pos = 0usize;
    for _ in 0..header.records {
        let head = area
            .get(pos..pos + RECORD_HEADER_LEN)
            .ok_or(FormatError::BadRecord)?;
        let h = RecordHeader::decode(head);
        let n = usize::try_from(h.block_count).map_err(|_| FormatError::BadRecord)?;
        let rlen = record_len(h.block_count).ok_or(FormatError::BadRecord)?;
        if h.id().is_empty()
            || h.block_count == 0
            || !(9..=31).contains(&h.block_shift)
            || h.active == 0
            || h.previous >= h.active
        {
            return Err(FormatError::BadRecord);
        }
        match pos.checked_add(rlen) {
            Some(end) if end <= area.len() => {}
            _ => return Err(FormatError::BadRecord),
        }
        let maps = pos + RECORD_HEADER_LEN;
        each(Found {
            header: h,
            active: maps..maps + n,
            read: maps + n..maps + 2 * n,
        })?;
        pos += rlen;
    }
    if pos != area.len() {
        return Err(FormatError::BadRecord);
    }
    Ok(())
}

/// Why a saved state is not restored onto a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not saved clean: a crash, a power cut, a write or detach after the
    /// save, or it was used at an earlier boot already.
    NotClean,
    /// The device was written, or a snapshot of it taken, since it was
    /// attached: the saved map would miss those writes.
    Changed,
    /// Its size or CBT geometry differs from the saved one.
    Geometry,
}

/// Whether a saved state may replace a freshly attached device's map.
/// `fresh`: the device's map has seen no write and no take since attach.
pub fn check_restore(
    clean: bool,
    saved: &RecordHeader,
    capacity_sectors: u64,
    block_shift: u32,
    block_count: u64,
    fresh: bool,
) -> Result<(), Refusal> {
    if !clean {
        return Err(Refusal::NotClean);
    }
    if !fresh {
        return Err(Refusal::Changed);
    }
    if saved.capacity_sectors != capacity_sectors
        || saved.block_shift != block_shift
        || saved.block_count != block_count
    {
        return Err(Refusal::Geometry);
    }
    Ok(())
}

/// Whether `id` may name a device: 1 to 63 bytes before the first NUL.
pub fn valid_id(id: &[u8; ID_LEN]) -> bool {
    let n = id_bytes(id).len();
    n > 0 && n < ID_LEN
}
