// SPDX-License-Identifier: GPL-2.0

//! Placement and alignment in the difference storage: allocations on whole
//! blocks, padding of partial-block I/O, device ranges.

use blk_snap_logic::store::*;
use proptest::prelude::*;

/// Extents that behave like the ones before alignment: blocks of 1 sector.
fn unaligned(lengths: &[u64]) -> Vec<Extent> {
    lengths.iter().map(|&l| Extent::new(l, 1)).collect()
}

#[test]
fn extents_are_filled_in_order_without_straddling() {
    let extents = unaligned(&[10, 3, 8]);
    let c = Cursor::default();
    let p = place(&extents, c, 4).unwrap();
    assert_eq!((p.extent, p.at, p.sectors), (0, 0, 4));
    let p = place(&extents, p.next, 4).unwrap();
    assert_eq!((p.extent, p.at), (0, 4));
    assert_eq!(free_from(&extents, p.next), 2 + 3 + 8);
    // 2 sectors left in extent 0 and 3 in extent 1: 4 goes to extent 2.
    let p = place(&extents, p.next, 4).unwrap();
    assert_eq!(
        (p.extent, p.at, p.next),
        (2, 0, Cursor { extent: 2, used: 4 })
    );
    assert_eq!(free_from(&extents, p.next), 4);
    assert!(place(&extents, p.next, 5).is_none());
    // Appending an extent makes room again.
    let more = unaligned(&[10, 3, 8, 16]);
    assert_eq!(
        place(&more, p.next, 5).map(|p| (p.extent, p.at)),
        Some((3, 0))
    );
}

#[test]
fn a_short_chunk_takes_a_whole_block() {
    // The last chunk of a device of 131073 sectors has 1 sector; the chunks
    // stored after it stay on 4 KiB blocks.
    let extents = [Extent::new(1 << 20, STORE_BLOCK_SECTORS)];
    let p = place(&extents, Cursor::default(), 1).unwrap();
    assert_eq!((p.at, p.sectors, p.next.used), (0, 8, 8));
    let p = place(&extents, p.next, 512).unwrap();
    assert_eq!((p.at, p.sectors), (8, 512));
    let p = place(&extents, p.next, 3).unwrap();
    assert_eq!((p.at, p.sectors), (520, 8));
    // A partial block at the end of an extent is not used.
    assert_eq!(Extent::new(131_073, 8).len, 131_072);
    assert_eq!(free_from(&[Extent::new(20, 8)], Cursor::default()), 16);
}

#[test]
fn the_block_size_is_at_least_4_kib() {
    assert_eq!(store_alignment(512), 8);
    assert_eq!(store_alignment(1024), 8);
    assert_eq!(store_alignment(4096), 8);
    assert_eq!(store_alignment(8192), 16);
    assert_eq!(store_alignment(65536), 128);
}

#[test]
fn io_windows_pad_to_whole_blocks() {
    assert_eq!(io_window(0, 1, 8), Some(0..8));
    assert_eq!(io_window(8, 512, 8), Some(8..520));
    assert_eq!(io_window(13, 2, 8), Some(8..16));
    assert_eq!(io_window(15, 2, 8), Some(8..24));
    assert_eq!(io_window(5, 0, 8), None);
    assert_eq!(io_window(u64::MAX - 2, 2, 8), None);
}

#[test]
fn device_ranges_on_4k_devices() {
    // 4 KiB logical sectors: start and length must be whole blocks.
    assert_eq!(usable_range(8, 80, 1000, 4096), Ok(8..88));
    assert_eq!(usable_range(4, 80, 1000, 4096), Err(RangeError::Misaligned));
    assert_eq!(usable_range(8, 81, 1000, 4096), Err(RangeError::Misaligned));
    assert_eq!(usable_range(0, 0, 1000, 4096), Err(RangeError::Empty));
    assert_eq!(usable_range(992, 16, 1000, 4096), Err(RangeError::PastEnd));
    assert_eq!(
        usable_range(u64::MAX, 8, 1000, 4096),
        Err(RangeError::PastEnd)
    );
    // 512-byte sectors: any range, of which the whole 4 KiB blocks are used.
    assert_eq!(usable_range(3, 100, 1000, 512), Ok(8..96));
    assert_eq!(usable_range(0, 100, 1000, 512), Ok(0..96));
    assert_eq!(usable_range(1, 9, 1000, 512), Err(RangeError::TooSmall));
    assert_eq!(usable_range(0, 7, 1000, 512), Err(RangeError::TooSmall));
}

