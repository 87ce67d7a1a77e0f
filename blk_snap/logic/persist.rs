// SPDX-License-Identifier: GPL-2.0

//! The on-disk format of the CBT state device: where the change maps of the
//! tracked devices are saved at shutdown and found at the next boot.
//!
//! ```text
//! byte 0      the header block, 4 KiB:
//!               0  magic "BLKSNAPS"
//!               8  version (u32) = 2
//!              12  flags (u32, bit 0: clean)
//!              16  sequence (u64): bumped by every save
//!              24  records (u32)
//!              28  copies (u32): 1, or 2 for a mirrored state
//!              32  record bytes (u64)
//!              40  FNV-1a 64 of the record area (u64)
//!              48  set (16 bytes): random, the same on both copies of a
//!                  mirrored state, new at every save
//!              64  copy (u32): which copy this is, 0 or 1
//!             128  broken records: a bit per record (bit i of byte i / 8),
//!                  set when a write or a change reached that record's
//!                  device after the save
//!            4088  FNV-1a 64 of bytes 0..4088 (u64)
//! byte 4096   the record area: per device, a 264-byte record header
//!               0  id[64]
//!              64  capacity in sectors (u64)
//!              72  block shift (u32)
//!              76  flags (u32, bit 0: restoring it without a fingerprint
//!                  is accepted)
//!              80  block count (u64)
//!              88  active number (u8), previous number (u8), 6 reserved
//!              96  generation[16]
//!             112  identity[128]: given by user space (disk serial,
//!                  partition...), NUL-padded
//!             240  first sector on the disk (u64)
//!             248  partition number (u32)
//!             252  proof (u32, see `fingerprint::Proof`)
//!             256  fingerprint regions (u32)
//!             260  fingerprint bytes (u32)
//!           then the regions (offset u64, length u32, 4 reserved each),
//!           the fingerprint's bytes, the active map and the read map (a
//!           byte per CBT block each), padded to 8 bytes
//! ```
//!
//! All numbers are little-endian. A save writes the record area first, then
//! the header block with a preflush and FUA: a header is only ever on disk
//! after the records it describes, and its checksums catch a torn write.
//! Only a header with the clean flag lets a record whose broken bit is
//! clear be used.

use crate::fingerprint::Region;
use core::ops::Range;

/// The header's magic bytes.
pub const MAGIC: [u8; 8] = *b"BLKSNAPS";
/// The format version.
pub const VERSION: u32 = 2;
/// The header flag: saved by a clean shutdown, not used since.
pub const FLAG_CLEAN: u32 = 1;
/// Bytes of the header block.
pub const BLOCK_LEN: usize = 4096;
/// Where the broken-record bitmap starts in the header block.
pub const BROKEN_AT: usize = 128;
/// Where the header block's checksum is.
pub const SUM_AT: usize = BLOCK_LEN - 8;
/// The most records a state device holds: a broken bit each.
pub const MAX_RECORDS: u32 = ((SUM_AT - BROKEN_AT) * 8) as u32;
/// Where the record area starts.
pub const AREA_OFFSET: u64 = 4096;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 264;
/// Bytes of a fingerprint region entry.
pub const REGION_LEN: usize = 16;
/// Bytes of a device id, NUL-padded.
pub const ID_LEN: usize = 64;
/// Bytes of a device identity, NUL-padded.
pub const IDENTITY_LEN: usize = 128;
/// Record flag: a restore without a fingerprint was accepted.
pub const RECORD_UNVERIFIED: u32 = 1;

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

/// The header, without its broken-record bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub flags: u32,
    pub sequence: u64,
    pub records: u32,
    pub copies: u32,
    pub copy: u32,
    pub set: [u8; 16],
    pub area_len: u64,
    pub area_sum: u64,
}

