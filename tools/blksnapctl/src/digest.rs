// SPDX-License-Identifier: GPL-2.0

//! Per-block digests of a backup image: what an incremental backup compares
//! when the change map cannot be used (tracking restarted after a reboot, a
//! detach or a module reload).
//!
//! The image is cut into blocks of [`BLOCK`] bytes (the last one may be
//! shorter); each has the BLAKE3 hash of its content. BLAKE3 because a
//! changed block whose digest matched the old one would be silently left
//! out of the backup: the hash must be collision resistant (256 bits,
//! cryptographic, unlike xxHash or CRC), and it must not make the backup
//! CPU bound (several times faster than SHA-256 in software, and parallel
//! within a block). 64 KiB blocks keep the digests at 1/2048 of the
//! device (512 MiB per TiB) while an incremental that found 4 KiB changed
//! writes 64 KiB.
//!
//! The file, `<name>.digests` beside the image: a header (`BLKSNAPD`, a
//! format version, the block size and the device size, little endian) and
//! then one 32-byte digest per block.

use crate::backup::Buffer;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

/// Bytes of the blocks hashed.
pub const BLOCK: u64 = 64 << 10;
/// Bytes of one digest.
pub const LEN: usize = 32;
/// The hash, as the manifest names it.
pub const ALGORITHM: &str = "blake3";

const MAGIC: &[u8; 8] = b"BLKSNAPD";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8;

/// The digests of an image of `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digests {
    size: u64,
    sums: Vec<[u8; LEN]>,
}

/// The digest of one block.
pub fn hash(block: &[u8]) -> [u8; LEN] {
    *blake3::hash(block).as_bytes()
}

/// Reads bytes at an offset into a buffer.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), String> + 'a;
/// Takes a piece read at an offset, with the digests of its blocks.
pub type Consume<'a> = dyn FnMut(u64, &[u8], &[[u8; LEN]]) -> Result<(), String> + 'a;

/// The digests of the blocks of `data` (which starts on a block), the
/// blocks spread over `threads` threads.
pub fn hash_blocks(data: &[u8], threads: usize) -> Vec<[u8; LEN]> {
    let blocks: Vec<&[u8]> = data.chunks(BLOCK as usize).collect();
    let mut sums = vec![[0; LEN]; blocks.len()];
    let per = blocks.len().div_ceil(threads.max(1)).max(1);
    if per >= blocks.len() {
        for (s, b) in sums.iter_mut().zip(&blocks) {
            *s = hash(b);
        }
        return sums;
    }
    std::thread::scope(|scope| {
        let mut parts = blocks.chunks(per).zip(sums.chunks_mut(per));
        // The first part on this thread.
        let first = parts.next();
        for (bs, ss) in parts {
            scope.spawn(move || {
                for (s, b) in ss.iter_mut().zip(bs) {
                    *s = hash(b);
                }
            });
        }
        if let Some((bs, ss)) = first {
            for (s, b) in ss.iter_mut().zip(bs) {
                *s = hash(b);
            }
        }
    });
    sums
}

/// The threads that digest in [`pipeline`]: one per CPU the process may
/// use but the one that reads (at least one). More would only wait for a
/// CPU, and a piece is done when its slowest part is.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