proptest! {
    #[test]
    fn placed_pieces_never_overlap_and_stay_inside(
        lengths in prop::collection::vec(0u64..500, 1..6),
        sizes in prop::collection::vec(1u64..200, 1..40)
    ) {
        let extents = unaligned(&lengths);
        let mut c = Cursor::default();
        let mut taken: Vec<(usize, u64, u64)> = Vec::new();
        for s in sizes {
            let before = free_from(&extents, c);
            match place(&extents, c, s) {
                Some(p) => {
                    prop_assert_eq!(p.sectors, s);
                    prop_assert!(p.at + s <= lengths[p.extent]);
                    for &(e2, a2, s2) in &taken {
                        prop_assert!(e2 != p.extent || p.at >= a2 + s2 || a2 >= p.at + s);
                    }
                    taken.push((p.extent, p.at, s));
                    prop_assert!(free_from(&extents, p.next) + s <= before);
                    c = p.next;
                }
                None => {
                    // Nothing from the cursor on has room for the piece.
                    for (i, &l) in lengths.iter().enumerate().skip(c.extent) {
                        let room = if i == c.extent { l - c.used } else { l };
                        prop_assert!(room < s);
                    }
                }
            }
        }
    }

    /// Against a brute-force model: each allocation goes to the first
    /// aligned offset, from the cursor on, where its whole blocks fit; it
    /// starts on a block, takes whole blocks, and shares no block with
    /// another allocation.
    #[test]
    fn allocations_are_on_whole_blocks(
        extents in prop::collection::vec((0u64..400, 0u32..5), 1..6),
        sizes in prop::collection::vec(1u64..100, 1..40)
    ) {
        let extents: Vec<Extent> =
            extents.iter().map(|&(l, a)| Extent::new(l, 1 << a)).collect();
        let mut c = Cursor::default();
        let mut blocks_taken = std::collections::BTreeSet::new();
        for s in sizes {
            // The model: scan every offset of every extent from the cursor.
            let mut want = None;
            'search: for (i, e) in extents.iter().enumerate().skip(c.extent) {
                let from = if i == c.extent { c.used } else { 0 };
                let size = s.div_ceil(e.align) * e.align;
                for at in from..=e.len {
                    if at % e.align == 0 && at + size <= e.len {
                        want = Some((i, at, size));
                        break 'search;
                    }
                }
            }
            let got = place(&extents, c, s);
            prop_assert_eq!(got.map(|p| (p.extent, p.at, p.sectors)), want);
            let Some(p) = got else { continue };
            let e = extents[p.extent];
            prop_assert_eq!(p.at % e.align, 0);
            prop_assert_eq!(p.sectors % e.align, 0);
            prop_assert!(p.sectors >= s && p.sectors < s + e.align);
            prop_assert_eq!(p.next, Cursor { extent: p.extent, used: p.at + p.sectors });
            for block in p.at / e.align..(p.at + p.sectors) / e.align {
                prop_assert!(blocks_taken.insert((p.extent, block)), "block shared");
            }
            c = p.next;
        }
    }

    /// The free space is what the model counts: the whole blocks after the
    /// cursor's block, up to the last whole block of each extent.
    #[test]
    fn free_space_counts_whole_blocks(
        extents in prop::collection::vec((0u64..400, 0u32..5), 1..6),
        extent in 0usize..7, used in 0u64..450
    ) {
        let extents: Vec<Extent> =
            extents.iter().map(|&(l, a)| Extent::new(l, 1 << a)).collect();
        let c = Cursor { extent, used };
        let mut want = 0;
        for (i, e) in extents.iter().enumerate().skip(extent) {
            let from = if i == extent { used } else { 0 };
            want += (0..e.len / e.align)
                .filter(|b| b * e.align >= from)
                .count() as u64
                * e.align;
        }
        prop_assert_eq!(free_from(&extents, c), want);
    }

    /// The window of a request is the union of the blocks it touches; for a
    /// request inside an allocation, the window stays inside it: padding
    /// never touches another allocation.
    #[test]
    fn io_windows_are_the_touched_blocks(
        at in 0u64..2000, sectors in 1u64..300, shift in 0u32..6
    ) {
        let align = 1u64 << shift;
        let w = io_window(at, sectors, align).unwrap();
        let touched: Vec<u64> = (at..at + sectors).map(|s| s / align).collect();
        prop_assert_eq!(w.start, touched[0] * align);
        prop_assert_eq!(w.end, (touched[touched.len() - 1] + 1) * align);
        // An allocation of whole blocks that holds the request holds the
        // window.
        let alloc_start = at / align * align;
        let alloc_end = (at + sectors).div_ceil(align) * align;
        prop_assert!(alloc_start <= w.start && w.end <= alloc_end);
    }

    /// Device ranges: refused unless on logical blocks; otherwise the
    /// result is the largest run of whole storage blocks inside the range,
    /// found by brute force.
    #[test]
    fn usable_ranges_are_the_whole_blocks_inside(
        start in 0u64..600, count in 0u64..300, capacity in 0u64..900,
        lbs_shift in 9u32..14
    ) {
        let lbs = 1u32 << lbs_shift;
        let l = u64::from(lbs) / 512;
        let align = store_alignment(lbs);
        let got = usable_range(start, count, capacity, lbs);
        let want = if count == 0 {
            Err(RangeError::Empty)
        } else if start + count > capacity {
            Err(RangeError::PastEnd)
        } else if start % l != 0 || count % l != 0 {
            Err(RangeError::Misaligned)
        } else {
            let blocks: Vec<u64> = (start..start + count)
                .filter(|s| s % align == 0 && s + align <= start + count)
                .collect();
            match (blocks.first(), blocks.last()) {
                (Some(&a), Some(&b)) => Ok(a..b + align),
                _ => Err(RangeError::TooSmall),
            }
        };
        prop_assert_eq!(got.clone(), want);
        if let Ok(r) = got {
            prop_assert!(r.start % align == 0 && r.end % align == 0 && r.start % l == 0);
        }
    }
}

