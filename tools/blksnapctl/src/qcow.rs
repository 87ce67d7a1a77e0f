// SPDX-License-Identifier: GPL-2.0

//! Restore points as qcow2 images, through the `imago` crate: a full backup
//! is a base image, each incremental an overlay whose backing file is the
//! previous point and which holds only the blocks it copied.
//!
//! A point is written under a temporary name and published by a flush, an
//! fsync, a rename and an fsync of the directory; a published image is
//! never written again. imago 0.2 writes a new L2 table's L1 entry before
//! the refcount of its cluster and does not sync between metadata writes,
//! so an image interrupted while being written may be inconsistent: it must
//! never be one that a restore point depends on. Prune builds the merged
//! image the same way (see [`merge`]).
//!
//! Nothing a qcow2 header names is opened here: an image is opened alone
//! ([`open_alone`]: a regular file, not through a symbolic link, without
//! its backing file or external data file), its references are read
//! ([`refs`]) for the caller to check against what it knows
//! ([`crate::points`] checks them against the manifests), and the backing
//! image the caller opened the same way is attached explicitly
//! ([`with_backing`]). A header can thus not make us read a device or a
//! file outside the chain.

use imago::file::File;
use imago::format::drivers::FormatDriverInstance;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, Storage, StorageCreateOptions,
    StorageOpenOptions,
};
use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A qcow2 image with its backing chain, open for reading or writing.
pub type Image = FormatAccess<File>;

/// A qcow2 image opened alone: its backing file and external data file,
/// if its header names any, are not open.
pub type Layer = Qcow2<File>;

/// What a qcow2 header refers to outside its image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refs {
    /// The backing file name, as the header has it.
    pub backing: Option<String>,
    /// The backing file's format, if the header gives one.
    pub backing_format: Option<String>,
    /// The header says the data is in an external data file (incompatible
    /// feature bit 2).
    pub needs_data_file: bool,
    /// The external data file's name, if the header gives one.
    pub data_file: Option<String>,
}

/// Opens the qcow2 image at `path` for reading, alone: `path` must be a
/// regular file, not a symbolic link (nor a device or a FIFO, which are
/// not even opened); nothing its header names is opened.
pub fn open_alone(path: &Path) -> io::Result<Layer> {
    open_alone_keeping(path).map(|(l, _)| l)
}

/// [`open_alone`], also returning a second descriptor of the very file
/// opened (a `dup`), for a caller that hands the checked file itself to
/// another program (`blksnapctl mount` gives it to `qemu-nbd`).
pub fn open_alone_keeping(path: &Path) -> io::Result<(Layer, fs::File)> {
    let not_regular = |t: fs::FileType| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            if t.is_symlink() {
                "not a regular file (a symbolic link)"
            } else {
                "not a regular file"
            },
        )
    };
    let t = fs::symlink_metadata(path)?.file_type();
    if !t.is_file() {
        return Err(not_regular(t));
    }
    // Should it have been replaced since: no link followed, no wait for a
    // FIFO's writer, and checked again once open.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        return Err(not_regular(t));
    }
    // Blocking reads again (O_RDONLY is 0).
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(io::Error::from)?;
    let kept = f.try_clone()?;
    let file = File::from_open_file(f, StorageOpenOptions::new().filename(path))?;
    Ok((Qcow2::<File>::open_image(file, false)?, kept))
}

/// What the header of `l` refers to outside it.
pub fn refs(l: &Layer) -> Refs {
    Refs {
        backing: l.implicit_backing_file().cloned(),
        backing_format: l.implicit_backing_format().cloned(),
        needs_data_file: l.requires_external_data_file(),
        data_file: l.implicit_external_data_file().cloned(),
    }
}

/// The virtual size of an image opened alone.
pub fn layer_size(l: &Layer) -> u64 {
    l.size()
}

/// `l` reading through `backing` (or through nothing: unallocated
/// clusters read as zeroes), its data in its own file.
pub fn with_backing(mut l: Layer, backing: Option<Image>) -> Image {
    l.set_data_file(None);
    l.set_backing(backing);
    FormatAccess::new(l)
}