/// The fixed part of a device's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub id: [u8; ID_LEN],
    pub capacity_sectors: u64,
    pub block_shift: u32,
    pub flags: u32,
    pub block_count: u64,
    pub active: u8,
    pub previous: u8,
    pub generation: [u8; 16],
    pub identity: [u8; IDENTITY_LEN],
    pub start_sector: u64,
    pub partno: u32,
    pub proof: u32,
    pub regions: u32,
    pub fingerprint_len: u32,
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
    /// Writes the header into `block` ([`BLOCK_LEN`] bytes), with no record
    /// broken, and its checksum.
    pub fn encode(&self, block: &mut [u8]) {
        let b = &mut block[..BLOCK_LEN];
        b.fill(0);
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        b[24..28].copy_from_slice(&self.records.to_le_bytes());
        b[28..32].copy_from_slice(&self.copies.to_le_bytes());
        b[32..40].copy_from_slice(&self.area_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.area_sum.to_le_bytes());
        b[48..64].copy_from_slice(&self.set);
        b[64..68].copy_from_slice(&self.copy.to_le_bytes());
        seal_block(b);
    }

    /// Reads the header of a header block, checking its checksum.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() < 12 || b[0..8] != MAGIC {
            return Err(FormatError::NoHeader);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        if b.len() < BLOCK_LEN {
            return Err(FormatError::NoHeader);
        }
        if u64_at(b, SUM_AT) != fnv1a(FNV_START, &b[..SUM_AT]) {
            return Err(FormatError::HeaderSum);
        }
        let mut set = [0u8; 16];
        set.copy_from_slice(&b[48..64]);
        Ok(Self {
            flags: u32_at(b, 12),
            sequence: u64_at(b, 16),
            records: u32_at(b, 24),
            copies: u32_at(b, 28),
            area_len: u64_at(b, 32),
            area_sum: u64_at(b, 40),
            set,
            copy: u32_at(b, 64),
        })
    }

    /// Whether the records were saved by a clean shutdown.
    pub fn clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }

    /// Whether `other`, read from the other copy of a mirrored state, says
    /// the same: the same save, both clean or not alike.
    pub fn agrees(&self, other: &Header) -> bool {
        Header { copy: 0, ..*self } == Header { copy: 0, ..*other }
    }
}

/// Recomputes the checksum of a header block after a change.
pub fn seal_block(b: &mut [u8]) {
    let sum = fnv1a(FNV_START, &b[..SUM_AT]);
    b[SUM_AT..BLOCK_LEN].copy_from_slice(&sum.to_le_bytes());
}

/// Clears the clean flag of a header block, keeping the rest.
pub fn unclean_block(b: &mut [u8]) {
    let flags = u32_at(b, 12) & !FLAG_CLEAN;
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    seal_block(b);
}

/// Marks record `i` broken in a header block. `false` if there is no
/// such bit.
pub fn set_broken(b: &mut [u8], i: u32) -> bool {
    if i >= MAX_RECORDS {
        return false;
    }
    b[BROKEN_AT + i as usize / 8] |= 1 << (i % 8);
    seal_block(b);
    true
}

/// Whether record `i` is marked broken in a header block (those past the
/// bitmap are).
pub fn is_broken(b: &[u8], i: u32) -> bool {
    i >= MAX_RECORDS || b[BROKEN_AT + i as usize / 8] & (1 << (i % 8)) != 0
}

/// Bytes of a record with `block_count` blocks and a fingerprint of
/// `regions` regions and `fingerprint_len` bytes: its header, the regions,
/// the bytes, two maps and the padding to 8 bytes. `None` if that
/// overflows.
pub fn record_len(block_count: u64, regions: u32, fingerprint_len: u32) -> Option<usize> {
    let maps = usize::try_from(block_count).ok()?.checked_mul(2)?;
    let fp = (regions as usize)
        .checked_mul(REGION_LEN)?
        .checked_add(fingerprint_len as usize)?;
    let len = RECORD_HEADER_LEN.checked_add(fp)?.checked_add(maps)?;
    len.checked_add(7).map(|l| l & !7)
}