/// Brute force: a cycle exists iff some snapshot reaches itself.
fn reaches_itself(n: usize, edges: &[Vec<bool>]) -> bool {
    // Transitive closure.
    let mut r = edges.to_vec();
    for k in 0..n {
        for i in 0..n {
            for j in 0..n {
                if r[i][k] && r[k][j] {
                    r[i][j] = true;
                }
            }
        }
    }
    (0..n).any(|i| r[i][i])
}

fn find_cycle(n: usize, edges: &[Vec<bool>]) -> Option<usize> {
    let mut color = vec![0u8; n];
    let mut stack = vec![(0usize, 0usize); n];
    storage_cycle(n, |i, j| edges[i][j], &mut color, &mut stack)
}

#[test]
fn storage_cycles_are_found() {
    let graph = |n: usize, list: &[(usize, usize)]| {
        let mut e = vec![vec![false; n]; n];
        for &(i, j) in list {
            e[i][j] = true;
        }
        e
    };
    // A's store on B's device, B's on A's.
    assert!(find_cycle(2, &graph(2, &[(0, 1), (1, 0)])).is_some());
    // A snapshot on its own device.
    assert_eq!(find_cycle(3, &graph(3, &[(2, 2)])), Some(2));
    // A chain is fine, and so is a diamond.
    assert_eq!(find_cycle(3, &graph(3, &[(0, 1), (1, 2)])), None);
    assert_eq!(
        find_cycle(4, &graph(4, &[(0, 1), (0, 2), (1, 3), (2, 3)])),
        None
    );
    // A long cycle.
    let ring: Vec<_> = (0..50).map(|i| (i, (i + 1) % 50)).collect();
    assert!(find_cycle(50, &graph(50, &ring)).is_some());
    assert_eq!(find_cycle(0, &[]), None);
}

