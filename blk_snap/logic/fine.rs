// SPDX-License-Identifier: GPL-2.0

//! Arithmetic of the fine change map: which 4 KiB blocks of a device were
//! written, kept sparse.
//!
//! The device's fine blocks are grouped in containers of
//! [`CONTAINER_BLOCKS`] (256 MiB of device at 4 KiB). A container holds the
//! blocks written in it as a sorted array of their 16-bit offsets (2 bytes
//! per block) while there are at most [`ARRAY_MAX`] of them, and as a
//! bitmap of [`BITMAP_WORDS`] words (8 KiB) beyond: 2 bytes a changed block
//! when changes are scattered, at most 1 bit a block of device when they are
//! dense. The allocation is the caller's (the kernel's, with its flags);
//! this file only moves values within the slices it is given.

use core::ops::Range;

/// Bits of a fine block number that select the block in its container.
pub const CONTAINER_SHIFT: u32 = 16;
/// Fine blocks per container.
pub const CONTAINER_BLOCKS: u64 = 1 << CONTAINER_SHIFT;
/// Entries of an array container before it becomes a bitmap: an array of
/// this many `u16` is as large as the bitmap.
pub const ARRAY_MAX: usize = 4096;
/// Words of a bitmap container.
pub const BITMAP_WORDS: usize = (CONTAINER_BLOCKS / 64) as usize;

/// Entries to allocate for an array container that must hold `need`: a
/// quarter more, in steps of 64 (few reallocations in the write path, and
/// little slack, since the memory limit counts the allocation).
pub fn array_capacity(need: usize) -> usize {
    (need + need / 4).next_multiple_of(64).min(ARRAY_MAX)
}

/// The sector shift of a fine block: 4 KiB, or the logical block size if
/// that is larger.
pub fn fine_shift(logical_block_size: u32) -> u32 {
    (logical_block_size.max(4096) >> 9).trailing_zeros()
}

/// The fine blocks that the sectors `sector..sector + count` touch, split
/// by container: `(container, first..end)` with offsets inside it.
pub fn pieces(sector: u64, count: u64, shift: u32) -> impl Iterator<Item = (u64, Range<u32>)> {
    let (first, end) = if count == 0 {
        (0, 0)
    } else {
        (
            sector >> shift,
            ((sector.saturating_add(count) - 1) >> shift).saturating_add(1),
        )
    };
    let mut pos = first;
    core::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let c = pos >> CONTAINER_SHIFT;
        let stop = end.min((c + 1) << CONTAINER_SHIFT);
        let r = (pos & (CONTAINER_BLOCKS - 1)) as u32..(stop - (c << CONTAINER_SHIFT)) as u32;
        pos = stop;
        Some((c, r))
    })
}

/// How many entries `arr` (sorted, no duplicates) has in `r`, and where the
/// first of them is.
fn span(arr: &[u16], r: &Range<u32>) -> (usize, usize) {
    let lo = arr.partition_point(|&v| u32::from(v) < r.start);
    let hi = arr.partition_point(|&v| u32::from(v) < r.end);
    (lo, hi - lo)
}

/// The length `arr` would have with `r` inserted.
pub fn array_len_with(arr: &[u16], r: &Range<u32>) -> usize {
    let (_, present) = span(arr, r);
    arr.len() + (r.end - r.start) as usize - present
}

/// Inserts the offsets `r` into the sorted array `buf[..len]`; `buf` must
/// have room for [`array_len_with`] entries. Returns the new length.
pub fn array_insert(buf: &mut [u16], len: usize, r: &Range<u32>) -> usize {
    let (at, present) = span(&buf[..len], r);
    let n = (r.end - r.start) as usize;
    let new_len = len + n - present;
    // The entries after the range move up by the values it adds.
    buf.copy_within(at + present..len, at + n);
    for (i, v) in r.clone().enumerate() {
        buf[at + i] = v as u16;
    }
    new_len
}

/// Sets the bits `r` of a bitmap container, a word at a time.
pub fn bitmap_set(bits: &mut [u64], r: &Range<u32>) {
    let mut v = r.start;
    while v < r.end {
        let bit = v % 64;
        let n = (64 - bit).min(r.end - v);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        bits[(v / 64) as usize] |= mask;
        v += n;
    }
}

