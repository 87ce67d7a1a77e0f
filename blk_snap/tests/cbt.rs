// SPDX-License-Identifier: GPL-2.0

//! The CBT arithmetic against brute-force models.

use blk_snap_logic::cbt::*;
use proptest::prelude::*;

const GIB_SECTORS: u64 = 1 << 21;

#[test]
fn geometry_uses_upstream_defaults() {
    let p = CbtParams::DEFAULT;
    // 1 GiB: 64 KiB blocks.
    let g = CbtGeometry::new(GIB_SECTORS, &p).unwrap();
    assert_eq!((g.block_shift, g.block_count), (16, 16384));
    // A partial last block counts.
    let g = CbtGeometry::new(GIB_SECTORS + 1, &p).unwrap();
    assert_eq!((g.block_shift, g.block_count), (16, 16385));
    // 1 TiB: the block grows until at most 2097152 blocks remain.
    let g = CbtGeometry::new(GIB_SECTORS << 10, &p).unwrap();
    assert_eq!((g.block_shift, g.block_count), (19, 2_097_152));
    // 1 PiB: capped at 64 MiB blocks, so the count exceeds the maximum.
    let g = CbtGeometry::new(GIB_SECTORS << 20, &p).unwrap();
    assert_eq!((g.block_shift, g.block_count), (26, 1 << 24));
    // An empty device has no blocks.
    assert_eq!(CbtGeometry::new(0, &p).unwrap().block_count, 0);
}

#[test]
fn geometry_rejects_bad_params() {
    let bad = |min, count, max| CbtParams {
        block_minimum_shift: min,
        block_maximum_count: count,
        block_maximum_shift: max,
    };
    for p in [
        bad(8, 16, 26),
        bad(16, 16, 32),
        bad(20, 16, 19),
        bad(16, 0, 26),
    ] {
        assert_eq!(
            CbtGeometry::new(GIB_SECTORS, &p),
            Err(CbtError::BadParams),
            "{p:?}"
        );
    }
    // 2^32 blocks do not fit the u32 count.
    let p = bad(9, u32::MAX, 9);
    assert_eq!(CbtGeometry::new(1 << 32, &p), Err(CbtError::TooLarge));
}

fn small_geometry() -> impl Strategy<Value = CbtGeometry> {
    (1u64..5000, 9u32..14).prop_map(|(cap, shift)| {
        let p = CbtParams {
            block_minimum_shift: shift,
            block_maximum_count: u32::MAX,
            block_maximum_shift: shift,
        };
        CbtGeometry::new(cap, &p).unwrap()
    })
}

