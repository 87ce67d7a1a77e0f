// SPDX-License-Identifier: GPL-2.0

//! Restore points: each backup of a device is a new point of its chain in
//! `DIR/<name>/`, never an update of an earlier one.
//!
//! - `point-NNNN.qcow2`: the image ([`crate::qcow`]); a full backup is a
//!   base, an incremental an overlay backed by the previous complete point
//!   that holds only the blocks it copied.
//! - `point-NNNN.json`: its manifest ([`Manifest`]): device identity, size,
//!   CBT generation and snapshot number, time, backing point, the SHA-256
//!   of the device's content at that point, status.
//! - `point-NNNN.digests`: per-block digests of that content, for the next
//!   incremental when the change map cannot be used ([`crate::digest`]).
//!
//! A new point's number is above those of every file of the chain. A manifest is written `in-progress` before its image
//! is started under `point-NNNN.qcow2.tmp`; the image is renamed to its
//! name once complete and durable, and the manifest then says `complete`.
//! An interrupted backup leaves an in-progress manifest and a temporary
//! file; the next incremental builds on the last complete point, and the
//! next prune removes the leftovers. Backups and prunes of a chain hold its
//! lock file `.lock`.

use crate::backup::{
    self, copy_changed_blocks, copy_checked, copy_extents, copy_known, hex, store_digests, Device,
    Kind, Manifest, Method, Options, Outcome, Progress, Status, Tap,
};
use crate::digest::{self, Digests};
use crate::qcow::{self, PointWriter};
use crate::{Control, SnapshotId};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Bytes per read of an image chain.
const STEP: usize = 4 << 20;

/// The directory of a device's chain.
pub fn chain_dir(dir: &Path, device: &Path) -> PathBuf {
    let (img, _, _) = backup::paths(dir, device);
    img.with_extension("")
}

/// The manifest file of point `n`.
pub fn manifest_path(chain: &Path, n: u32) -> PathBuf {
    chain.join(format!("point-{n:04}.json"))
}

/// The image file name of point `n`.
pub fn image_name(n: u32) -> String {
    format!("point-{n:04}.qcow2")
}

fn digests_name(n: u32) -> String {
    format!("point-{n:04}.digests")
}