/// Whether `r` is every block of a container.
pub fn whole(r: &Range<u32>) -> bool {
    r.start == 0 && u64::from(r.end) == CONTAINER_BLOCKS
}

/// Sets the bits of the offsets in `arr`.
pub fn array_to_bitmap(arr: &[u16], bits: &mut [u64]) {
    for &v in arr {
        bits[usize::from(v) / 64] |= 1 << (v % 64);
    }
}

/// Whether offset `v` is in the bitmap.
pub fn bitmap_has(bits: &[u64], v: u32) -> bool {
    bits[(v / 64) as usize] & (1 << (v % 64)) != 0
}

/// Whether offset `v` is in the sorted array.
pub fn array_has(arr: &[u16], v: u32) -> bool {
    u16::try_from(v).is_ok_and(|v| arr.binary_search(&v).is_ok())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::vec;
    use std::vec::Vec;

    #[test]
    fn fine_blocks_are_4k_or_the_logical_block() {
        assert_eq!(fine_shift(512), 3);
        assert_eq!(fine_shift(4096), 3);
        assert_eq!(fine_shift(16384), 5);
    }

    /// The README's figure: 1 % of a 1 TiB device changed in scattered
    /// 4 KiB writes (every container gets its share) stays under the
    /// default limit of 8 MiB, slots included.
    #[test]
    fn one_percent_of_a_tib_fits_the_default_limit() {
        let blocks: u64 = (1 << 40) / 4096;
        let containers = blocks / CONTAINER_BLOCKS;
        let per = (blocks / 100).div_ceil(containers) as usize;
        let bytes = containers as usize * array_capacity(per) * 2;
        // A slot per container and interval (the kernel's enum is 32 bytes),
        // the active interval and the four frozen ones.
        let slots = containers as usize * 32 * 5;
        assert!(per < ARRAY_MAX, "{per} entries a container");
        assert!(bytes + slots <= 8 << 20, "{} bytes", bytes + slots);
        std::println!("1 % of 1 TiB: {bytes} bytes of containers, {slots} of slots");
    }

    #[test]
    fn pieces_split_at_containers() {
        let v: Vec<_> = pieces(0, 8, 3).collect();
        assert_eq!(v, vec![(0, 0..1)]);
        // One sector inside a block.
        let v: Vec<_> = pieces(9, 1, 3).collect();
        assert_eq!(v, vec![(0, 1..2)]);
        // Across a container border.
        let border = CONTAINER_BLOCKS << 3;
        let v: Vec<_> = pieces(border - 16, 32, 3).collect();
        assert_eq!(
            v,
            vec![
                (0, (CONTAINER_BLOCKS - 2) as u32..CONTAINER_BLOCKS as u32),
                (1, 0..2)
            ]
        );
        assert_eq!(pieces(5, 0, 3).count(), 0);
    }

    proptest! {
        /// Arrays and bitmaps built from any ranges hold exactly their union.
        #[test]
        fn containers_hold_the_union(ranges in proptest::collection::vec((0u32..70_000, 1u32..600), 1..40)) {
            let mut model = BTreeSet::new();
            let mut buf = vec![0u16; CONTAINER_BLOCKS as usize];
            let mut len = 0;
            let mut bits = vec![0u64; BITMAP_WORDS];
            for (start, n) in ranges {
                let r = start.min(CONTAINER_BLOCKS as u32 - 1)..(start + n).min(CONTAINER_BLOCKS as u32);
                let want = array_len_with(&buf[..len], &r);
                len = array_insert(&mut buf, len, &r);
                prop_assert_eq!(len, want);
                bitmap_set(&mut bits, &r);
                model.extend(r);
            }
            let arr = &buf[..len];
            prop_assert!(arr.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(arr.iter().map(|&v| u32::from(v)).collect::<BTreeSet<_>>(), model.clone());
            let mut from_arr = vec![0u64; BITMAP_WORDS];
            array_to_bitmap(arr, &mut from_arr);
            prop_assert_eq!(&from_arr, &bits);
            for v in 0..CONTAINER_BLOCKS as u32 {
                prop_assert_eq!(bitmap_has(&bits, v), model.contains(&v));
                prop_assert_eq!(array_has(arr, v), model.contains(&v));
            }
        }
    }
}