/// Reads `size` bytes in pieces of `step` bytes (a multiple of [`BLOCK`];
/// the last piece is shorter) through `read` (offset, buffer: page aligned,
/// for direct I/O) and hands each piece with the digests of its blocks to
/// `consume`, in order. A pipeline: while a piece is digested (on `threads`
/// threads), the next one is read and the one before is consumed, so that
/// digesting costs no time where the CPUs can keep up with the reads.
pub fn pipeline(
    size: u64,
    step: usize,
    threads: usize,
    read: &mut ReadAt<'_>,
    consume: &mut Consume<'_>,
) -> Result<(), String> {
    assert!(
        step > 0 && (step as u64).is_multiple_of(BLOCK),
        "pieces of whole blocks"
    );
    // Three buffers: one being read or consumed here, one queued for or
    // being digested by the digest thread, one digested and queued for
    // this thread; the channels hold one each, so that a send here never
    // waits while this thread holds every free buffer.
    const BUFFERS: usize = 3;
    type Piece = (u64, usize, Buffer);
    type Hashed = (u64, usize, Buffer, Vec<[u8; LEN]>);
    std::thread::scope(|scope| {
        let (to_hash, hash_rx) = std::sync::mpsc::sync_channel::<Piece>(1);
        let (hashed_tx, hashed) = std::sync::mpsc::sync_channel::<Hashed>(1);
        let worker = scope.spawn(move || {
            for (off, n, buf) in hash_rx {
                let sums = hash_blocks(buf.slice(n), threads);
                if hashed_tx.send((off, n, buf, sums)).is_err() {
                    return;
                }
            }
        });
        let mut free: Vec<Buffer> = (0..BUFFERS).map(|_| Buffer::new(step)).collect();
        let (mut off, mut done) = (0u64, 0u64);
        let r = (|| {
            while done < size {
                // Read ahead while a buffer is free, else consume the
                // oldest piece digested.
                if off < size && !free.is_empty() {
                    let n = (size - off).min(step as u64) as usize;
                    let mut buf = free.pop().expect("a free buffer");
                    read(off, buf.get(n))?;
                    to_hash
                        .send((off, n, buf))
                        .map_err(|_| "the digest thread ended".to_string())?;
                    off += n as u64;
                    continue;
                }
                let (at, n, buf, sums) = hashed
                    .recv()
                    .map_err(|_| "the digest thread ended".to_string())?;
                consume(at, buf.slice(n), &sums)?;
                done += n as u64;
                free.push(buf);
            }
            Ok(())
        })();
        drop(to_hash);
        drop(hashed);
        if worker.join().is_err() {
            return Err("a digest thread panicked".to_string());
        }
        r
    })
}

impl Digests {
    /// Digests of an image of `size` bytes, all unset (zero).
    pub fn new(size: u64) -> Self {
        Self {
            size,
            sums: vec![[0; LEN]; size.div_ceil(BLOCK) as usize],
        }
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.sums.len()
    }

    /// The byte range of block `i`.
    pub fn span(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * BLOCK;
        (start, (start + BLOCK).min(self.size))
    }

    /// The digest of block `i`.
    pub fn get(&self, i: usize) -> Option<&[u8; LEN]> {
        self.sums.get(i)
    }

    /// Sets the digest of block `i`.
    pub fn set(&mut self, i: usize, sum: [u8; LEN]) {
        if let Some(s) = self.sums.get_mut(i) {
            *s = sum;
        }
    }

    /// Sets the digests of the blocks from block `first` on.
    pub fn set_from(&mut self, first: usize, sums: &[[u8; LEN]]) {
        for (k, s) in sums.iter().enumerate() {
            self.set(first + k, *s);
        }
    }

    /// Takes `data`, the image's bytes from `off`: the digest of every
    /// block it holds whole is set. Returns the blocks it holds only part
    /// of (at most two), whose digests must be computed again from the
    /// whole block.
    pub fn absorb(&mut self, off: u64, data: &[u8]) -> Vec<usize> {
        let end = (off + data.len() as u64).min(self.size);
        let mut partial = Vec::new();
        if off >= end {
            return partial;
        }
        let first = (off / BLOCK) as usize;
        let last = ((end - 1) / BLOCK) as usize;
        for i in first..=last {
            let (s, e) = self.span(i);
            if s < off || e > end {
                partial.push(i);
                continue;
            }
            let from = (s - off) as usize;
            let sum = hash(&data[from..from + (e - s) as usize]);
            self.set(i, sum);
        }
        partial
    }

