// SPDX-License-Identifier: GPL-2.0

//! The CBT state device's format and the rules of a restore.

use blk_snap_logic::fingerprint::Region;
use blk_snap_logic::persist::*;
use proptest::prelude::*;

fn id(s: &str) -> [u8; ID_LEN] {
    let mut a = [0u8; ID_LEN];
    a[..s.len()].copy_from_slice(s.as_bytes());
    a
}

fn identity(s: &str) -> [u8; IDENTITY_LEN] {
    let mut a = [0u8; IDENTITY_LEN];
    a[..s.len()].copy_from_slice(s.as_bytes());
    a
}

/// A record: header, fingerprint regions with their bytes, maps.
#[derive(Clone, Debug, PartialEq)]
struct Rec {
    h: RecordHeader,
    regions: Vec<Region>,
    fp: Vec<u8>,
    active: Vec<u8>,
    read: Vec<u8>,
}

/// An area of records and its header.
fn area(records: &[Rec], flags: u32) -> (Header, Vec<u8>) {
    let mut a = Vec::new();
    for r in records {
        let start = a.len();
        a.extend_from_slice(&r.h.encode());
        for reg in &r.regions {
            a.extend_from_slice(&encode_region(reg));
        }
        a.extend_from_slice(&r.fp);
        a.extend_from_slice(&r.active);
        a.extend_from_slice(&r.read);
        a.resize(start + r.h.encoded_len().unwrap(), 0);
    }
    let header = Header {
        flags,
        sequence: 7,
        records: records.len() as u32,
        copies: 1,
        copy: 0,
        set: [5; 16],
        area_len: a.len() as u64,
        area_sum: fnv1a(FNV_START, &a),
    };
    (header, a)
}

fn record(name: &str, blocks: u64, seed: u8) -> Rec {
    let regions = vec![
        Region {
            offset: 1024,
            len: 1024,
        },
        Region {
            offset: 1 << 20,
            len: 512 + seed as u32,
        },
    ];
    let fp: Vec<u8> = (0..regions.iter().map(|r| r.len as usize).sum::<usize>())
        .map(|i| (i as u8) ^ seed)
        .collect();
    let h = RecordHeader {
        id: id(name),
        capacity_sectors: blocks * 128,
        block_shift: 16,
        flags: 0,
        block_count: blocks,
        active: seed % 200 + 2,
        previous: seed % 200 + 1,
        generation: [seed; 16],
        identity: identity("serial=x,sectors=1"),
        start_sector: 2048,
        partno: 0,
        proof: 1,
        regions: regions.len() as u32,
        fingerprint_len: fp.len() as u32,
    };
    let active = (0..blocks).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let read = (0..blocks).map(|i| (i as u8) ^ seed).collect();
    Rec {
        h,
        regions,
        fp,
        active,
        read,
    }
}

fn header_block(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_LEN];
    h.encode(&mut b);
    b
}

#[test]
fn header_round_trip_and_defects() {
    let h = Header {
        flags: FLAG_CLEAN,
        sequence: 42,
        records: 3,
        copies: 2,
        copy: 1,
        set: [9; 16],
        area_len: 1000,
        area_sum: 0x1234,
    };
    let b = header_block(&h);
    assert_eq!(&b[0..8], b"BLKSNAPS");
    // The version and the flags word at byte 12, as the guest test reads it.
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 2);
    assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 1);
    assert_eq!(Header::decode(&b), Ok(h));
    assert!(Header::decode(&b).unwrap().clean());
    assert_eq!(Header::decode(&[0u8; 4096]), Err(FormatError::NoHeader));
    assert_eq!(Header::decode(&b[..40]), Err(FormatError::NoHeader));
    let mut v1 = b.clone();
    v1[8] = 1;
    assert_eq!(Header::decode(&v1), Err(FormatError::Version(1)));
    // Any bit flipped past the magic and version is caught, in the broken
    // bitmap too.
    for byte in (12..BLOCK_LEN).step_by(61) {
        let mut t = b.clone();
        t[byte] ^= 0x10;
        assert_eq!(
            Header::decode(&t),
            Err(FormatError::HeaderSum),
            "byte {byte}"
        );
    }
}