impl RecordHeader {
    /// The record header bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..64].copy_from_slice(&self.id);
        b[64..72].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[72..76].copy_from_slice(&self.block_shift.to_le_bytes());
        b[76..80].copy_from_slice(&self.flags.to_le_bytes());
        b[80..88].copy_from_slice(&self.block_count.to_le_bytes());
        b[88] = self.active;
        b[89] = self.previous;
        b[96..112].copy_from_slice(&self.generation);
        b[112..240].copy_from_slice(&self.identity);
        b[240..248].copy_from_slice(&self.start_sector.to_le_bytes());
        b[248..252].copy_from_slice(&self.partno.to_le_bytes());
        b[252..256].copy_from_slice(&self.proof.to_le_bytes());
        b[256..260].copy_from_slice(&self.regions.to_le_bytes());
        b[260..264].copy_from_slice(&self.fingerprint_len.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&b[0..64]);
        let mut generation = [0u8; 16];
        generation.copy_from_slice(&b[96..112]);
        let mut identity = [0u8; IDENTITY_LEN];
        identity.copy_from_slice(&b[112..240]);
        Self {
            id,
            capacity_sectors: u64_at(b, 64),
            block_shift: u32_at(b, 72),
            flags: u32_at(b, 76),
            block_count: u64_at(b, 80),
            active: b[88],
            previous: b[89],
            generation,
            identity,
            start_sector: u64_at(b, 240),
            partno: u32_at(b, 248),
            proof: u32_at(b, 252),
            regions: u32_at(b, 256),
            fingerprint_len: u32_at(b, 260),
        }
    }

    /// The id up to its first NUL.
    pub fn id(&self) -> &[u8] {
        id_bytes(&self.id)
    }

    /// The length of the record.
    pub fn encoded_len(&self) -> Option<usize> {
        record_len(self.block_count, self.regions, self.fingerprint_len)
    }
}

/// Encodes a fingerprint region entry.
pub fn encode_region(r: &Region) -> [u8; REGION_LEN] {
    let mut b = [0u8; REGION_LEN];
    b[0..8].copy_from_slice(&r.offset.to_le_bytes());
    b[8..12].copy_from_slice(&r.len.to_le_bytes());
    b
}

/// Decodes a fingerprint region entry.
pub fn decode_region(b: &[u8]) -> Region {
    Region {
        offset: u64_at(b, 0),
        len: u32_at(b, 8),
    }
}

/// The bytes of a NUL-padded id up to its first NUL.
pub fn id_bytes(id: &[u8; ID_LEN]) -> &[u8] {
    let n = id.iter().position(|&c| c == 0).unwrap_or(ID_LEN);
    &id[..n]
}

