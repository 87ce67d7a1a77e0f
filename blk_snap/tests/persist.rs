// SPDX-License-Identifier: GPL-2.0

//! The CBT state device's format.

use blk_snap_logic::persist::*;
use proptest::prelude::*;

fn id(s: &str) -> [u8; ID_LEN] {
    let mut a = [0u8; ID_LEN];
    a[..s.len()].copy_from_slice(s.as_bytes());
    a
}

/// An area of records (header, active map, read map) and its header.
fn area(records: &[(RecordHeader, Vec<u8>, Vec<u8>)], flags: u32) -> (Header, Vec<u8>) {
    let mut a = Vec::new();
    for (h, active, read) in records {
        let start = a.len();
        a.extend_from_slice(&h.encode());
        a.extend_from_slice(active);
        a.extend_from_slice(read);
        a.resize(start + record_len(h.block_count).unwrap(), 0);
    }
    let header = Header {
        flags,
        sequence: 7,
        records: records.len() as u32,
        area_len: a.len() as u64,
        area_sum: fnv1a(FNV_START, &a),
    };
    (header, a)
}

fn record(name: &str, blocks: u64, seed: u8) -> (RecordHeader, Vec<u8>, Vec<u8>) {
    let h = RecordHeader {
        id: id(name),
        capacity_sectors: blocks * 128,
        block_shift: 16,
        block_count: blocks,
        active: seed % 200 + 2,
        previous: seed % 200 + 1,
        generation: [seed; 16],
    };
    let active = (0..blocks).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let read = (0..blocks).map(|i| (i as u8) ^ seed).collect();
    (h, active, read)
}

#[test]
fn header_round_trip_and_defects() {
    let h = Header {
        flags: FLAG_CLEAN,
        sequence: 42,
        records: 3,
        area_len: 1000,
        area_sum: 0x1234,
    };
    let b = h.encode();
    assert_eq!(&b[0..8], b"BLKSNAPS");
    // The flags word at byte 12, as the guest test reads it.
    assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 1);
    assert_eq!(Header::decode(&b), Ok(h));
    assert!(Header::decode(&b).unwrap().clean());
    assert_eq!(Header::decode(&[0u8; 64]), Err(FormatError::NoHeader));
    assert_eq!(Header::decode(&b[..40]), Err(FormatError::NoHeader));
    let mut v2 = b;
    v2[8] = 2;
    assert_eq!(Header::decode(&v2), Err(FormatError::Version(2)));
    // Any bit flipped past the magic and version is caught.
    for byte in 12..56 {
        let mut t = b;
        t[byte] ^= 0x10;
        assert_eq!(
            Header::decode(&t),
            Err(FormatError::HeaderSum),
            "byte {byte}"
        );
    }
}

#[test]
fn records_round_trip() {
    let recs = [
        record("disk-a", 1024, 3),
        record("/dev/disk/by-id/x", 17, 9),
    ];
    let (h, a) = area(&recs, FLAG_CLEAN);
    let mut got = Vec::new();
    decode_records(&h, &a, |f| {
        got.push((f.header, a[f.active].to_vec(), a[f.read].to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(got, recs.to_vec());
    assert_eq!(got[1].0.id(), b"/dev/disk/by-id/x");
}

#[test]
fn records_defects_are_caught() {
    let recs = [record("a", 100, 1), record("b", 7, 2)];
    let (h, a) = area(&recs, FLAG_CLEAN);
    let ok = |h: &Header, a: &[u8]| decode_records(h, a, |_| Ok(()));
    // Cut short, or a byte changed: the checksum.
    assert_eq!(ok(&h, &a[..a.len() - 1]), Err(FormatError::RecordSum));
    let mut t = a.clone();
    t[200] ^= 1;
    assert_eq!(ok(&h, &t), Err(FormatError::RecordSum));
    // More records than the area holds, or fewer than it has.
    let more = Header { records: 3, ..h };
    assert_eq!(ok(&more, &a), Err(FormatError::BadRecord));
    let fewer = Header { records: 1, ..h };
    assert_eq!(ok(&fewer, &a), Err(FormatError::BadRecord));
    // A record with an impossible block count (checksum made right).
    let mut big = recs[1].clone();
    big.0.block_count = u64::MAX / 2;
    let (h2, a2) = area(&[recs[0].clone()], FLAG_CLEAN);
    let mut a3 = a2.clone();
    a3.extend_from_slice(&big.0.encode());
    let h3 = Header {
        records: 2,
        area_len: a3.len() as u64,
        area_sum: fnv1a(FNV_START, &a3),
        ..h2
    };
    assert_eq!(ok(&h3, &a3), Err(FormatError::BadRecord));
    // No id.
    let mut noid = recs[0].clone();
    noid.0.id = [0; ID_LEN];
    let (h4, a4) = area(&[noid], FLAG_CLEAN);
    assert_eq!(ok(&h4, &a4), Err(FormatError::BadRecord));
}

#[test]
fn restore_rules() {
    let (r, _, _) = record("a", 1024, 1);
    let g = (r.capacity_sectors, r.block_shift, r.block_count);
    assert_eq!(check_restore(true, &r, g.0, g.1, g.2, true), Ok(()));
    assert_eq!(
        check_restore(false, &r, g.0, g.1, g.2, true),
        Err(Refusal::NotClean)
    );
    assert_eq!(
        check_restore(true, &r, g.0, g.1, g.2, false),
        Err(Refusal::Changed)
    );
    assert_eq!(
        check_restore(true, &r, g.0 + 8, g.1, g.2, true),
        Err(Refusal::Geometry)
    );
    assert_eq!(
        check_restore(true, &r, g.0, g.1 + 1, g.2, true),
        Err(Refusal::Geometry)
    );
}

#[test]
fn ids() {
    assert!(valid_id(&id("x")));
    assert!(valid_id(&id(&"y".repeat(63))));
    assert!(!valid_id(&[b'z'; ID_LEN]));
    assert!(!valid_id(&[0; ID_LEN]));
}

proptest! {
    /// Whatever the bytes, decoding never panics, and what it accepts is
    /// inside the area.
    #[test]
    fn decoding_garbage_is_safe(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                                records in 0u32..4) {
        let h = Header {
            flags: FLAG_CLEAN,
            sequence: 1,
            records,
            area_len: bytes.len() as u64,
            area_sum: fnv1a(FNV_START, &bytes),
        };
        let mut inside = true;
        let _ = decode_records(&h, &bytes, |f| {
            inside &= f.active.end <= f.read.start && f.read.end <= bytes.len();
            Ok(())
        });
        prop_assert!(inside);
        let _ = Header::decode(&bytes);
    }
}
