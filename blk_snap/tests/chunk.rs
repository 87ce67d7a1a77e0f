// SPDX-License-Identifier: GPL-2.0

//! Chunk geometry and storage space accounting.

use blk_snap_logic::chunk::*;
use blk_snap_logic::store::*;
use proptest::prelude::*;

const GIB: u64 = 1 << 21;

#[test]
fn chunk_size_follows_the_upstream_defaults() {
    let p = ChunkParams::DEFAULT;
    let g = ChunkGeometry::new(GIB, 512, &p).unwrap();
    assert_eq!((g.shift, g.count, g.chunk_sectors()), (18, 4096, 512));
    // The chunk is at least the logical block size.
    let g = ChunkGeometry::new(GIB, 1 << 20, &p).unwrap();
    assert_eq!((g.shift, g.count), (20, 1024));
    // With a small maximum count the chunk grows, up to maximum_shift.
    let p = ChunkParams {
        maximum_count_shift: 10,
        ..ChunkParams::DEFAULT
    };
    assert_eq!(ChunkGeometry::new(GIB, 512, &p).unwrap().shift, 20);
    let p = ChunkParams {
        maximum_count_shift: 1,
        maximum_shift: 22,
        ..ChunkParams::DEFAULT
    };
    let g = ChunkGeometry::new(GIB, 512, &p).unwrap();
    assert_eq!((g.shift, g.count), (22, 256));
    // A partial last chunk counts.
    assert_eq!(
        ChunkGeometry::new(GIB + 1, 512, &ChunkParams::DEFAULT)
            .unwrap()
            .count,
        4097
    );
}

#[test]
fn chunk_params_are_validated() {
    let bad = |minimum_shift, maximum_count_shift, maximum_shift| ChunkParams {
        minimum_shift,
        maximum_count_shift,
        maximum_shift,
    };
    for p in [
        bad(8, 40, 26),
        bad(20, 40, 19),
        bad(18, 64, 26),
        bad(18, 40, 31),
    ] {
        assert_eq!(
            ChunkGeometry::new(GIB, 512, &p),
            Err(ChunkError::BadParams),
            "{p:?}"
        );
    }
    assert_eq!(
        ChunkGeometry::new(GIB, 3000, &ChunkParams::DEFAULT),
        Err(ChunkError::BadParams)
    );
}

fn geometry() -> impl Strategy<Value = ChunkGeometry> {
    (1u64..20_000, 9u32..14).prop_map(|(cap, shift)| {
        let p = ChunkParams {
            minimum_shift: shift,
            maximum_count_shift: 40,
            maximum_shift: shift,
        };
        ChunkGeometry::new(cap, 512, &p).unwrap()
    })
}

proptest! {
    #[test]
    fn pieces_cover_the_io_exactly_within_chunks(
        g in geometry(), sector in 0u64..25_000, count in 0u64..9_000
    ) {
        let end = (sector + count).min(g.capacity_sectors);
        let pieces: Vec<Piece> = g.pieces(sector, count).collect();
        let mut next = sector.min(end);
        for p in &pieces {
            prop_assert_eq!(p.sector, next);
            prop_assert!(p.sectors > 0);
            let span = g.chunk_span(p.chunk);
            prop_assert!(span.start <= p.sector && p.sector + p.sectors <= span.end);
            next += p.sectors;
        }
        prop_assert_eq!(next, end);
        let chunks: Vec<u64> = pieces.iter().map(|p| p.chunk).collect();
        let touched: Vec<u64> = g.chunks_touched(sector, count).collect();
        prop_assert_eq!(chunks, touched);
    }

    #[test]
    fn spans_tile_the_device(g in geometry()) {
        let mut next = 0;
        for c in 0..g.count {
            let s = g.chunk_span(c);
            prop_assert_eq!(s.start, next);
            prop_assert!(s.end > s.start);
            next = s.end;
        }
        prop_assert_eq!(next, g.capacity_sectors);
    }

    /// Allocations never overlap, never pass the limit, and growth requests
    /// are whole steps clipped to the limit.
    #[test]
    fn store_space_allocates_disjoint_ranges(
        available in 0u64..5000, limit in 0u64..20_000, step in 1u64..3000,
        sizes in prop::collection::vec(1u64..1500, 1..60)
    ) {
        let mut s = StoreSpace::new(available, limit, step);
        let mut next = 0;
        for size in sizes {
            loop {
                match s.alloc(size) {
                    Ok(off) => {
                        prop_assert_eq!(off, next);
                        next += size;
                        prop_assert!(next <= s.available && s.available <= limit);
                        break;
                    }
                    Err(Alloc::Grow(to)) => {
                        prop_assert!(to > s.available && to <= limit);
                        prop_assert!(to >= s.used + size);
                        prop_assert!(to == limit || (to - s.available).is_multiple_of(step));
                        s.grown(to);
                    }
                    Err(Alloc::Full) => {
                        prop_assert!(s.used + size > limit);
                        break;
                    }
                }
            }
        }
    }
}

#[test]
fn content_packs_into_a_u64_and_zero_is_origin() {
    assert_eq!(Content::unpack(0), Content::Origin);
    for c in [
        Content::Origin,
        Content::Copying,
        Content::Buffered,
        Content::Failed,
        Content::Stored(0),
        Content::Stored(1),
        Content::Stored(Content::MAX_ADDRESS),
    ] {
        assert_eq!(Content::unpack(c.pack().unwrap()), c);
    }
    assert_eq!(Content::Stored(Content::MAX_ADDRESS + 1).pack(), None);
    // Tags never made by pack read as failed, never as data.
    for v in [5u64, 6, 7, 13, u64::MAX] {
        assert_eq!(Content::unpack(v), Content::Failed);
    }
    assert!(!Content::Origin.lets_writes_pass());
    assert!(!Content::Copying.lets_writes_pass());
    assert!(Content::Buffered.lets_writes_pass());
}

#[test]
fn state_is_8_bytes_a_chunk_32_mib_per_tib() {
    let g = ChunkGeometry::new(1 << 31, 512, &ChunkParams::DEFAULT).unwrap();
    assert_eq!(g.state_bytes(), 32 << 20);
}

proptest! {
    #[test]
    fn any_address_round_trips(at in 0..=Content::MAX_ADDRESS) {
        prop_assert_eq!(Content::unpack(Content::Stored(at).pack().unwrap()), Content::Stored(at));
    }
}