proptest! {
    #[test]
    fn blocks_touched_is_exactly_the_intersecting_blocks(
        g in small_geometry(), sector in 0u64..6000, count in 0u64..3000
    ) {
        let spb = 1u64 << (g.block_shift - SECTOR_SHIFT);
        let want: Vec<usize> = (0..g.block_count as u64)
            .filter(|&b| {
                let (bs, be) = (b * spb, (b + 1) * spb);
                let (s, e) = (sector, (sector + count).min(g.capacity_sectors));
                s < e && s < be && bs < e
            })
            .map(|b| b as usize)
            .collect();
        let got: Vec<usize> = g.blocks_touched(sector, count).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn check_range_accepts_only_ranges_inside_the_device(
        g in small_geometry(), sector in 0u64..6000, count in 0u64..3000
    ) {
        let ok = count > 0 && sector + count <= g.capacity_sectors;
        prop_assert_eq!(g.check_range(sector, count).is_ok(), ok);
        if ok {
            prop_assert_eq!(g.check_range(sector, count).unwrap(), g.blocks_touched(sector, count));
        }
    }

    #[test]
    fn check_map_read_stays_inside_the_map(g in small_geometry(), off in 0u32..6000, len in 0u32..6000) {
        let ok = u64::from(off) + u64::from(len) <= u64::from(g.block_count);
        prop_assert_eq!(g.check_map_read(off, len).is_ok(), ok);
    }

    /// Writes and snapshots against a model that remembers, per block, the
    /// last snapshot interval in which it was written.
    #[test]
    fn maps_follow_the_model(
        ops in prop::collection::vec(prop_oneof![
            (0u64..400, 1u64..64).prop_map(|(s, c)| Some((s, c))),
            Just(None),
        ], 1..200)
    ) {
        let g = CbtGeometry::new(400, &CbtParams {
            block_minimum_shift: 12, block_maximum_count: 1000, block_maximum_shift: 12,
        }).unwrap();
        let n = g.block_count as usize;
        let (mut active, mut read) = (vec![0u8; n], vec![0u8; n]);
        let mut state = CbtState::new([7; 16]);
        let mut model_last_write = vec![0u8; n];
        let mut snapshots = 0u8;
        for op in ops {
            match op {
                Some((s, c)) => {
                    let blocks = g.blocks_touched(s, c);
                    for b in blocks.clone() { model_last_write[b] = snapshots + 1; }
                    state.mark_write(&mut active, blocks);
                }
                None => {
                    prop_assert!(!state.take_snapshot(&mut active, &mut read, || [9; 16]));
                    snapshots += 1;
                    prop_assert_eq!(state.previous, snapshots);
                    // The read map shows, per block, the snapshot interval of
                    // its last write before this snapshot.
                    prop_assert_eq!(&read, &model_last_write);
                }
            }
            prop_assert_eq!(&active, &model_last_write);
        }
    }
}

#[test]
fn numbers_wrap_into_a_new_generation() {
    let (mut active, mut read) = (vec![0u8; 4], vec![0u8; 4]);
    let mut state = CbtState::new([1; 16]);
    assert_eq!((state.active, state.previous), (1, 0));
    for i in 1..=254u8 {
        state.mark_write(&mut active, 0..1);
        assert!(!state.take_snapshot(&mut active, &mut read, || unreachable!()));
        assert_eq!((state.previous, state.active), (i, i + 1));
        assert_eq!(read[0], i);
    }
    state.mark_write(&mut active, 1..2);
    assert_eq!(active, [254, 255, 0, 0]);
    // Number 256 does not exist: this snapshot starts a new generation.
    assert!(state.take_snapshot(&mut active, &mut read, || [2; 16]));
    assert_eq!(
        state,
        CbtState {
            active: 1,
            previous: 0,
            generation: [2; 16]
        }
    );
    assert_eq!((active, read), (vec![0; 4], vec![0; 4]));
}

#[test]
fn dirty_marks_both_maps() {
    let (mut active, mut read) = (vec![0u8; 8], vec![0u8; 8]);
    let mut state = CbtState::new([0; 16]);
    // Before any snapshot only the active map can be marked.
    state.mark_dirty(&mut active, &mut read, 1..3);
    assert_eq!(active, [0, 1, 1, 0, 0, 0, 0, 0]);
    assert_eq!(read, [0; 8]);
    state.take_snapshot(&mut active, &mut read, || unreachable!());
    state.mark_dirty(&mut active, &mut read, 5..6);
    assert_eq!(active, [0, 1, 1, 0, 0, 2, 0, 0]);
    assert_eq!(read, [0, 1, 1, 0, 0, 1, 0, 0]);
    // Marking never lowers a number.
    mark(&mut active, 0..8, 1);
    assert_eq!(active, [1, 1, 1, 1, 1, 2, 1, 1]);
}

#[test]
fn merge_ranges_examples() {
    let mut r = vec![5..7, 0..2, 1..3, 3..4, 9..9, 6..10];
    let n = merge_ranges(&mut r);
    assert_eq!(&r[..n], &[0..4, 5..10]);
    let mut r: Vec<std::ops::Range<usize>> = vec![0..100; 65536];
    assert_eq!(merge_ranges(&mut r), 1);
    assert_eq!(r[0], 0..100);
    let mut r: Vec<std::ops::Range<usize>> = vec![];
    assert_eq!(merge_ranges(&mut r), 0);
}

proptest! {
    #[test]
    fn merged_ranges_mark_the_same_blocks(
        ranges in proptest::collection::vec((0usize..300, 0usize..40), 0..60),
        number in 1u8..=255,
    ) {
        let mut ranges: Vec<std::ops::Range<usize>> =
            ranges.into_iter().map(|(s, l)| s..(s + l).min(300)).collect();
        let mut want = vec![0u8; 300];
        for r in &ranges {
            mark(&mut want, r.clone(), number);
        }
        let n = merge_ranges(&mut ranges);
        let mut got = vec![0u8; 300];
        for (i, r) in ranges[..n].iter().enumerate() {
            prop_assert!(!r.is_empty());
            if i > 0 {
                // In order and apart.
                prop_assert!(ranges[i - 1].end < r.start);
            }
            mark(&mut got, r.clone(), number);
        }
        prop_assert_eq!(got, want);
    }
}
