// SPDX-License-Identifier: GPL-2.0

//! `blksnapctl digest-bench FILE`: how fast the digest paths (digest
//! incrementals, `verify`, `verify --source`) can go, against how fast the
//! same file is read: read alone, read and digested in one thread one piece
//! after the other, and through [`digest::pipeline`] (the next piece read
//! while the last is digested, on one thread or on every CPU); each with
//! direct I/O (the disk) and from the page cache (the CPU alone), and the
//! digest alone in memory. Rounds are interleaved and the medians kept, so
//! that the load of other processes spreads over every row.

use crate::backup::{Buffer, IO_SIZE};
use crate::digest::{self, BLOCK};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

/// One measured way of going over the file.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What was measured.
    pub what: String,
    /// Whether it read with direct I/O (else from the page cache; `None`:
    /// no reads, the digest in memory).
    pub direct: Option<bool>,
    /// Threads that digest (0: none).
    pub threads: usize,
    /// MB/s (10^6 bytes) of each round.
    pub rounds: Vec<f64>,
    /// Their median.
    pub mb_s: f64,
}

/// Writes `size` bytes of mixed content to `path`: 64 KiB blocks, a third
/// random, a third zero, a third copies of one block, interleaved, all
/// written (no holes: a read of a hole costs no I/O).
pub fn make_file(path: &Path, size: u64) -> Result<(), String> {
    let f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let same: Vec<u8> = (0..BLOCK).map(|i| (i * 131 % 251) as u8).collect();
    let mut buf = vec![0u8; IO_SIZE];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(IO_SIZE as u64) as usize;
        for b in buf[..n].chunks_mut(BLOCK as usize) {
            match next() % 3 {
                0 => {
                    for c in b.chunks_mut(8) {
                        let v = next().to_le_bytes();
                        c.copy_from_slice(&v[..c.len()]);
                    }
                }
                1 => b.fill(0),
                _ => b.copy_from_slice(&same[..b.len()]),
            }
        }
        f.write_all_at(&buf[..n], off)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        off += n as u64;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

fn open(path: &Path, direct: bool) -> Result<File, String> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(nix::libc::O_DIRECT);
    }
    o.open(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The first pipeline, for comparison: a thread spawned for each piece
/// (joined before the next one is consumed), two buffers, no read-ahead.
fn pipeline_spawned(
    size: u64,
    threads: usize,
    read: &mut digest::ReadAt<'_>,
    consume: &mut digest::Consume<'_>,
) -> Result<(), String> {
    type Hashed = (Buffer, Vec<[u8; digest::LEN]>);
    std::thread::scope(|scope| {
        let mut free: Vec<Buffer> = (0..2).map(|_| Buffer::new(IO_SIZE)).collect();
        let mut pending: Option<(u64, usize, std::thread::ScopedJoinHandle<'_, Hashed>)> = None;
        let mut off = 0u64;
        loop {
            let next = if off < size {
                let n = (size - off).min(IO_SIZE as u64) as usize;
                let mut buf = free.pop().expect("two buffers in turn");
                read(off, buf.get(n))?;
                let h = scope.spawn(move || {
                    let sums = digest::hash_blocks(buf.slice(n), threads);
                    (buf, sums)
                });
                Some((off, n, h))
            } else {
                None
            };
            if let Some((at, n, h)) = pending.take() {
                let (buf, sums) = h.join().map_err(|_| "panicked".to_string())?;
                consume(at, buf.slice(n), &sums)?;
                free.push(buf);
            }
            match next {
                Some(p) => {
                    off += p.1 as u64;
                    pending = Some(p);
                }
                None => return Ok(()),
            }
        }
    })
}

/// One pass over the file; returns the seconds it took.
fn pass(path: &Path, size: u64, direct: bool, mode: &str, threads: usize) -> Result<f64, String> {
    let f = open(path, direct)?;
    let start = Instant::now();
    let read = |off: u64, buf: &mut [u8]| {
        f.read_exact_at(buf, off)
            .map_err(|e| format!("{}: read at {off}: {e}", path.display()))
    };
    match mode {
        "read" | "sequential" => {
            let mut buf = Buffer::new(IO_SIZE);
            let mut off = 0;
            while off < size {
                let n = (size - off).min(IO_SIZE as u64) as usize;
                let data = buf.get(n);
                read(off, data)?;
                if mode == "sequential" {
                    for b in data.chunks(BLOCK as usize) {
                        black_box(digest::hash(b));
                    }
                } else {
                    black_box(&data[..]);
                }
                off += n as u64;
            }
        }
        "spawned" => pipeline_spawned(
            size,
            threads,
            &mut |off, buf| read(off, buf),
            &mut |_, _, sums| {
                black_box(sums);
                Ok(())
            },
        )?,
        _ => digest::pipeline(
            size,
            IO_SIZE,
            threads,
            &mut |off, buf| read(off, buf),
            &mut |_, _, sums| {
                black_box(sums);
                Ok(())
            },
        )?,
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The digest alone, in memory: `size` bytes (a 64 MiB buffer again and
/// again) on `threads` threads; returns the seconds.
fn memory(size: u64, threads: usize, data: &[u8]) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    while done < size {
        for piece in data.chunks(IO_SIZE) {
            black_box(digest::hash_blocks(piece, threads));
        }
        done += data.len() as u64;
    }
    start.elapsed().as_secs_f64()
}

/// Measures every row `rounds` times over `path` (made with [`make_file`]
/// if missing, of `size` bytes).
pub fn run(path: &Path, size: u64, rounds: usize) -> Result<Vec<Row>, String> {
    if !path.exists() {
        make_file(path, size)?;
    }
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len()
        / 4096
        * 4096;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The digest threads of the pipeline as the product runs it, and one
    // per CPU when that is more.
    let mut pools = vec![1, digest::threads(), cpus];
    pools.dedup();
    let kinds: Vec<(String, Option<bool>, &str, usize)> = {
        let mut v = Vec::new();
        for direct in [true, false] {
            v.push(("read".to_string(), Some(direct), "read", 0));
            v.push((
                "read + digest, one thread, in turn".to_string(),
                Some(direct),
                "sequential",
                1,
            ));
            v.push((
                "read + digest, thread per piece (first pipeline)".to_string(),
                Some(direct),
                "spawned",
                digest::threads(),
            ));
            for &n in &pools {
                v.push((
                    format!("read + digest, pipeline, {n} digest thread(s)"),
                    Some(direct),
                    "pipeline",
                    n,
                ));
            }
        }
        for &n in &pools {
            v.push((
                format!("digest alone, in memory, {n} thread(s)"),
                None,
                "memory",
                n,
            ));
        }
        v
    };
    let mut data = vec![0u8; 64 << 20];
    open(path, false)?
        .read_exact_at(&mut data[..(size as usize).min(64 << 20)], 0)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // The page cache warmed for the cached rows.
    pass(path, size, false, "read", 0)?;
    let mut rows: Vec<Row> = kinds
        .iter()
        .map(|(what, direct, _, threads)| Row {
            what: what.clone(),
            direct: *direct,
            threads: *threads,
            rounds: Vec::new(),
            mb_s: 0.0,
        })
        .collect();
    for _ in 0..rounds.max(1) {
        for (row, (_, direct, mode, threads)) in rows.iter_mut().zip(&kinds) {
            let secs = match direct {
                Some(direct) => pass(path, size, *direct, mode, *threads)?,
                None => memory(size, *threads, &data),
            };
            row.rounds.push(size as f64 / secs / 1e6);
        }
    }
    for row in &mut rows {
        let mut r = row.rounds.clone();
        r.sort_by(|a, b| a.total_cmp(b));
        row.mb_s = r[r.len() / 2];
    }
    Ok(rows)
}