/// A record found in the area: its header and where its parts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub header: RecordHeader,
    /// The region entries ([`REGION_LEN`] bytes each).
    pub regions: Range<usize>,
    /// The fingerprint's bytes, region after region.
    pub fingerprint: Range<usize>,
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
    if header.records > MAX_RECORDS {
        return Err(FormatError::BadRecord);
    }
    let mut pos = 0usize;
    for _ in 0..header.records {
        let head = area
            .get(pos..pos + RECORD_HEADER_LEN)
            .ok_or(FormatError::BadRecord)?;
        let h = RecordHeader::decode(head);
        let n = usize::try_from(h.block_count).map_err(|_| FormatError::BadRecord)?;
        let rlen = h.encoded_len().ok_or(FormatError::BadRecord)?;
        if h.id().is_empty()
            || h.block_count == 0
            || !(9..=31).contains(&h.block_shift)
            || h.active == 0
            || h.previous >= h.active
            || h.regions as usize > crate::fingerprint::MAX_REGIONS
            || h.fingerprint_len as usize > crate::fingerprint::MAX_BYTES
        {
            return Err(FormatError::BadRecord);
        }
        match pos.checked_add(rlen) {
            Some(end) if end <= area.len() => {}
            _ => return Err(FormatError::BadRecord),
        }
        let regions = pos + RECORD_HEADER_LEN;
        let fp = regions + h.regions as usize * REGION_LEN;
        let maps = fp + h.fingerprint_len as usize;
        // The regions' lengths add up to the bytes.
        let sum: u64 = (0..h.regions as usize)
            .map(|i| u64::from(decode_region(&area[regions + i * REGION_LEN..]).len))
            .sum();
        if sum != u64::from(h.fingerprint_len) {
            return Err(FormatError::BadRecord);
        }
        each(Found {
            header: h,
            regions: regions..fp,
            fingerprint: fp..maps,
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
    /// Not saved clean: a crash, a power cut, a write or a change of the
    /// device after the save, a boot that used it already, or the copies
    /// of a mirrored state disagree.
    NotClean,
    /// The device was written, or a snapshot of it taken, since it was
    /// attached.
    Changed,
    /// The block layer counted writes to the device before it was
    /// attached (or cannot count them).
    WrittenBefore,
    /// Its size or CBT geometry differs from the saved one.
    Geometry,
    /// Another device: its identity, partition number or first sector
    /// differs from the saved one.
    Identity,
    /// Nothing proves that the device was not written while the module
    /// could not see it (no fingerprint), and the user did not accept that.
    Unverified,
    /// The fingerprint differs: something wrote to the device while the
    /// module could not see it.
    Fingerprint,
}

/// What the device looks like now, for [`check_restore`].
#[derive(Debug, Clone, Copy)]
pub struct Now<'a> {
    pub capacity_sectors: u64,
    pub block_shift: u32,
    pub block_count: u64,
    /// No write and no take since attach.
    pub fresh: bool,
    /// Writes the block layer counted before the attach; `None` if it
    /// cannot count them.
    pub writes_before: Option<u64>,
    pub identity: &'a [u8; IDENTITY_LEN],
    pub start_sector: u64,
    pub partno: u32,
    /// The caller accepts a restore without a fingerprint.
    pub accept_unverified: bool,
}

/// Whether a saved state may replace a freshly attached device's map, as
/// far as it can be told without reading the device: everything but the
/// fingerprint's bytes, which the caller compares when this returns
/// `Ok(true)` (the record has a fingerprint); `Ok(false)`: no fingerprint,
/// and both the save and the caller accepted that.
pub fn check_restore(clean: bool, saved: &RecordHeader, now: &Now<'_>) -> Result<bool, Refusal> {
    if !clean {
        return Err(Refusal::NotClean);
    }
    if !now.fresh {
        return Err(Refusal::Changed);
    }
    if now.writes_before != Some(0) {
        return Err(Refusal::WrittenBefore);
    }
    if saved.capacity_sectors != now.capacity_sectors
        || saved.block_shift != now.block_shift
        || saved.block_count != now.block_count
    {
        return Err(Refusal::Geometry);
    }
    if saved.identity != *now.identity
        || saved.start_sector != now.start_sector
        || saved.partno != now.partno
    {
        return Err(Refusal::Identity);
    }
    if saved.regions == 0 {
        if saved.flags & RECORD_UNVERIFIED != 0 && now.accept_unverified {
            return Ok(false);
        }
        return Err(Refusal::Unverified);
    }
    Ok(true)
}

/// Whether `id` may name a device: 1 to 63 bytes before the first NUL.
pub fn valid_id(id: &[u8; ID_LEN]) -> bool {
    let n = id_bytes(id).len();
    n > 0 && n < ID_LEN
}

/// Whether `identity` is NUL-terminated within its bytes.
pub fn valid_identity(identity: &[u8; IDENTITY_LEN]) -> bool {
    identity.contains(&0)
}