#[test]
fn broken_bits_and_unclean() {
    let h = Header {
        flags: FLAG_CLEAN,
        records: 40,
        copies: 1,
        ..Header::default()
    };
    let mut b = header_block(&h);
    assert!((0..40).all(|i| !is_broken(&b, i)));
    assert!(set_broken(&mut b, 0));
    assert!(set_broken(&mut b, 33));
    assert!(!set_broken(&mut b, MAX_RECORDS));
    let got = Header::decode(&b).unwrap();
    assert_eq!(got, h, "the bits leave the header as it was");
    let broken: Vec<u32> = (0..40).filter(|&i| is_broken(&b, i)).collect();
    assert_eq!(broken, [0, 33]);
    assert!(is_broken(&b, MAX_RECORDS));
    unclean_block(&mut b);
    let got = Header::decode(&b).unwrap();
    assert!(!got.clean());
    assert_eq!(Header { flags: 0, ..h }, got);
    assert!(is_broken(&b, 33), "unclean keeps the bits");
}

#[test]
fn mirrored_copies_agree_only_on_the_same_save() {
    let a = Header {
        flags: FLAG_CLEAN,
        sequence: 3,
        records: 2,
        copies: 2,
        copy: 0,
        set: [1; 16],
        area_len: 100,
        area_sum: 77,
    };
    let b = Header { copy: 1, ..a };
    assert!(a.agrees(&b));
    assert!(!a.agrees(&Header { sequence: 2, ..b }));
    assert!(!a.agrees(&Header { set: [2; 16], ..b }));
    assert!(!a.agrees(&Header { flags: 0, ..b }));
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
        let regions = a[f.regions.clone()]
            .chunks_exact(REGION_LEN)
            .map(decode_region)
            .collect();
        got.push(Rec {
            h: f.header,
            regions,
            fp: a[f.fingerprint].to_vec(),
            active: a[f.active].to_vec(),
            read: a[f.read].to_vec(),
        });
        Ok(())
    })
    .unwrap();
    assert_eq!(got, recs.to_vec());
    assert_eq!(got[1].h.id(), b"/dev/disk/by-id/x");
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
    let resum = |recs: &[Rec]| area(recs, FLAG_CLEAN);
    // An impossible block count.
    let mut big = recs[1].clone();
    big.h.block_count = u64::MAX / 2;
    let (h2, a2) = resum(&[recs[0].clone()]);
    let mut a3 = a2.clone();
    a3.extend_from_slice(&big.h.encode());
    let h3 = Header {
        records: 2,
        area_len: a3.len() as u64,
        area_sum: fnv1a(FNV_START, &a3),
        ..h2
    };
    assert_eq!(ok(&h3, &a3), Err(FormatError::BadRecord));
    // No id.
    let mut noid = recs[0].clone();
    noid.h.id = [0; ID_LEN];
    let (h4, a4) = resum(&[noid]);
    assert_eq!(ok(&h4, &a4), Err(FormatError::BadRecord));
    // Region lengths that do not add up to the fingerprint's bytes.
    let mut odd = recs[0].clone();
    odd.regions[1].len += 1;
    let (h5, a5) = resum(&[odd]);
    assert_eq!(ok(&h5, &a5), Err(FormatError::BadRecord));
    // Too many regions.
    let mut many = recs[0].clone();
    many.h.regions = 65;
    let (h6, a6) = resum(&[many]);
    assert_eq!(ok(&h6, &a6), Err(FormatError::BadRecord));
}