#[test]
fn memory_limit_is_half_of_the_ram() {
    assert_eq!(memory_limit_max(4 << 21), 2 << 21);
    assert_eq!(memory_limit_max(0), 0);
    assert_eq!(memory_limit_max(u64::MAX), u64::MAX / 2);
}

proptest! {
    #[test]
    fn storage_cycle_matches_brute_force(n in 0usize..8, bits in any::<u64>()) {
        let edges: Vec<Vec<bool>> = (0..n)
            .map(|i| (0..n).map(|j| bits >> ((i * 8 + j) % 64) & 1 == 1 && (i * 3 + j) % 4 != 0).collect())
            .collect();
        let found = find_cycle(n, &edges);
        prop_assert_eq!(found.is_some(), reaches_itself(n, &edges));
        if let Some(v) = found {
            // The snapshot found is on a cycle: it reaches itself.
            let mut seen = vec![false; n];
            let mut todo = vec![v];
            let mut back = false;
            while let Some(x) = todo.pop() {
                for y in 0..n {
                    if edges[x][y] {
                        back |= y == v;
                        if !seen[y] {
                            seen[y] = true;
                            todo.push(y);
                        }
                    }
                }
            }
            prop_assert!(back);
        }
    }
}

#[test]
fn mem_total_is_read_from_meminfo() {
    let text = b"MemTotal:        2013816 kB\nMemFree:         1500000 kB\n";
    assert_eq!(mem_total_kib(text), Some(2013816));
    assert_eq!(mem_total_kib(&text[..20]), None);
    assert_eq!(mem_total_kib(b"MemFree: 5 kB\n"), None);
    assert_eq!(mem_total_kib(b"MemTotal: x kB\n"), None);
    assert_eq!(
        mem_total_kib(b"MemTotal: 99999999999999999999999 kB\n"),
        None
    );
}

/// Brute force of `stack_levels`: for every pair, a device stacked on
/// another is held at a lower level, so its writes in flight never meet a
/// held device under it.
fn check_levels(n: usize, above: &[(usize, usize)]) -> Vec<usize> {
    // The transitive closure of "i is stacked directly on j".
    let mut r = vec![vec![false; n]; n];
    for &(i, j) in above {
        r[i][j] = true;
    }
    for k in 0..n {
        for i in 0..n {
            for j in 0..n {
                if r[i][k] && r[k][j] {
                    r[i][j] = true;
                }
            }
        }
    }
    let mut levels = vec![usize::MAX; n];
    stack_levels(n, |i, j| r[i][j], &mut levels);
    for i in 0..n {
        for j in 0..n {
            if r[i][j] {
                assert!(
                    levels[i] < levels[j],
                    "{i} is stacked on {j} but held at level {} >= {}",
                    levels[i],
                    levels[j]
                );
            }
        }
    }
    levels
}

#[test]
fn stacked_devices_are_held_from_the_top() {
    // An LV (0) on its PV (1): the LV first.
    assert_eq!(check_levels(2, &[(0, 1)]), vec![0, 1]);
    // Unrelated devices: all at once.
    assert_eq!(check_levels(3, &[]), vec![0, 0, 0]);
    // md (0) on two members (1, 2), an LV (3) on md: LV, md, members.
    assert_eq!(check_levels(4, &[(0, 1), (0, 2), (3, 0)]), vec![1, 2, 2, 0]);
    // An LV on dm-crypt on a disk, the dm-crypt device not in the snapshot
    // (the relation is still there, through it): listed lower first.
    assert_eq!(check_levels(2, &[(1, 0)]), vec![1, 0]);
}

proptest! {
    #[test]
    fn stack_levels_order_every_stacked_pair(n in 1usize..8, bits in any::<u64>()) {
        // A random DAG: i stacked directly on j only for i < j.
        let mut above = Vec::new();
        let mut b = bits;
        for i in 0..n {
            for j in i + 1..n {
                if b & 1 == 1 {
                    above.push((i, j));
                }
                b = b.rotate_right(1);
            }
        }
        check_levels(n, &above);
    }
}