    /// Reads a digest file for an image of `size` bytes.
    pub fn load(path: &Path, size: u64) -> Result<Self, String> {
        let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let bad = |why: &str| format!("{}: not a digest file of this image: {why}", path.display());
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad("no header"));
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        if word(8) != VERSION {
            return Err(bad("another format version"));
        }
        if u64::from(word(12)) != BLOCK {
            return Err(bad("another block size"));
        }
        if u64::from_le_bytes(bytes[16..24].try_into().unwrap()) != size {
            return Err(bad("another device size"));
        }
        let mut d = Self::new(size);
        if bytes.len() != HEADER + d.sums.len() * LEN {
            return Err(bad("truncated"));
        }
        for (s, b) in d.sums.iter_mut().zip(bytes[HEADER..].chunks_exact(LEN)) {
            s.copy_from_slice(b);
        }
        Ok(d)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.sums.len() * LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        for s in &self.sums {
            out.extend_from_slice(s);
        }
        out
    }

    /// Writes the digest file atomically (temporary file, fsync, rename).
    pub fn store(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("digests.tmp");
        let mut f = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(&self.to_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absorb_sets_whole_blocks_and_reports_parts() {
        let size = 3 * BLOCK + 4096;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let mut d = Digests::new(size);
        assert_eq!(d.blocks(), 4);
        assert!(d.absorb(0, &data).is_empty());
        for i in 0..4 {
            let (s, e) = d.span(i);
            assert_eq!(d.get(i).unwrap(), &hash(&data[s as usize..e as usize]));
        }
        let mut e = Digests::new(size);
        // From the middle of block 0 to the middle of block 2.
        let (from, to) = (BLOCK / 2, 2 * BLOCK + 100);
        assert_eq!(
            e.absorb(from, &data[from as usize..to as usize]),
            vec![0, 2]
        );
        assert_eq!(e.get(1), d.get(1));
        assert_eq!(e.get(0), Some(&[0; LEN]));
        // The short last block is whole when the data reaches the end.
        assert!(e.absorb(3 * BLOCK, &data[3 * BLOCK as usize..]).is_empty());
        assert_eq!(e.get(3), d.get(3));
    }

    /// The pipeline hands every piece over in order, with the digests a
    /// plain loop computes, whatever the threads and a short last piece.
    #[test]
    fn pipeline_equals_plain_digests() {
        let size = 9 * BLOCK + 1536;
        let data: Vec<u8> = (0..size).map(|i| (i * 13 % 241) as u8).collect();
        let mut want = Digests::new(size);
        assert!(want.absorb(0, &data).is_empty());
        for threads in [1, 2, 3, 8] {
            for step in [BLOCK as usize, 2 * BLOCK as usize, 16 * BLOCK as usize] {
                let mut got = Digests::new(size);
                let mut seen = Vec::new();
                pipeline(
                    size,
                    step,
                    threads,
                    &mut |off, buf| {
                        buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
                        Ok(())
                    },
                    &mut |off, piece, sums| {
                        assert_eq!(piece, &data[off as usize..off as usize + piece.len()]);
                        assert_eq!(sums.len() as u64, (piece.len() as u64).div_ceil(BLOCK));
                        got.set_from((off / BLOCK) as usize, sums);
                        seen.push(off);
                        Ok(())
                    },
                )
                .unwrap();
                assert_eq!(got, want, "{threads} threads, pieces of {step}");
                let offs: Vec<u64> = (0..size).step_by(step).collect();
                assert_eq!(seen, offs);
            }
        }
        // An error of a read or a consumer ends it with that error.
        let e = pipeline(
            size,
            BLOCK as usize,
            2,
            &mut |off, _| {
                if off == 3 * BLOCK {
                    Err("bad read".into())
                } else {
                    Ok(())
                }
            },
            &mut |_, _, _| Ok(()),
        );
        assert_eq!(e.unwrap_err(), "bad read");
        let e = pipeline(
            size,
            BLOCK as usize,
            2,
            &mut |_, _| Ok(()),
            &mut |off, _, _| {
                if off == 2 * BLOCK {
                    Err("bad write".into())
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(e.unwrap_err(), "bad write");
    }

    #[test]
    fn file_round_trip_and_checks() {
        let dir = std::env::temp_dir().join(format!("digest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.digests");
        let mut d = Digests::new(5 * BLOCK - 512);
        d.set(2, [9; LEN]);
        d.store(&p).unwrap();
        assert_eq!(Digests::load(&p, 5 * BLOCK - 512).unwrap(), d);
        assert!(Digests::load(&p, 5 * BLOCK)
            .unwrap_err()
            .contains("device size"));
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.pop();
        std::fs::write(&p, &bytes).unwrap();
        assert!(Digests::load(&p, 5 * BLOCK - 512)
            .unwrap_err()
            .contains("truncated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