/// Parses `point-NNNN.<ext>` into NNNN.
fn number_of(name: &str, ext: &str) -> Option<u32> {
    let n = name.strip_prefix("point-")?.strip_suffix(ext)?;
    (n.len() >= 4 && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// The exclusive lock of a chain, held by a backup or a prune.
pub struct Lock(#[allow(dead_code)] Flock<File>);

impl Lock {
    /// Creates the chain's directory if needed and locks it; fails at once
    /// when another backup or prune holds it.
    pub fn take(chain: &Path) -> Result<Self, String> {
        fs::create_dir_all(chain).map_err(|e| format!("{}: {e}", chain.display()))?;
        let path = chain.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Flock::lock(f, FlockArg::LockExclusiveNonblock)
            .map(Lock)
            .map_err(|(_, e)| {
                format!(
                    "{}: {e}: another backup or prune of this chain is running",
                    chain.display()
                )
            })
    }
}

/// One point of a chain, as its manifest describes it.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Its number.
    pub number: u32,
    /// Its manifest.
    pub manifest: Manifest,
    /// The manifest's path.
    pub path: PathBuf,
    /// The image's path.
    pub image: PathBuf,
    /// Bytes the image file takes on disk (0 when it is missing).
    pub allocated: u64,
}

/// The points of a chain with a manifest, complete or not, by number.
pub fn scan(chain: &Path) -> Result<Vec<Point>, String> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(chain) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("{}: {e}", chain.display())),
    };
    for e in rd {
        let e = e.map_err(|e| format!("{}: {e}", chain.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(number) = number_of(&name, ".json") else {
            continue;
        };
        let path = e.path();
        let manifest = Manifest::load(&path)?;
        if manifest.point != Some(number) || manifest.image != image_name(number) {
            return Err(format!(
                "{}: not the manifest of point {number}",
                path.display()
            ));
        }
        let image = chain.join(&manifest.image);
        let allocated = fs::metadata(&image)
            .map(|md| std::os::unix::fs::MetadataExt::blocks(&md) * 512)
            .unwrap_or(0);
        out.push(Point {
            number,
            manifest,
            path,
            image,
            allocated,
        });
    }
    out.sort_by_key(|p| p.number);
    Ok(out)
}

/// The newest complete point of a chain.
pub fn latest(chain: &Path) -> Result<Option<Point>, String> {
    Ok(scan(chain)?
        .into_iter()
        .rev()
        .find(|p| p.manifest.status == Status::Complete))
}

/// Destroys the snapshots that the in-progress points of `chain` name: a
/// backup killed before it could destroy its snapshot leaves one, which
/// would hold its store and copy on write until a reboot. The caller holds
/// the chain's lock: no backup of the chain is running.
pub fn destroy_stale_snapshots(
    chain: &Path,
    ctl: &Control,
    log: &dyn Fn(&str),
) -> Result<(), String> {
    for p in scan(chain)?
        .iter()
        .filter(|p| p.manifest.status != Status::Complete)
    {
        let Some(Ok(id)) = p.manifest.snapshot.as_deref().map(str::parse::<SnapshotId>) else {
            continue;
        };
        match ctl.snapshot_destroy(&id) {
            Ok(()) => log(&format!(
                "destroyed snapshot {id}, left by the interrupted backup of point {}",
                p.number
            )),
            // Gone already (destroyed, or a reboot): ESRCH from this
            // module, ENODEV from upstream's.
            Err(e)
                if matches!(
                    e.errno,
                    nix::errno::Errno::ESRCH | nix::errno::Errno::ENODEV
                ) => {}
            Err(e) => {
                return Err(format!(
                    "snapshot {id} of the interrupted point {}: {e}",
                    p.number
                ))
            }
        }
    }
    Ok(())
}

/// The next number: above every point and leftover of the chain.
fn next_number(chain: &Path) -> Result<u32, String> {
    let mut n = 0;
    for e in fs::read_dir(chain).map_err(|e| format!("{}: {e}", chain.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        let name = e.file_name().to_string_lossy().to_string();
        for ext in [".json", ".qcow2", ".qcow2.tmp", ".digests"] {
            if let Some(k) = number_of(&name, ext) {
                n = n.max(k);
            }
        }
    }
    n.checked_add(1)
        .ok_or_else(|| format!("{}: no point number left", chain.display()))
}

/// Why the image of point `n`, whose manifest is `m`, may not be read, if
/// its header `refs` do not match the manifest; else the number of the
/// point it reads through. A point keeps its data in its own file; a
/// backing is the bare name of an older point's image in the same
/// directory, `point-NNNN.qcow2` (so the chain ends at a base, without a
/// loop), in qcow2: the header must name exactly the manifest's backing,
/// or none when the manifest has none. While a prune merges the point
/// (`merging`), its image may already be the new base.
fn check_refs(n: u32, m: &Manifest, refs: &qcow::Refs) -> Result<Option<u32>, String> {
    if refs.needs_data_file || refs.data_file.is_some() {
        return Err(format!(
            "its qcow2 header {}: a point keeps its data in its own file",
            match &refs.data_file {
                Some(f) => format!("names the external data file {f:?}"),
                None => "says its data is in an external data file".into(),
            }
        ));
    }
    let below = match &m.backing {
        None => None,
        Some(b) => match number_of(b, ".qcow2") {
            Some(k) if image_name(k) == *b && k < n => Some(k),
            Some(k) if image_name(k) == *b => {
                return Err(format!(
                    "its manifest's backing {b:?} is not older than point {n}: the chain would loop"
                ))
            }
            _ => {
                return Err(format!(
                    "its manifest's backing {b:?} is not the image of an older point of this chain (point-NNNN.qcow2, in the same directory)"
                ))
            }
        },
    };
    match (&refs.backing, &m.backing) {
        (None, None) => Ok(None),
        (None, Some(_)) if m.merging => Ok(None),
        (None, Some(b)) => Err(format!(
            "its qcow2 header names no backing file, but its manifest names {b:?}"
        )),
        (Some(h), Some(b)) if h == b => match refs.backing_format.as_deref() {
            None | Some("qcow2") => Ok(below),
            Some(f) => Err(format!(
                "its qcow2 header gives the backing file {h:?} the format {f:?}, not qcow2"
            )),
        },
        (Some(h), b) => Err(format!(
            "its qcow2 header names the backing file {h:?}, but its manifest names {}",
            b.as_ref().map_or("none".into(), |b| format!("{b:?}"))
        )),
    }
}

/// Opens the image of point `n` alone, after checking its manifest (that
/// of a complete point `n`), and checks its header against the manifest
/// ([`check_refs`]) and its size; returns it and the point it reads
/// through. Errors name `top`, the point being opened, and the file.
fn open_layer(chain: &Path, top: u32, n: u32) -> Result<(qcow::Layer, Option<u32>), String> {
    open_layer_keeping(chain, top, n).map(|(l, below, _, _)| (l, below))
}

/// [`open_layer`], also returning a descriptor of the image file checked
/// and the manifest it was checked against.
fn open_layer_keeping(
    chain: &Path,
    top: u32,
    n: u32,
) -> Result<(qcow::Layer, Option<u32>, File, Manifest), String> {
    let image = chain.join(image_name(n));
    let which = if n == top {
        format!("point {top}: {}", image.display())
    } else {
        format!("point {top}: {} (point {n}, in its chain)", image.display())
    };
    let refuse = |why: String| format!("{which}: {why}; refusing to read the chain");
    let mp = manifest_path(chain, n);
    let m = Manifest::load(&mp).map_err(|e| refuse(format!("its manifest: {e}")))?;
    if m.point != Some(n) || m.image != image_name(n) {
        return Err(refuse(format!(
            "{} is not the manifest of point {n}",
            mp.display()
        )));
    }
    if m.status != Status::Complete {
        return Err(refuse(format!("point {n} did not complete")));
    }
    let (l, file) = qcow::open_alone_keeping(&image).map_err(|e| refuse(e.to_string()))?;
    let below = check_refs(n, &m, &qcow::refs(&l)).map_err(refuse)?;
    let size = qcow::layer_size(&l);
    if size != m.size {
        return Err(refuse(format!(
            "{size} bytes, its manifest says {}",
            m.size
        )));
    }
    Ok((l, below, file, m))
}

/// The image files of point `number` and of the points it reads through,
/// the point first and its base last, each checked as [`open_point`] checks
/// it (an image of a complete point of this chain whose header names
/// exactly what its manifest does), returned open: a program given these
/// descriptors reads the chain that was checked, whatever happens to the
/// names meanwhile. Also returns the point's manifest.
pub fn point_files(chain: &Path, number: u32) -> Result<(Manifest, Vec<(u32, File)>), String> {
    let mut files = Vec::new();
    let mut top = None;
    let mut n = number;
    loop {
        let (_, below, f, m) = open_layer_keeping(chain, number, n)?;
        files.push((n, f));
        top.get_or_insert(m);
        match below {
            Some(k) => n = k,
            None => break,
        }
    }
    Ok((top.expect("a chain has a point"), files))
}

/// Opens point `number` of `chain` for reading through its chain of
/// backing points, each image opened by us, by the name its manifest
/// gives, once its header has been checked against its manifest
/// ([`open_layer`]): nothing a header names is opened on its word.
pub fn open_point(chain: &Path, number: u32) -> Result<qcow::Image, String> {
    let mut layers = Vec::new();
    let mut n = number;
    loop {
        let (l, below) = open_layer(chain, number, n)?;
        layers.push(l);
        // Backings are strictly older: the walk ends at a base.
        match below {
            Some(k) => n = k,
            None => break,
        }
    }
    let mut img = None;
    for l in layers.into_iter().rev() {
        img = Some(qcow::with_backing(l, img));
    }
    Ok(img.expect("a chain has a point"))
}

/// Reads the content of `img` (through its chain) in steps, handing each
/// to `f` with its offset.
fn read_chain(
    img: &qcow::Image,
    size: u64,
    stop: Option<&AtomicBool>,
    progress: &dyn Progress,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let mut buf = vec![0u8; STEP];
    let mut off = 0;
    while off < size {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err("interrupted".into());
        }
        let n = (size - off).min(STEP as u64) as usize;
        img.read(&mut buf[..n], off)
            .map_err(|e| format!("read at {off}: {e}"))?;
        f(off, &buf[..n])?;
        off += n as u64;
        progress.update(off, size);
    }
    Ok(())
}

/// [`read_chain`] through the digest pipeline ([`digest::pipeline`]):
/// each step comes with the digests of its blocks, computed on other
/// threads while the next step is read.
fn read_chain_digested(
    img: &qcow::Image,
    size: u64,
    stop: &AtomicBool,
    progress: &dyn Progress,
    f: &mut digest::Consume<'_>,
) -> Result<(), String> {
    digest::pipeline(
        size,
        STEP,
        digest::threads(),
        &mut |off, buf| {
            if stop.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            let n = buf.len() as u64;
            img.read(buf, off)
                .map_err(|e| format!("read at {off}: {e}"))?;
            progress.update(off + n, size);
            Ok(())
        },
        f,
    )
}

/// The per-block digests of an image's content and, with `sha`, its
/// SHA-256.
fn checksums(
    img: &qcow::Image,
    size: u64,
    sha: bool,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<(Option<String>, Digests), String> {
    let mut h = sha.then(Sha256::new);
    let mut digests = Digests::new(size);
    read_chain_digested(img, size, stop, progress, &mut |off, data, sums| {
        if let Some(h) = h.as_mut() {
            h.update(data);
        }
        // Steps start on multiples of the digest block: all whole but
        // the last, which ends at the device's end.
        digests.set_from((off / digest::BLOCK) as usize, sums);
        Ok(())
    })?;
    Ok((h.map(|h| hex(&h.finalize())), digests))
}

/// The first block whose digest differs, as a message.
fn first_difference(got: &Digests, want: &Digests) -> Option<String> {
    (0..want.blocks().max(got.blocks()))
        .find(|&i| got.get(i) != want.get(i))
        .map(|i| {
            let (s, e) = want.span(i);
            format!(
                "bytes {s}..{e} (block {i} of {} KiB) differ",
                digest::BLOCK >> 10
            )
        })
}

/// Checks content read as `sha` (if computed) and `digests` against the
/// record of point `m` (its SHA-256 if it has one, its digests file).
fn check_content(
    chain: &Path,
    m: &Manifest,
    sha: Option<&str>,
    digests: &Digests,
) -> Result<(), String> {
    if let (Some(sha), false) = (sha, m.sha256.is_empty()) {
        if sha != m.sha256 {
            return Err(format!(
                "checksum {sha} does not match the manifest's {}",
                m.sha256
            ));
        }
    }
    let f = m.digests.as_ref().ok_or("the manifest names no digests")?;
    let want = backup::load_digests(chain, f, m.size)?;
    match first_difference(digests, &want) {
        Some(d) => Err(format!("{d} from the point's digests")),
        None => Ok(()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Makes a restore point of one device from its snapshot image
/// ([`backup::run`] with the points layout).
pub(crate) fn backup_device(
    d: &mut Device,
    opts: &Options<'_>,
    snapshot: &SnapshotId,
) -> Result<Outcome, String> {
    let info = d.tracker.cbt_info().map_err(|e| e.to_string())?;
    if let Some(why) = backup::snapshot_failed(&d.tracker) {
        return Err(format!("{}: {why}", d.path.display()));
    }
    let snap = d.tracker.snapshot_info().map_err(|e| e.to_string())?;
    let image = PathBuf::from(format!("/dev/{}", snap.image));
    let chain = chain_dir(opts.dir, &d.path);
    let size = info.device_capacity;
    let number = next_number(&chain)?;
    let manifest_path = manifest_path(&chain, number);
    let img_path = chain.join(image_name(number));
    let backing = match d.kind {
        Kind::Full => None,
        _ => Some(
            d.previous
                .as_ref()
                .ok_or("no previous point")?
                .image
                .clone(),
        ),
    };
    let below = match &backing {
        Some(name) => Some((
            name.as_str(),
            d.previous_image
                .take()
                .ok_or("the previous point is not open")?,
        )),
        None => None,
    };
    let mut m = Manifest {
        format: backup::FORMAT,
        device: d.path.display().to_string(),
        dev: backup::dev_string(&d.path)?,
        identity: backup::identity(&d.path),
        size,
        block_size: info.block_size,
        generation: info.generation.clone(),
        snapshot_number: info.changes_number,
        base_number: d
            .previous
            .as_ref()
            .filter(|_| d.kind != Kind::Full)
            .map_or(info.changes_number, |p| p.base_number),
        kind: d.kind,
        status: Status::InProgress,
        image: image_name(number),
        sha256: String::new(),
        bytes_read: 0,
        bytes_written: 0,
        ranges: Vec::new(),
        method: Some(d.method),
        digests: None,
        point: Some(number),
        image_format: Some("qcow2".into()),
        backing: backing.clone(),
        time: Some(now()),
        merged: false,
        merging: false,
        snapshot: Some(snapshot.to_string()),
        missed: Vec::new(),
        lvm_origin: d.lvm_origin.clone(),
    };
    m.store(&manifest_path)?;
    let w = PointWriter::create(&img_path, size, below)
        .map_err(|e| format!("{}: {e}", img_path.display()))?;
    let mut method = d.method;
    // The digests of the content, kept up to date from the data copied:
    // new for a full, the previous point's for an incremental (run() loaded
    // and checked them). Without them, the point is read back whole.
    let mut digests = match d.kind {
        Kind::Full => Some(Digests::new(size)),
        _ => d.digests.take(),
    };
    let mut hash = (d.kind == Kind::Full).then(Sha256::new);
    let mut partial = Vec::new();
    let mut verified = None;
    let prev_point = d.previous.as_ref().and_then(|p| p.point).unwrap_or(0);
    let copied = (|| {
        match d.kind {
        Kind::Full => {
            let mut tap = digests.as_mut().map(|digests| Tap {
                digests,
                partial: Vec::new(),
            });
            copy_extents(
                &image,
                &w,
                &[(0, size)],
                hash.as_mut(),
                tap.as_mut(),
                opts.stop,
                opts.progress,
            )
        }
        _ => match (method, digests.as_mut()) {
            (Method::Digest, Some(digests)) => match d.known.take() {
                Some(known) => copy_known(&image, &w, digests, known, opts.stop, opts.progress),
                None => copy_changed_blocks(&image, &w, digests, opts.stop, opts.progress),
            },
            (Method::Digest, None) => Err(format!(
                "{}: the change map cannot be used and point {prev_point} has no usable digests: make a full backup",
                d.path.display(),
            )),
            (_, digests) => {
                method = Method::Cbt;
                let since = d.previous.as_ref().ok_or("no previous point")?.snapshot_number;
                let extents = backup::changed_since(&d.tracker, since, info.block_size, size)?;
                if opts.verify_source {
                    if let Some(digests) = digests {
                        let (c, found) = copy_checked(
                            &image,
                            &w,
                            &extents,
                            digests,
                            &mut |s, buf| {
                                w.image().read(buf, s).map_err(|e| format!("read at {s}: {e}"))
                            },
                            opts.stop,
                            opts.progress,
                        )?;
                        verified = Some(found);
                        return Ok(c);
                    }
                    (opts.log)(&format!(
                        "{}: WARNING, --verify-source: point {prev_point} has no usable digests: the device is not checked",
                        d.path.display()
                    ));
                }
                let mut tap = digests.map(|digests| Tap {
                    digests,
                    partial: Vec::new(),
                });
                let c = copy_extents(&image, &w, &extents, None, tap.as_mut(), opts.stop, opts.progress);
                if let Some(t) = tap {
                    partial = t.partial;
                }
                c
            }
        },
    }
    })();
    let finish = |copied: Result<backup::Copied, String>| -> Result<_, String> {
        let copied = copied?;
        let digests = match digests {
            Some(mut digests) => {
                // Blocks copied in part: digested from the point.
                let mut buf = vec![0u8; digest::BLOCK as usize];
                for &i in &partial {
                    let (s, e) = digests.span(i);
                    let data = &mut buf[..(e - s) as usize];
                    w.image()
                        .read(&mut *data, s)
                        .map_err(|e| format!("read at {s}: {e}"))?;
                    digests.set(i, digest::hash(data));
                }
                digests
            }
            None => {
                (opts.log)(&format!(
                    "{}: the previous point has no usable digests: reading point {number} back whole",
                    d.path.display()
                ));
                checksums(w.image(), size, false, opts.stop, &backup::Quiet)?.1
            }
        };
        Ok((copied, digests))
    };
    let (copied, digests) = match finish(copied) {
        Ok(x) => x,
        Err(e) => {
            w.abandon();
            let _ = fs::remove_file(&manifest_path);
            return Err(format!("{}: {e}", img_path.display()));
        }
    };
    // What was copied is the snapshot's only if it did not fail meanwhile.
    if let Some(why) = backup::snapshot_failed(&d.tracker) {
        w.abandon();
        let _ = fs::remove_file(&manifest_path);
        return Err(format!(
            "{}: {why} while point {number} was copied: the point is abandoned, the chain is as it was",
            d.path.display()
        ));
    }
    if let Some(f) = &verified {
        backup::report_check(
            &d.path,
            f,
            &format!("point {prev_point}"),
            &format!("point {number}"),
            opts.log,
        );
        m.missed = f.missed_ranges();
    }
    w.publish()
        .map_err(|e| format!("{}: {e}", img_path.display()))?;
    m.digests = Some(store_digests(&digests, &chain.join(digests_name(number)))?);
    m.sha256 = hash.map(|h| hex(&h.finalize())).unwrap_or_default();
    m.method = Some(method);
    m.bytes_read = copied.read;
    m.bytes_written = copied.written;
    m.status = Status::Complete;
    m.snapshot = None;
    m.store(&manifest_path)?;
    Ok(Outcome {
        device: m.device,
        kind: d.kind,
        method,
        size,
        copied,
        manifest: manifest_path,
        image,
        point: Some(number),
        file: img_path,
        verified,
    })
}

/// The chains of a backup directory: `DIR` itself when it holds points,
/// else its subdirectories that do, by name.
pub fn chains(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let is_chain = |p: &Path| {
        fs::read_dir(p).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| number_of(&e.file_name().to_string_lossy(), ".json").is_some())
        })
    };
    if is_chain(dir) {
        let name = dir
            .file_name()
            .map_or(String::from("."), |n| n.to_string_lossy().to_string());
        return Ok(vec![(name, dir.to_path_buf())]);
    }
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        if e.file_type().is_ok_and(|t| t.is_dir()) && is_chain(&e.path()) {
            out.push((e.file_name().to_string_lossy().to_string(), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The one chain of `dir` named `device` (a name like `vdb`, or a device
/// path), or its only chain.
pub fn chain(dir: &Path, device: Option<&str>) -> Result<PathBuf, String> {
    let all = chains(dir)?;
    let names = || {
        all.iter()
            .map(|c| c.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match device {
        Some(d) => {
            let want = d.trim_start_matches("/dev/").replace('/', "_");
            all.iter()
                .find(|c| c.0 == want)
                .map(|c| c.1.clone())
                .ok_or_else(|| {
                    format!(
                        "{}: no restore points of {d} (there are: {})",
                        dir.display(),
                        names()
                    )
                })
        }
        None => match all.len() {
            0 => Err(format!("{}: no restore points", dir.display())),
            1 => Ok(all[0].1.clone()),
            _ => Err(format!(
                "{}: points of several devices ({}): choose one with --device",
                dir.display(),
                names()
            )),
        },
    }
}

/// What a prune did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Pruned {
    /// The point that became the base, if a merge made one.
    pub merged: Option<u32>,
    /// Bytes the merged base holds.
    pub merged_bytes: u64,
    /// The points removed.
    pub removed: Vec<u32>,
    /// Leftovers of interrupted backups or prunes removed.
    pub leftovers: Vec<String>,
}

/// What a prune stopped by `crash_after` says.
pub const CRASHED: &str = "stopped as asked (a test of crash safety) after";

/// Keeps the newest `keep` complete points of `chain`: the oldest kept
/// becomes a base holding the content of the points before it (a new image
/// written beside it and renamed over it), then the older points go, the
/// newest first. Every step leaves each remaining point restorable: the
/// rename swaps one image for another of the same content (the manifest
/// says `merging` meanwhile: its image may be either), and a point is
/// removed only when no kept point reads through it. Before anything
/// changes, the kept points' images are checked against their manifests
/// and the base's whole chain, which the merge reads ([`open_point`]).
pub fn prune(
    chain: &Path,
    keep: usize,
    log: &dyn Fn(&str),
    crash_after: Option<&str>,
) -> Result<Pruned, String> {
    if keep == 0 {
        return Err("--keep must be at least 1".into());
    }
    let _lock = Lock::take(chain)?;
    // A test's stand-in for a crash: stop after a step, clean up nothing.
    let crash = |step: &str| {
        if crash_after == Some(step) {
            return Err(format!("{CRASHED} {step}"));
        }
        Ok(())
    };
    let all = scan(chain)?;
    let complete: Vec<&Point> = all
        .iter()
        .filter(|p| p.manifest.status == Status::Complete)
        .collect();
    let mut out = Pruned::default();
    if complete.len() > keep {
        let first = complete.len() - keep;
        let base = complete[first];
        // The points above the base read through kept points only, as their
        // headers say: removing the older ones leaves them whole.
        let kept: Vec<u32> = complete[first..].iter().map(|p| p.number).collect();
        for p in &complete[first + 1..] {
            let (_, below) = open_layer(chain, p.number, p.number)?;
            if let Some(k) = below.filter(|k| !kept.contains(k)) {
                return Err(format!(
                    "point {}: {}: it reads through point {k}, which this prune would remove; refusing to prune",
                    p.number,
                    p.image.display()
                ));
            }
        }
        let src = open_point(chain, base.number)?;
        if base.manifest.backing.is_some() {
            log(&format!(
                "merging points {}..{} into point {} as its new base",
                complete[0].number, base.number, base.number
            ));
            let mut m = base.manifest.clone();
            if !m.merging {
                m.merging = true;
                m.store(&base.path)?;
            }
            crash("mark")?;
            out.merged_bytes = qcow::merge(src, &base.image)
                .map_err(|e| format!("{}: merge: {e}", base.image.display()))?;
            out.merged = Some(base.number);
            crash("merge")?;
            m.backing = None;
            m.merged = true;
            m.merging = false;
            m.store(&base.path)?;
            crash("manifest")?;
        }
        for p in complete[..first].iter().rev() {
            remove_point(chain, p)?;
            out.removed.push(p.number);
            crash("remove")?;
        }
    }
    // Leftovers: incomplete points (no backup runs: the lock is ours) and
    // temporary files; the snapshots of killed backups, where the module
    // is here (a prune may run where the backups are stored, without it).
    if let Ok(ctl) = Control::open() {
        destroy_stale_snapshots(chain, &ctl, log)?;
    }
    for p in all.iter().filter(|p| p.manifest.status != Status::Complete) {
        remove_point(chain, p)?;
        out.leftovers
            .push(p.path.file_name().unwrap().to_string_lossy().to_string());
    }
    for e in fs::read_dir(chain).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".tmp") {
            fs::remove_file(e.path()).map_err(|err| format!("{name}: {err}"))?;
            out.leftovers.push(name);
        }
    }
    fs::File::open(chain)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", chain.display()))?;
    Ok(out)
}

/// Removes a point: its manifest first (it no longer lists), then its
/// digests and image.
fn remove_point(chain: &Path, p: &Point) -> Result<(), String> {
    let gone = |r: std::io::Result<()>, what: &Path| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("{}: {e}", what.display()))
        }
        _ => Ok(()),
    };
    gone(fs::remove_file(&p.path), &p.path)?;
    let dg = chain.join(digests_name(p.number));
    gone(fs::remove_file(&dg), &dg)?;
    gone(fs::remove_file(&p.image), &p.image)
}

/// The result of checking one point.
#[derive(Clone, Debug, Serialize)]
pub struct Checked {
    /// The point.
    pub number: u32,
    /// Its SHA-256 as read, when it could be read.
    pub sha256: Option<String>,
    /// What is wrong, if anything.
    pub error: Option<String>,
}

/// Checks every complete point of a chain: every image of its chain agrees
/// with its manifest ([`open_point`]), and its content has the recorded
/// digests (and SHA-256, for a point that records one).
pub fn verify(chain: &Path, progress: &dyn Progress) -> Result<Vec<Checked>, String> {
    let mut out = Vec::new();
    let stop = AtomicBool::new(false);
    for p in scan(chain)?
        .into_iter()
        .filter(|p| p.manifest.status == Status::Complete)
    {
        let mut sha256 = None;
        let r = (|| {
            let img = open_point(chain, p.number)?;
            let (sum, digests) = checksums(
                &img,
                p.manifest.size,
                !p.manifest.sha256.is_empty(),
                &stop,
                progress,
            )?;
            sha256 = sum;
            check_content(chain, &p.manifest, sha256.as_deref(), &digests)
        })();
        out.push(Checked {
            number: p.number,
            sha256,
            error: r.err(),
        });
    }
    Ok(out)
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct Restored {
    /// The point.
    pub point: u32,
    /// Where it went.
    pub target: PathBuf,
    /// Bytes of content written.
    pub size: u64,
    /// SHA-256 of the target's first `size` bytes, read back.
    pub sha256: String,
    /// Bytes zeroed by BLKZEROOUT rather than written.
    pub zeroed: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Why a target may not be written.
fn refuse(target: &Path, why: &str) -> String {
    format!(
        "{}: {why}; not restoring over it (--force to write anyway)",
        target.display()
    )
}

/// Writes the content of point `number` of `chain` to `target`, a block
/// device or a raw file (created if missing; zeroes left sparse), and
/// checks it: the target read back must have the point's digests (and
/// SHA-256, when it records one). Zero ranges of a device are zeroed by
/// BLKZEROOUT where it supports it. A block device that is mounted or
/// otherwise held open exclusively, or tracked by blksnap and in a
/// snapshot, is refused unless `force`.
pub fn restore(
    chain: &Path,
    number: u32,
    target: &Path,
    force: bool,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<Restored, String> {
    let started = Instant::now();
    let m = Manifest::load(&manifest_path(chain, number))
        .map_err(|e| format!("point {number}: {e}"))?;
    if m.status != Status::Complete {
        return Err(format!(
            "point {number} did not complete: it cannot be restored"
        ));
    }
    // Every image of the chain checked before anything is read or the
    // target is touched.
    let img = open_point(chain, number)?;
    let size = m.size;
    let is_bdev = fs::metadata(target).is_ok_and(|md| md.file_type().is_block_device());
    let dst = if is_bdev {
        if !force {
            if let Ok(t) = crate::Tracker::open(target) {
                if t.snapshot_info().is_ok() {
                    return Err(refuse(target, "it is in a blksnap snapshot"));
                }
            }
        }
        let mut o = OpenOptions::new();
        o.write(true).read(true);
        if !force {
            // An exclusive open fails when a file system is mounted on the
            // device or a partition of it, or a holder (dm, md) uses it.
            o.custom_flags(nix::libc::O_EXCL);
        }
        let f = o.open(target).map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EBUSY) {
                refuse(target, "it is mounted or in use")
            } else {
                format!("{}: {e}", target.display())
            }
        })?;
        let cap = device_size(&f).map_err(|e| format!("{}: {e}", target.display()))?;
        if cap < size {
            return Err(format!(
                "{}: {cap} bytes, smaller than the point's {size}",
                target.display()
            ));
        }
        f
    } else {
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .open(target)
            .map_err(|e| format!("{}: {e}", target.display()))?;
        f.set_len(size)
            .map_err(|e| format!("{}: {e}", target.display()))?;
        f
    };
    let mut zeroed = 0;
    read_chain(&img, size, Some(stop), progress, |off, data| {
        if data.iter().all(|&b| b == 0) {
            if !is_bdev {
                return Ok(()); // a new file reads zeroes there
            }
            // The device zeroes the range itself where it can (write
            // zeroes, unmap); else the zeroes are written.
            if zero_out(&dst, off, data.len() as u64).is_ok() {
                zeroed += data.len() as u64;
                return Ok(());
            }
        }
        dst.write_all_at(data, off)
            .map_err(|e| format!("{}: write at {off}: {e}", target.display()))
    })?;
    dst.sync_all()
        .map_err(|e| format!("{}: {e}", target.display()))?;
    drop(dst);
    // Read back what landed, past the page cache on a device: it checks
    // the chain and the writes at once.
    let (sum, digests) = readback(target, size, is_bdev)?;
    check_content(chain, &m, Some(&sum), &digests).map_err(|e| {
        format!(
            "{}: read back after the restore of point {number}: {e}: {DAMAGED} (`blksnapctl verify` checks the backup)",
            target.display()
        )
    })?;
    Ok(Restored {
        point: number,
        target: target.to_path_buf(),
        size,
        sha256: sum,
        zeroed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Zeroes `len` bytes of a block device at `off` (BLKZEROOUT).
fn zero_out(f: &File, off: u64, len: u64) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let range = [off, len];
    // SAFETY: BLKZEROOUT reads two u64 through the pointer, valid for the
    // call.
    unsafe { blkzeroout(f.as_raw_fd(), &range) }?;
    Ok(())
}

/// The size of a block device in bytes.
fn device_size(f: &File) -> nix::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut n = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is
    // valid for the call.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut n) }?;
    Ok(n)
}

/// What a restore says when the target does not read back as recorded.
pub const DAMAGED: &str = "the restored content does not match the point's record";

/// SHA-256 and digests of the first `size` bytes of `path`, with direct
/// I/O on a block device.
fn readback(path: &Path, size: u64, direct: bool) -> Result<(String, Digests), String> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(nix::libc::O_DIRECT);
    }
    let f = o
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut digests = Digests::new(size);
    digest::pipeline(
        size,
        STEP,
        digest::threads(),
        &mut |off, buf| {
            // Sizes of devices are whole sectors, so are the pieces.
            f.read_exact_at(buf, off)
                .map_err(|e| format!("{}: read at {off}: {e}", path.display()))
        },
        &mut |off, data, sums| {
            h.update(data);
            digests.set_from((off / digest::BLOCK) as usize, sums);
            Ok(())
        },
    )?;
    Ok((hex(&h.finalize()), digests))
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of seconds since the epoch.
pub fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::Quiet;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("blksnap-points-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sha(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    /// Point `n` of `chain` holding `content`: a base, or an overlay of
    /// `prev` (its number and content) with the 4 KiB blocks that differ,
    /// published with a complete manifest as a backup makes them.
    fn make_point(chain: &Path, n: u32, content: &[u8], prev: Option<(u32, &[u8])>) {
        let size = content.len() as u64;
        let img = chain.join(image_name(n));
        let backing = prev.map(|(p, _)| image_name(p));
        let below = prev.map(|(p, _)| open_point(chain, p).unwrap());
        let w = PointWriter::create(&img, size, backing.as_deref().zip(below)).unwrap();
        let mut copied = 0;
        for (i, b) in content.chunks(4096).enumerate() {
            let off = i * 4096;
            if prev.is_none_or(|(_, old)| old[off..off + b.len()] != *b) {
                w.write(b, off as u64).unwrap();
                copied += b.len() as u64;
            }
        }
        let (sum, digests) =
            checksums(w.image(), size, true, &AtomicBool::new(false), &Quiet).unwrap();
        assert_eq!(sum, Some(sha(content)), "point {n} reads back as written");
        w.publish().unwrap();
        let df = store_digests(&digests, &chain.join(digests_name(n))).unwrap();
        let m = Manifest {
            format: backup::FORMAT,
            device: "/dev/test".into(),
            dev: "1:2".into(),
            identity: None,
            size,
            block_size: 65536,
            generation: "g".into(),
            snapshot_number: n as u8,
            base_number: 1,
            kind: if prev.is_some() {
                Kind::Incremental
            } else {
                Kind::Full
            },
            status: Status::Complete,
            image: image_name(n),
            // As a backup records them: a SHA-256 for a base only.
            sha256: if prev.is_none() {
                sum.unwrap()
            } else {
                String::new()
            },
            bytes_read: copied,
            bytes_written: copied,
            ranges: Vec::new(),
            method: Some(Method::Cbt),
            digests: Some(df),
            point: Some(n),
            image_format: Some("qcow2".into()),
            backing,
            time: Some(n.into()),
            merged: false,
            merging: false,
            snapshot: None,
            missed: Vec::new(),
            lvm_origin: None,
        };
        m.store(&manifest_path(chain, n)).unwrap();
    }

    /// A chain of `count` points over 2 MiB; returns the contents.
    fn make_chain(chain: &Path, count: u32) -> Vec<Vec<u8>> {
        fs::create_dir_all(chain).unwrap();
        let size = 2 << 20;
        let mut contents: Vec<Vec<u8>> = Vec::new();
        let mut cur = vec![0u8; size];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for n in 1..=count {
            // Each point rewrites a few scattered 4 KiB blocks (some with
            // zeroes) and a run of whole clusters.
            for k in 0..24 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let blk = (x as usize >> 8) % (size / 4096);
                let fill = if k % 5 == 0 { 0 } else { (x >> 3) as u8 | 1 };
                cur[blk * 4096..(blk + 1) * 4096].fill(fill);
            }
            let run = (n as usize * 3) % 20 * 65536;
            cur[run..run + 2 * 65536].fill(n as u8);
            let prev = contents.last().map(|c| (n - 1, c.as_slice()));
            make_point(chain, n, &cur, prev);
            contents.push(cur.clone());
        }
        contents
    }

    /// Every complete point restores to a file with its content.
    fn all_restore(chain: &Path, contents: &[Vec<u8>]) {
        let points = scan(chain).unwrap();
        assert!(!points.is_empty());
        for p in points
            .iter()
            .filter(|p| p.manifest.status == Status::Complete)
        {
            let want = &contents[p.number as usize - 1];
            let target = chain.join("restored.raw");
            let r = restore(
                chain,
                p.number,
                &target,
                false,
                &AtomicBool::new(false),
                &Quiet,
            )
            .unwrap_or_else(|e| panic!("point {}: {e}", p.number));
            assert_eq!(r.sha256, sha(want), "point {}", p.number);
            assert!(fs::read(&target).unwrap() == *want, "point {}", p.number);
            fs::remove_file(&target).unwrap();
        }
    }

    /// A prune stopped after each of its steps, as by a crash, leaves every
    /// point it lists restorable, and so does the next prune that finishes.
    #[test]
    fn interrupted_prunes_leave_points_restorable() {
        for step in ["mark", "merge", "manifest", "remove"] {
            let d = scratch(step);
            let contents = make_chain(&d, 5);
            all_restore(&d, &contents);
            let e = prune(&d, 2, &|_| {}, Some(step)).unwrap_err();
            assert!(e.starts_with(CRASHED), "{e}");
            all_restore(&d, &contents);
            // A leftover of an interrupted backup, too.
            fs::write(d.join("point-0006.qcow2.tmp"), b"partial").unwrap();
            let r = prune(&d, 2, &|_| {}, None).unwrap();
            let left: Vec<u32> = scan(&d).unwrap().iter().map(|p| p.number).collect();
            assert_eq!(left, [4, 5], "after the prune stopped at {step}: {r:?}");
            assert!(r.leftovers.contains(&"point-0006.qcow2.tmp".to_string()));
            all_restore(&d, &contents);
            let p4 = &scan(&d).unwrap()[0];
            assert!(p4.manifest.merged && !p4.manifest.merging && p4.manifest.backing.is_none());
            assert!(verify(&d, &Quiet)
                .unwrap()
                .iter()
                .all(|c| c.error.is_none()));
            // The numbers go on after the kept points.
            assert_eq!(next_number(&d).unwrap(), 6);
            fs::remove_dir_all(&d).unwrap();
        }
    }

    /// A prune keeps the newest points; keeping as many as there are
    /// changes nothing; --keep 0 is refused.
    #[test]
    fn prune_keeps_the_newest() {
        let d = scratch("keep");
        let contents = make_chain(&d, 4);
        assert!(prune(&d, 0, &|_| {}, None).is_err());
        let r = prune(&d, 4, &|_| {}, None).unwrap();
        assert!(r.removed.is_empty() && r.merged.is_none());
        let r = prune(&d, 1, &|_| {}, None).unwrap();
        assert_eq!(r.removed, [3, 2, 1]);
        assert_eq!(r.merged, Some(4));
        assert_eq!(
            fs::read_dir(&d).unwrap().count(),
            4,
            "json, qcow2, digests, .lock"
        );
        all_restore(&d, &contents);
        fs::remove_dir_all(&d).unwrap();
    }

    /// verify finds a point whose content is not what its manifest says,
    /// and one whose backing file is gone; restore refuses both.
    #[test]
    fn verify_and_restore_find_damage() {
        let d = scratch("damage");
        let contents = make_chain(&d, 3);
        assert!(verify(&d, &Quiet)
            .unwrap()
            .iter()
            .all(|c| c.error.is_none()));
        // Point 1 (a base) records a SHA-256: a wrong one is found.
        let mp = manifest_path(&d, 1);
        let mut m = Manifest::load(&mp).unwrap();
        assert!(!m.sha256.is_empty());
        m.sha256 = sha(b"something else");
        m.store(&mp).unwrap();
        // Point 2 (an overlay) records digests only: point 1's are found
        // wrong for its content, at a block where they differ.
        let mp2 = manifest_path(&d, 2);
        let mut m2 = Manifest::load(&mp2).unwrap();
        assert!(m2.sha256.is_empty());
        let theirs = m.digests.clone().unwrap();
        m2.digests = Some(theirs);
        m2.store(&mp2).unwrap();
        let v = verify(&d, &Quiet).unwrap();
        assert!(v[2].error.is_none(), "{v:?}");
        assert!(
            v[0].error.as_deref().unwrap().contains("does not match"),
            "{v:?}"
        );
        assert!(v[1].error.as_deref().unwrap().contains(") differ"), "{v:?}");
        let t = d.join("t.raw");
        for n in [1, 2] {
            let e = restore(&d, n, &t, false, &AtomicBool::new(false), &Quiet).unwrap_err();
            assert!(e.contains(DAMAGED), "{e}");
        }
        // Restore still wrote the content: only the record is wrong.
        assert!(fs::read(&t).unwrap() == contents[1]);
        // Point 1 gone: 2 and 3 read through it.
        fs::remove_file(d.join(image_name(1))).unwrap();
        let v = verify(&d, &Quiet).unwrap();
        assert!(v.iter().all(|c| c.error.is_some()), "{v:?}");
        assert!(restore(&d, 3, &t, false, &AtomicBool::new(false), &Quiet).is_err());
        assert!(restore(&d, 9, &t, false, &AtomicBool::new(false), &Quiet).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    /// chains() finds DIR itself or its device subdirectories; chain()
    /// picks one by name.
    #[test]
    fn chains_by_name() {
        let d = scratch("chains");
        make_chain(&d.join("vdb"), 1);
        make_chain(&d.join("mapper_x"), 1);
        let names: Vec<String> = chains(&d).unwrap().into_iter().map(|c| c.0).collect();
        assert_eq!(names, ["mapper_x", "vdb"]);
        assert!(chain(&d, None).unwrap_err().contains("--device"));
        assert_eq!(chain(&d, Some("/dev/vdb")).unwrap(), d.join("vdb"));
        assert_eq!(
            chain(&d, Some("/dev/mapper/x")).unwrap(),
            d.join("mapper_x")
        );
        assert!(chain(&d, Some("vdc")).is_err());
        assert_eq!(chain(&d.join("vdb"), None).unwrap(), d.join("vdb"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(number_of("point-0012.json", ".json"), Some(12));
        assert_eq!(number_of("point-12345.qcow2", ".qcow2"), Some(12345));
        assert_eq!(number_of("point-001.json", ".json"), None);
        assert_eq!(number_of("point-00a1.json", ".json"), None);
        assert_eq!(number_of("point-0001.qcow2.tmp", ".qcow2"), None);
        assert_eq!(image_name(7), "point-0007.qcow2");
        assert_eq!(
            chain_dir(Path::new("/b"), Path::new("/dev/mapper/x")),
            PathBuf::from("/b/mapper_x")
        );
    }

    /// `qemu-img ARGS` in `dir`, which must succeed: the hostile tests
    /// tamper with points the way a user or an attacker would.
    /// `qemu-img rebase -u -b BACKING -F FORMAT IMAGE` in `dir`: the
    /// header changed, nothing else.
    fn rebase(dir: &Path, backing: &str, format: &str, image: &str) {
        qemu_img(dir, &["rebase", "-u", "-b", backing, "-F", format, image]);
    }

    fn qemu_img(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("qemu-img")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("qemu-img (Debian package qemu-utils) is needed by this test");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every file of a directory but the lock: its content, where a
    /// symbolic link points, or the type of anything else (not opened).
    fn files(d: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut out = std::collections::BTreeMap::new();
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            if name == ".lock" {
                continue;
            }
            let md = fs::symlink_metadata(e.path()).unwrap();
            let v = if md.file_type().is_symlink() {
                fs::read_link(e.path())
                    .unwrap()
                    .to_string_lossy()
                    .as_bytes()
                    .to_vec()
            } else if md.is_file() {
                fs::read(e.path()).unwrap()
            } else {
                format!("{:?}", md.file_type()).into_bytes()
            };
            out.insert(name, v);
        }
        out
    }

    /// A tampered chain: `root/chain` holds 3 points (each checked to
    /// restore first), `root/other` a copy of point 1 and its content as a
    /// raw file, for a tamper to point at.
    struct Tampered {
        root: PathBuf,
        chain: PathBuf,
        other: PathBuf,
    }

    impl Tampered {
        fn new(name: &str) -> Self {
            let root = scratch(&format!("tamper-{name}"));
            let chain = root.join("chain");
            let other = root.join("other");
            let contents = make_chain(&chain, 3);
            all_restore(&chain, &contents);
            fs::create_dir_all(&other).unwrap();
            fs::copy(chain.join(image_name(1)), other.join(image_name(1))).unwrap();
            fs::write(other.join("content-1.raw"), &contents[0]).unwrap();
            Self { root, chain, other }
        }

        /// Restore, verify and prune all refuse the chain: restore of
        /// point 3 and verify of each point of `bad` name `file` and `why`,
        /// restore writes nothing, prune changes nothing, the points not in
        /// `bad` verify.
        fn refused(&self, bad: &[u32], file: &str, why: &str) {
            let before = files(&self.chain);
            let t = self.root.join("target.raw");
            let e = restore(&self.chain, 3, &t, false, &AtomicBool::new(false), &Quiet)
                .expect_err("restore of a tampered chain");
            assert!(
                e.contains("point 3") && e.contains(file) && e.contains(why),
                "restore: {e}"
            );
            assert!(!t.exists(), "restore wrote its target before refusing");
            // What `blksnapctl mount` hands to qemu-nbd: refused alike.
            let e = point_files(&self.chain, 3).expect_err("the files of a tampered chain");
            assert!(
                e.contains("point 3") && e.contains(file) && e.contains(why),
                "point_files: {e}"
            );
            let v = verify(&self.chain, &Quiet).unwrap();
            for c in &v {
                match (&c.error, bad.contains(&c.number)) {
                    (Some(e), true) => assert!(
                        e.contains(file) && e.contains(why),
                        "verify of point {}: {e}",
                        c.number
                    ),
                    (None, false) => {}
                    (e, _) => panic!("verify of point {}: {e:?}", c.number),
                }
            }
            let e = prune(&self.chain, 1, &|_| {}, None).expect_err("prune of a tampered chain");
            assert!(e.contains(file) && e.contains(why), "prune: {e}");
            assert!(files(&self.chain) == before, "prune changed the chain");
        }
    }

    impl Drop for Tampered {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    /// Sets `m`'s backing in point `n`'s manifest.
    fn set_manifest_backing(chain: &Path, n: u32, backing: Option<&str>) {
        let mp = manifest_path(chain, n);
        let mut m = Manifest::load(&mp).unwrap();
        m.backing = backing.map(str::to_string);
        m.store(&mp).unwrap();
    }

    /// A backing file that is a device (`qemu-img rebase -u -b /dev/null`).
    #[test]
    fn tampered_backing_a_device() {
        let t = Tampered::new("dev");
        rebase(&t.chain, "/dev/null", "raw", "point-0002.qcow2");
        t.refused(&[2, 3], "point-0002.qcow2", "backing file \"/dev/null\"");
    }

    /// A backing file outside the chain by an absolute path, with the same
    /// content as the right one: what is read must be the chain itself.
    #[test]
    fn tampered_backing_an_absolute_path() {
        let t = Tampered::new("abs");
        let other = t.other.join(image_name(1));
        let other = other.to_str().unwrap();
        rebase(&t.chain, other, "qcow2", "point-0002.qcow2");
        t.refused(
            &[2, 3],
            "point-0002.qcow2",
            &format!("backing file \"{other}\""),
        );
    }

    /// A backing file outside the chain by a relative path.
    #[test]
    fn tampered_backing_a_relative_path_out() {
        let t = Tampered::new("rel");
        rebase(
            &t.chain,
            "../other/point-0001.qcow2",
            "qcow2",
            "point-0002.qcow2",
        );
        t.refused(
            &[2, 3],
            "point-0002.qcow2",
            "backing file \"../other/point-0001.qcow2\"",
        );
    }

    /// The manifest agrees with a header whose backing leaves the chain's
    /// directory: a backing is the bare name of an older point.
    #[test]
    fn tampered_backing_a_relative_path_in_the_manifest_too() {
        let t = Tampered::new("relm");
        rebase(
            &t.chain,
            "../other/point-0001.qcow2",
            "qcow2",
            "point-0002.qcow2",
        );
        set_manifest_backing(&t.chain, 2, Some("../other/point-0001.qcow2"));
        t.refused(
            &[2, 3],
            "point-0002.qcow2",
            "not the image of an older point",
        );
    }

    /// The right backing file, read as raw.
    #[test]
    fn tampered_backing_format_raw() {
        let t = Tampered::new("fmt");
        rebase(&t.chain, "point-0001.qcow2", "raw", "point-0002.qcow2");
        t.refused(&[2, 3], "point-0002.qcow2", "format \"raw\"");
    }

    /// An overlay whose backing file was dropped.
    #[test]
    fn tampered_backing_dropped() {
        let t = Tampered::new("drop");
        qemu_img(&t.chain, &["rebase", "-u", "-b", "", "point-0003.qcow2"]);
        t.refused(&[3], "point-0003.qcow2", "names no backing file");
    }

    /// A base given a backing file: the chain of headers loops (1 -> 3 ->
    /// 2 -> 1).
    #[test]
    fn tampered_base_given_a_backing_loop() {
        let t = Tampered::new("loop");
        rebase(&t.chain, "point-0003.qcow2", "qcow2", "point-0001.qcow2");
        t.refused(
            &[1, 2, 3],
            "point-0001.qcow2",
            "backing file \"point-0003.qcow2\"",
        );
    }

    /// A loop that the manifests agree with: point 1 backed by point 3.
    #[test]
    fn tampered_loop_in_the_manifests_too() {
        let t = Tampered::new("loopm");
        rebase(&t.chain, "point-0003.qcow2", "qcow2", "point-0001.qcow2");
        set_manifest_backing(&t.chain, 1, Some("point-0003.qcow2"));
        t.refused(&[1, 2, 3], "point-0001.qcow2", "loop");
    }

    /// A point's image is a symbolic link to an image of the same content
    /// elsewhere.
    #[test]
    fn tampered_image_a_symlink() {
        let t = Tampered::new("link");
        fs::remove_file(t.chain.join(image_name(1))).unwrap();
        std::os::unix::fs::symlink(t.other.join(image_name(1)), t.chain.join(image_name(1)))
            .unwrap();
        t.refused(&[1, 2, 3], "point-0001.qcow2", "not a regular file");
    }

    /// A point's image is a FIFO: refused without waiting for a writer.
    #[test]
    fn tampered_image_a_fifo() {
        let t = Tampered::new("fifo");
        fs::remove_file(t.chain.join(image_name(2))).unwrap();
        let ok = std::process::Command::new("mkfifo")
            .arg(t.chain.join(image_name(2)))
            .status()
            .unwrap();
        assert!(ok.success());
        t.refused(&[2, 3], "point-0002.qcow2", "not a regular file");
    }

    /// The base replaced by an image of the same content whose data is in
    /// an external raw data file outside the chain (`data_file`), then
    /// pointed at a device (`qemu-img amend`).
    #[test]
    fn tampered_external_data_file() {
        let t = Tampered::new("data");
        let raw = t.other.join("content-1.raw");
        let base = t.chain.join(image_name(1));
        fs::remove_file(&base).unwrap();
        let opt = format!(
            "data_file={},data_file_raw=on",
            t.other.join("data.raw").display()
        );
        qemu_img(
            &t.chain,
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                &opt,
                raw.to_str().unwrap(),
                "point-0001.qcow2",
            ],
        );
        t.refused(&[1, 2, 3], "point-0001.qcow2", "external data file");
        qemu_img(
            &t.chain,
            &["amend", "-o", "data_file=/dev/null", "point-0001.qcow2"],
        );
        t.refused(&[1, 2, 3], "point-0001.qcow2", "external data file");
    }

    /// A crafted header: the incompatible feature bit "external data file"
    /// set in a point's image, no file named.
    #[test]
    fn tampered_external_data_file_bit() {
        let t = Tampered::new("databit");
        let img = t.chain.join(image_name(2));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        // Version 3 header: incompatible_features, big-endian u64 at 72;
        // bit 2 is the external data file.
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 79).unwrap();
        f.write_all_at(&[b[0] | 4], 79).unwrap();
        drop(f);
        t.refused(&[2, 3], "point-0002.qcow2", "external data file");
    }

    /// A prune whose merged base is tampered with after the merge, while
    /// its manifest still says `merging`, refuses the chain too: `merging`
    /// admits the new base (no backing file), nothing else.
    #[test]
    fn tampered_while_merging() {
        let t = Tampered::new("merging");
        let e = prune(&t.chain, 1, &|_| {}, Some("merge")).unwrap_err();
        assert!(e.starts_with(CRASHED), "{e}");
        let v = verify(&t.chain, &Quiet).unwrap();
        assert!(v.iter().all(|c| c.error.is_none()), "{v:?}");
        rebase(&t.chain, "/dev/null", "raw", "point-0003.qcow2");
        t.refused(&[3], "point-0003.qcow2", "backing file \"/dev/null\"");
    }

    /// A kept point whose header and manifest both name an older point
    /// than the one below it, which the prune would remove: the prune
    /// refuses, and changes nothing.
    #[test]
    fn prune_keeps_what_kept_points_read_through() {
        let d = scratch("kept");
        make_chain(&d, 5);
        rebase(&d, "point-0002.qcow2", "qcow2", "point-0005.qcow2");
        set_manifest_backing(&d, 5, Some("point-0002.qcow2"));
        let before = files(&d);
        let e = prune(&d, 2, &|_| {}, None).expect_err("prune");
        assert!(
            e.contains("point 5") && e.contains("reads through point 2"),
            "{e}"
        );
        assert!(files(&d) == before, "prune changed the chain");
        fs::remove_dir_all(&d).unwrap();
    }

    /// What a header may name, against the manifest of point 5.
    #[test]
    fn header_refs_against_the_manifest() {
        let d = scratch("refs");
        make_chain(&d, 1);
        let mut m = Manifest::load(&manifest_path(&d, 1)).unwrap();
        fs::remove_dir_all(&d).unwrap();
        let refs = |backing: Option<&str>, format: Option<&str>| qcow::Refs {
            backing: backing.map(str::to_string),
            backing_format: format.map(str::to_string),
            ..Default::default()
        };
        m.backing = None;
        assert_eq!(check_refs(5, &m, &refs(None, None)), Ok(None));
        let e = check_refs(5, &m, &refs(Some("point-0004.qcow2"), Some("qcow2"))).unwrap_err();
        assert!(e.contains("but its manifest names none"), "{e}");
        m.backing = Some("point-0004.qcow2".into());
        assert_eq!(
            check_refs(5, &m, &refs(Some("point-0004.qcow2"), Some("qcow2"))),
            Ok(Some(4))
        );
        assert_eq!(
            check_refs(5, &m, &refs(Some("point-0004.qcow2"), None)),
            Ok(Some(4))
        );
        for (b, f, why) in [
            (Some("point-0004.qcow2"), Some("raw"), "format \"raw\""),
            (Some("point-0004.qcow2"), Some("file"), "format \"file\""),
            (
                Some("./point-0004.qcow2"),
                Some("qcow2"),
                "names the backing file",
            ),
            (
                Some("point-0003.qcow2"),
                Some("qcow2"),
                "names the backing file",
            ),
            (None, None, "names no backing file"),
        ] {
            let e = check_refs(5, &m, &refs(b, f)).unwrap_err();
            assert!(e.contains(why), "{b:?} {f:?}: {e}");
        }
        // While a prune merges the point: its new base too, nothing else.
        m.merging = true;
        assert_eq!(check_refs(5, &m, &refs(None, None)), Ok(None));
        assert!(check_refs(5, &m, &refs(Some("/dev/sda"), Some("raw"))).is_err());
        m.merging = false;
        // The manifest's own backing: an older point's image, by its name.
        for (b, why) in [
            ("point-0005.qcow2", "loop"),
            ("point-0009.qcow2", "loop"),
            ("point-00004.qcow2", "not the image of an older point"),
            ("point-4.qcow2", "not the image of an older point"),
            ("sub/point-0004.qcow2", "not the image of an older point"),
            ("/b/point-0004.qcow2", "not the image of an older point"),
            ("..", "not the image of an older point"),
        ] {
            m.backing = Some(b.into());
            let e = check_refs(5, &m, &refs(Some(b), Some("qcow2"))).unwrap_err();
            assert!(e.contains(why), "{b}: {e}");
        }
        // No external data file, named or not.
        m.backing = None;
        for (needs, name) in [
            (true, None),
            (true, Some("d.raw")),
            (false, Some("/dev/sda")),
        ] {
            let r = qcow::Refs {
                needs_data_file: needs,
                data_file: name.map(str::to_string),
                ..Default::default()
            };
            let e = check_refs(5, &m, &r).unwrap_err();
            assert!(e.contains("external data file"), "{e}");
        }
    }

    /// What `blksnapctl mount` gives qemu: the checked files by descriptor
    /// under a throwaway overlay. qemu reads each point's content through
    /// them, even once the names are replaced, and writes only the overlay.
    #[test]
    fn point_files_read_through_qemu() {
        let d = scratch("qfiles");
        let contents = make_chain(&d, 3);
        let before = files(&d);
        for n in [3u32, 2, 1] {
            let (m, layers) = point_files(&d, n).unwrap();
            assert_eq!(m.point, Some(n));
            let order: Vec<u32> = layers.iter().map(|l| l.0).collect();
            assert_eq!(order, (1..=n).rev().collect::<Vec<_>>());
            if n == 3 {
                // Point 2's name now holds point 1's image: not what was
                // checked, and not what is read.
                fs::rename(d.join(image_name(2)), d.join("saved.qcow2")).unwrap();
                fs::copy(d.join(image_name(1)), d.join(image_name(2))).unwrap();
            }
            let ov = d.join("overlay.qcow2");
            qemu_img(
                &d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "overlay.qcow2",
                    &m.size.to_string(),
                ],
            );
            let ovf = OpenOptions::new().read(true).write(true).open(&ov).unwrap();
            let fds: Vec<i32> = layers
                .iter()
                .map(|l| std::os::fd::AsRawFd::as_raw_fd(&l.1))
                .collect();
            let spec = crate::mount::spec(std::os::fd::AsRawFd::as_raw_fd(&ovf), &fds);
            let out = d.join("out.raw");
            let mut cmd = std::process::Command::new("qemu-img");
            cmd.args(["convert", "-O", "raw", &spec, out.to_str().unwrap()]);
            let mut all = fds.clone();
            all.push(std::os::fd::AsRawFd::as_raw_fd(&ovf));
            crate::mount::inherit(&mut cmd, all);
            let o = cmd.output().expect("qemu-img");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert!(
                fs::read(&out).unwrap() == contents[n as usize - 1],
                "point {n} through qemu"
            );
            if n == 3 {
                fs::remove_file(d.join(image_name(2))).unwrap();
                fs::rename(d.join("saved.qcow2"), d.join(image_name(2))).unwrap();
            }
            fs::remove_file(&out).unwrap();
            fs::remove_file(&ov).unwrap();
        }
        assert!(files(&d) == before, "the chain changed");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_729_445), "2026-11-26 21:44:05");
    }
}