fn now<'a>(r: &RecordHeader, id: &'a [u8; IDENTITY_LEN]) -> Now<'a> {
    Now {
        capacity_sectors: r.capacity_sectors,
        block_shift: r.block_shift,
        block_count: r.block_count,
        fresh: true,
        writes_before: Some(0),
        identity: id,
        start_sector: r.start_sector,
        partno: r.partno,
        accept_unverified: false,
    }
}

#[test]
fn restore_rules() {
    let r = record("a", 1024, 1).h;
    let same = r.identity;
    let other = identity("serial=y,sectors=1");
    let n = now(&r, &same);
    // With a fingerprint: the caller compares its bytes.
    assert_eq!(check_restore(true, &r, &n), Ok(true));
    assert_eq!(check_restore(false, &r, &n), Err(Refusal::NotClean));
    let c = |n: Now<'_>| check_restore(true, &r, &n);
    assert_eq!(c(Now { fresh: false, ..n }), Err(Refusal::Changed));
    assert_eq!(
        c(Now {
            writes_before: Some(3),
            ..n
        }),
        Err(Refusal::WrittenBefore)
    );
    assert_eq!(
        c(Now {
            writes_before: None,
            ..n
        }),
        Err(Refusal::WrittenBefore),
        "writes that cannot be counted cannot be proven absent"
    );
    assert_eq!(
        c(Now {
            capacity_sectors: r.capacity_sectors + 8,
            ..n
        }),
        Err(Refusal::Geometry)
    );
    assert_eq!(
        c(Now {
            block_shift: r.block_shift + 1,
            ..n
        }),
        Err(Refusal::Geometry)
    );
    assert_eq!(
        c(Now {
            identity: &other,
            ..n
        }),
        Err(Refusal::Identity)
    );
    assert_eq!(
        c(Now {
            start_sector: 4096,
            ..n
        }),
        Err(Refusal::Identity)
    );
    // Without a fingerprint: only if the save and the restore accepted it.
    let bare = RecordHeader {
        regions: 0,
        fingerprint_len: 0,
        proof: 0,
        ..r
    };
    fn cb(bare: &RecordHeader, n: &Now<'_>, flags: u32, accept: bool) -> Result<bool, Refusal> {
        let saved = RecordHeader { flags, ..*bare };
        let n = Now {
            accept_unverified: accept,
            ..*n
        };
        check_restore(true, &saved, &n)
    }
    let cb = |flags, accept| cb(&bare, &n, flags, accept);
    assert_eq!(cb(0, false), Err(Refusal::Unverified));
    assert_eq!(cb(RECORD_UNVERIFIED, false), Err(Refusal::Unverified));
    assert_eq!(cb(0, true), Err(Refusal::Unverified));
    assert_eq!(cb(RECORD_UNVERIFIED, true), Ok(false));
}

#[test]
fn ids_and_identities() {
    assert!(valid_id(&id("x")));
    assert!(valid_id(&id(&"y".repeat(63))));
    assert!(!valid_id(&[b'z'; ID_LEN]));
    assert!(!valid_id(&[0; ID_LEN]));
    assert!(valid_identity(&identity("")));
    assert!(valid_identity(&identity(&"s".repeat(127))));
    assert!(!valid_identity(&[b's'; IDENTITY_LEN]));
}

proptest! {
    /// Whatever the bytes, decoding never panics, and what it accepts is
    /// inside the area.
    #[test]
    fn decoding_garbage_is_safe(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                records in 0u32..4) {
        let h = Header {
            flags: FLAG_CLEAN,
            sequence: 1,
            records,
            copies: 1,
            area_len: bytes.len() as u64,
            area_sum: fnv1a(FNV_START, &bytes),
            ..Header::default()
        };
        let mut inside = true;
        let _ = decode_records(&h, &bytes, |f| {
            inside &= f.regions.end <= f.fingerprint.start
                && f.fingerprint.end <= f.active.start
                && f.active.end <= f.read.start
                && f.read.end <= bytes.len();
            Ok(())
        });
        prop_assert!(inside);
        let _ = Header::decode(&bytes);
    }
}