/// The qcow2 cluster size of a base: 64 KiB, the CBT block size of devices
/// up to 128 GiB and the digest block size.
pub const CLUSTER: usize = 64 * 1024;

/// The qcow2 cluster size of an overlay: 4 KiB, the block of the fine map,
/// so that an incremental's point takes what it copied. With 64 KiB
/// clusters, each 4 KiB block written to a cluster the overlay does not
/// hold yet would allocate the whole cluster and copy the rest of it from
/// the backing file: scattered 4 KiB writes took 3.8 times the bytes
/// copied (1 GiB image, 16 MiB of 4 KiB writes + 64 MiB sequential: 304
/// MiB at 64 KiB clusters, 124 at 16 KiB, 95 at 8 KiB, 81 at 4 KiB). The
/// price is metadata: an L2 table of 4 KiB maps 2 MiB, the L1 table of a
/// 1 TiB overlay is 4 MiB; reading a 1 GiB chain through such an overlay
/// took 0.28 s instead of 0.09 s (page cache), far from the disk's speed.
pub const OVERLAY_CLUSTER: usize = 4096;

/// The cluster size of a base or an overlay.
fn cluster_size(overlay: bool) -> usize {
    if overlay {
        OVERLAY_CLUSTER
    } else {
        CLUSTER
    }
}

/// A restore point being written, under `<path>.tmp` until [`Self::publish`].
pub struct PointWriter {
    img: Image,
    tmp: PathBuf,
    path: PathBuf,
    overlay: bool,
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

impl PointWriter {
    /// Starts a point of `size` bytes at `path`: a base image, or with
    /// `backing` an overlay of it: the backing file's name in the same
    /// directory, written to the header, and that image, opened and checked
    /// by the caller, which the new one reads through (nothing the header
    /// names is opened).
    pub fn create(path: &Path, size: u64, backing: Option<(&str, Image)>) -> io::Result<Self> {
        let overlay = backing.is_some();
        let (name, below) = backing.unzip();
        if let Some(name) = name {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("backing file {name:?} is not a name in the same directory"),
                ));
            }
        }
        let tmp = tmp_name(path);
        let file = File::create_open(StorageCreateOptions::new().filename(&tmp).overwrite(true))?;
        let mut b = Qcow2::<File>::create_builder(file)
            .size(size)
            .cluster_size(cluster_size(overlay));
        if let Some(name) = name {
            b = b.backing(name.to_string(), "qcow2".to_string());
        }
        // The backing image is given, the data file is none: the gate
        // refuses anything else.
        let q = b.create_open(DenyImplicitOpenGate::default(), |image| {
            Ok(Qcow2::<File>::builder(image).backing(below))
        })?;
        Ok(Self {
            img: FormatAccess::new(q),
            tmp,
            path: path.to_path_buf(),
            overlay,
        })
    }

    /// The image being written, for reads through its chain.
    pub fn image(&self) -> &Image {
        &self.img
    }

    /// Writes `buf` at byte `offset`; returns the bytes of data stored.
    /// Zero data allocates nothing where it can: whole clusters of zeroes
    /// are left unallocated in a base (every byte of a base is written at
    /// most once, and unallocated reads as zeros) and become zero clusters
    /// in an overlay (hiding what the backing file holds there); zeroes in
    /// part of a cluster are written as data in an overlay.
    pub fn write(&self, buf: &[u8], offset: u64) -> io::Result<u64> {
        // (start in buf, end in buf, zero) of runs split at clusters.
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        let mut at = 0usize;
        while at < buf.len() {
            let abs = offset + at as u64;
            let cluster = cluster_size(self.overlay);
            let to_boundary = cluster - (abs % cluster as u64) as usize;
            let end = (at + to_boundary).min(buf.len());
            let whole = end - at == cluster;
            let zero = buf[at..end].iter().all(|&b| b == 0);
            // Zeroes in part of a cluster: data in an overlay, nothing in
            // a base.
            let kind = zero && (whole || !self.overlay);
            match runs.last_mut() {
                Some(last) if last.2 == kind => last.1 = end,
                _ => runs.push((at, end, kind)),
            }
            at = end;
        }
        let mut stored = 0;
        for (s, e, zero) in runs {
            let off = offset + s as u64;
            if !zero {
                self.img.write(&buf[s..e], off)?;
                stored += (e - s) as u64;
            } else if self.overlay {
                self.img.write_zeroes(off, (e - s) as u64)?;
            }
        }
        Ok(stored)
    }

    /// Makes the point durable and visible under its name.
    pub fn publish(self) -> io::Result<PathBuf> {
        self.img.flush()?;
        self.img.sync()?;
        drop(self.img);
        fs::rename(&self.tmp, &self.path)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::File::open(dir)?.sync_all()?;
        Ok(self.path)
    }

    /// Gives up: the temporary file goes.
    pub fn abandon(self) {
        drop(self.img);
        let _ = fs::remove_file(&self.tmp);
    }
}

impl crate::backup::Sink for PointWriter {
    fn put(&self, data: &[u8], off: u64) -> Result<u64, String> {
        self.write(data, off)
            .map_err(|e| format!("{}: write at {off}: {e}", self.tmp.display()))
    }
}

/// Bytes per copy step of [`merge`].
const STEP: usize = 1 << 20;

/// Prune's merge: the content of `src`, the image at `top` opened through
/// its chain (checked by the caller), written as a new base image that
/// replaces `top` under its name, so that the points backed by `top` still
/// find it. Nothing published is modified before the rename; an
/// interrupted merge leaves a `.tmp` file and every point as it was. The
/// caller deletes the images below `top` afterwards.
pub fn merge(src: Image, top: &Path) -> io::Result<u64> {
    let size = src.size();
    let w = PointWriter::create(top, size, None)?;
    let mut buf = vec![0u8; STEP];
    let mut off = 0u64;
    let mut written = 0u64;
    while off < size {
        let n = (STEP as u64).min(size - off) as usize;
        src.read(&mut buf[..n], off)?;
        // Zero clusters stay unallocated in the new base.
        written += w.write(&buf[..n], off)?;
        off += n as u64;
    }
    drop(src);
    w.publish()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("blksnap-qcow-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Opens `path` and the chain its headers name (file names in the
    /// same directory: these tests write them).
    fn open(path: &Path) -> io::Result<Image> {
        let l = open_alone(path)?;
        let r = refs(&l);
        assert!(!r.needs_data_file && r.data_file.is_none(), "{r:?}");
        let below = match &r.backing {
            Some(name) => {
                assert!(!name.contains('/'), "{name}");
                Some(open(&path.with_file_name(name))?)
            }
            None => None,
        };
        Ok(with_backing(l, below))
    }

    /// `name` in `d` as a backing: its name and its image.
    fn backing(d: &Path, name: &'static str) -> Option<(&'static str, Image)> {
        Some((name, open(&d.join(name)).unwrap()))
    }

    fn read_all(img: &Image) -> Vec<u8> {
        let mut out = vec![0u8; img.size() as usize];
        img.read(&mut out, 0).unwrap();
        out
    }

    /// A base, two overlays (data, zeros over data, sub-cluster writes),
    /// each read back through its chain; a merge of the middle point keeps
    /// the top one's content and frees nothing it needs.
    #[test]
    fn chain_write_read_merge() {
        let d = scratch("chain");
        let size = 4 << 20;
        let mut want = vec![0u8; size];
        let base = PointWriter::create(&d.join("p0.qcow2"), size as u64, None).unwrap();
        for (i, b) in want.iter_mut().enumerate().take(1 << 20) {
            *b = (i % 251) as u8 + 1;
        }
        base.write(&want[..1 << 20], 0).unwrap();
        base.write(&[0u8; CLUSTER], 2 << 20).unwrap();
        base.publish().unwrap();
        let want0 = want.clone();

        let p1 =
            PointWriter::create(&d.join("p1.qcow2"), size as u64, backing(&d, "p0.qcow2")).unwrap();
        // Zeros over data, a partial cluster, new data past the base's.
        p1.write(&[0u8; CLUSTER], 0).unwrap();
        want[..CLUSTER].fill(0);
        p1.write(&[7u8; 4096], 200_000).unwrap();
        want[200_000..204_096].fill(7);
        p1.write(&[9u8; CLUSTER], 3 << 20).unwrap();
        want[3 << 20..(3 << 20) + CLUSTER].fill(9);
        assert!(read_all(p1.image()) == want, "p1 before publish");
        p1.publish().unwrap();
        let want1 = want.clone();

        let p2 =
            PointWriter::create(&d.join("p2.qcow2"), size as u64, backing(&d, "p1.qcow2")).unwrap();
        p2.write(&[5u8; 8192], 1 << 20).unwrap();
        want[1 << 20..(1 << 20) + 8192].fill(5);
        p2.publish().unwrap();

        assert!(read_all(&open(&d.join("p0.qcow2")).unwrap()) == want0);
        assert!(read_all(&open(&d.join("p1.qcow2")).unwrap()) == want1);
        assert!(read_all(&open(&d.join("p2.qcow2")).unwrap()) == want);

        // Prune to two points: p1 becomes a base, p0 goes.
        merge(open(&d.join("p1.qcow2")).unwrap(), &d.join("p1.qcow2")).unwrap();
        fs::remove_file(d.join("p0.qcow2")).unwrap();
        assert!(read_all(&open(&d.join("p1.qcow2")).unwrap()) == want1);
        assert!(read_all(&open(&d.join("p2.qcow2")).unwrap()) == want);
        assert!(!d.join("p1.qcow2.tmp").exists());

        // qemu-img, when it is here, agrees.
        if let Ok(out) = std::process::Command::new("qemu-img")
            .args(["check", d.join("p2.qcow2").to_str().unwrap()])
            .output()
        {
            assert!(out.status.success(), "qemu-img check: {out:?}");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    /// An overlay of scattered 4 KiB writes takes about what was written,
    /// not a cluster of the base's size per write.
    #[test]
    fn overlay_takes_what_it_copies() {
        let d = scratch("small");
        let size = 8 << 20;
        let base = PointWriter::create(&d.join("p0.qcow2"), size, None).unwrap();
        base.write(&vec![3u8; size as usize], 0).unwrap();
        base.publish().unwrap();
        let p1 = PointWriter::create(&d.join("p1.qcow2"), size, backing(&d, "p0.qcow2")).unwrap();
        let mut copied = 0;
        for i in 0..64u64 {
            copied += p1.write(&[i as u8 + 7; 4096], i * 128 * 1024).unwrap();
        }
        p1.publish().unwrap();
        let md = fs::metadata(d.join("p1.qcow2")).unwrap();
        let on_disk = std::os::unix::fs::MetadataExt::blocks(&md) * 512;
        assert_eq!(copied, 64 * 4096);
        assert!(
            on_disk <= copied + 64 * 1024,
            "{on_disk} bytes on disk for {copied} written"
        );
        let img = open(&d.join("p1.qcow2")).unwrap();
        let got = read_all(&img);
        for i in 0..64usize {
            let at = i * 128 * 1024;
            assert!(got[at..at + 4096].iter().all(|&b| b == i as u8 + 7));
            assert!(got[at + 4096..at + 8192].iter().all(|&b| b == 3));
        }
        fs::remove_dir_all(&d).unwrap();
    }

    /// An abandoned point leaves nothing; a backing name with a slash is
    /// refused.
    #[test]
    fn abandon_and_bad_backing() {
        let d = scratch("abandon");
        let w = PointWriter::create(&d.join("p0.qcow2"), 1 << 20, None).unwrap();
        w.write(&[1u8; 4096], 0).unwrap();
        w.abandon();
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        for bad in ["../p0.qcow2", "/dev/null", "", ".."] {
            let w = PointWriter::create(&d.join("p1.qcow2"), 1 << 20, None).unwrap();
            w.publish().unwrap();
            let below = open(&d.join("p1.qcow2")).unwrap();
            assert!(PointWriter::create(&d.join("p2.qcow2"), 1 << 20, Some((bad, below))).is_err());
            fs::remove_file(d.join("p1.qcow2")).unwrap();
        }
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        fs::remove_dir_all(&d).unwrap();
    }
}
