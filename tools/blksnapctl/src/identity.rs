// SPDX-License-Identifier: GPL-2.0

//! Which device a block device node is: the identity saved with a CBT state
//! and recorded in a backup manifest, so that a map or a chain is never
//! used on another disk that happens to sit in the same slot or have the
//! same name.
//!
//! An identity is read from sysfs: the whole disk's serial number or world
//! wide name (or a device-mapper UUID, or a loop device's backing file), for
//! a partition its number and first sector, and the size in sectors. Its
//! text form is stable and compared byte for byte:
//!
//! ```text
//! serial=QM00005,part=1@2048,sectors=65536
//! wwid=eui.0025388b91b2a0c1,sectors=1953525168
//! sectors=131072                              (nothing unique: see `unique`)
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// The most bytes of an identity's text that are kept (the kernel stores
/// 127 and a NUL).
pub const MAX_LEN: usize = 127;

/// A block device's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// What names the whole disk uniquely, as `kind=value`: `serial=`,
    /// `wwid=`, `dm=` (device-mapper UUID) or `loop=` (backing file).
    pub disk: Option<String>,
    /// For a partition: its number and first sector on the disk.
    pub partition: Option<(u32, u64)>,
    /// Size in 512-byte sectors.
    pub sectors: u64,
}

/// The sysfs attributes of a whole disk that name it, most specific first,
/// with the key each is recorded under.
const DISK_ATTRS: [(&str, &str); 7] = [
    ("wwid", "wwid"),
    ("device/wwid", "wwid"),
    ("serial", "serial"),
    ("device/serial", "serial"),
    ("device/vpd_pg80", "serial"),
    ("dm/uuid", "dm"),
    ("loop/backing_file", "loop"),
];

fn read_attr(dir: &Path, attr: &str) -> Option<String> {
    let s = std::fs::read(dir.join(attr)).ok()?;
    // Binary VPD pages and odd serials: printable ASCII only, trimmed.
    let s: String = String::from_utf8_lossy(&s)
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .collect();
    let s = s.trim().replace([' ', ','], "_");
    (!s.is_empty()).then_some(s)
}

impl Identity {
    /// The identity of `device` (a device node or a link to one), read from
    /// the sysfs tree at `sys` (normally `/sys`).
    pub fn read_from(sys: &Path, device: &Path) -> Result<Self, String> {
        let node =
            std::fs::canonicalize(device).map_err(|e| format!("{}: {e}", device.display()))?;
        let name = node
            .file_name()
            .ok_or_else(|| format!("{}: not a device node", device.display()))?
            .to_string_lossy()
            .to_string();
        let class = sys.join("class/block").join(&name);
        // /sys/class/block/NAME links into the device tree; a partition's
        // directory is inside its disk's.
        let dir = std::fs::canonicalize(&class)
            .map_err(|e| format!("{}: {e} (not a block device?)", class.display()))?;
        let sectors = read_attr(&dir, "size")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{}: no size", dir.display()))?;
        let partition = match read_attr(&dir, "partition") {
            Some(n) => {
                let n = n
                    .parse::<u32>()
                    .map_err(|_| format!("{}: bad partition number", dir.display()))?;
                let start = read_attr(&dir, "start")
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| format!("{}: no start", dir.display()))?;
                Some((n, start))
            }
            None => None,
        };
        let disk_dir: PathBuf = if partition.is_some() {
            dir.parent()
                .ok_or_else(|| format!("{}: no disk", dir.display()))?
                .to_path_buf()
        } else {
            dir
        };
        let disk = DISK_ATTRS
            .iter()
            .find_map(|(attr, key)| read_attr(&disk_dir, attr).map(|v| format!("{key}={v}")));
        Ok(Self {
            disk,
            partition,
            sectors,
        })
    }

    /// The identity of `device`, from `/sys`.
    pub fn read(device: &Path) -> Result<Self, String> {
        Self::read_from(Path::new("/sys"), device)
    }

    /// Whether something names the disk uniquely (a serial, WWID, ...):
    /// without it, two disks of the same size cannot be told apart.
    pub fn unique(&self) -> bool {
        self.disk.is_some()
    }

    /// The text form, cut to [`MAX_LEN`] bytes (at a character boundary).
    pub fn text(&self) -> String {
        let mut s = self.to_string();
        if s.len() > MAX_LEN {
            let mut n = MAX_LEN;
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            s.truncate(n);
        }
        s
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.disk {
            write!(f, "{d},")?;
        }
        if let Some((n, start)) = self.partition {
            write!(f, "part={n}@{start},")?;
        }
        write!(f, "sectors={}", self.sectors)
    }
}

/// Whether an identity recorded earlier (a manifest's `identity`) names
/// the device whose identity is `now`. Recorded identities of the first
/// manifest format hold the disk's serial or WWID alone: they match a whole
/// disk with that serial; a partition cannot be proven by them.
pub fn matches(recorded: &str, now: &Identity) -> bool {
    if recorded.contains("sectors=") {
        return recorded == now.text();
    }
    now.partition.is_none()
        && now
            .disk
            .as_deref()
            .and_then(|d| d.split_once('='))
            .is_some_and(|(_, v)| v == recorded.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake /sys and /dev: disk `vdx` (serial given) with partition
    /// `vdx1`, and the nodes /dev/vdx, /dev/vdx1 as plain files.
    fn fake(root: &Path, serial: Option<&str>) -> (PathBuf, PathBuf, PathBuf) {
        let sys = root.join("sys");
        let disk = sys.join("devices/pci0000:00/virtio3/block/vdx");
        let part = disk.join("vdx1");
        fs::create_dir_all(&part).unwrap();
        fs::create_dir_all(sys.join("class/block")).unwrap();
        fs::write(disk.join("size"), "131072\n").unwrap();
        if let Some(s) = serial {
            fs::write(disk.join("serial"), format!("{s}\n")).unwrap();
        }
        fs::write(part.join("size"), "65536\n").unwrap();
        fs::write(part.join("partition"), "1\n").unwrap();
        fs::write(part.join("start"), "2048\n").unwrap();
        std::os::unix::fs::symlink(&disk, sys.join("class/block/vdx")).unwrap();
        std::os::unix::fs::symlink(&part, sys.join("class/block/vdx1")).unwrap();
        let dev = root.join("dev");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("vdx"), "").unwrap();
        fs::write(dev.join("vdx1"), "").unwrap();
        (sys, dev.join("vdx"), dev.join("vdx1"))
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("blksnap-id-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn disk_and_partition() {
        let root = tmp("dp");
        let (sys, disk, part) = fake(&root, Some("blksnap c,1"));
        let d = Identity::read_from(&sys, &disk).unwrap();
        assert_eq!(d.text(), "serial=blksnap_c_1,sectors=131072");
        assert!(d.unique());
        let p = Identity::read_from(&sys, &part).unwrap();
        assert_eq!(p.text(), "serial=blksnap_c_1,part=1@2048,sectors=65536");
        assert!(matches(&p.text(), &p));
        assert!(!matches(&d.text(), &p));
        // The first manifest format: the serial alone, whole disks only.
        assert!(matches("blksnap c,1".replace([' ', ','], "_").as_str(), &d));
        assert!(!matches("blksnap_c_1", &p));
        assert!(!matches("other", &d));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn without_serial_only_the_size() {
        let root = tmp("ns");
        let (sys, disk, _) = fake(&root, None);
        let d = Identity::read_from(&sys, &disk).unwrap();
        assert_eq!(d.text(), "sectors=131072");
        assert!(!d.unique());
        assert!(!matches("anything", &d));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn swapped_disks_differ_and_long_ids_are_cut() {
        let a = Identity {
            disk: Some("serial=blksnap-p".into()),
            partition: None,
            sectors: 131072,
        };
        let b = Identity {
            disk: Some("serial=blksnap-x".into()),
            ..a.clone()
        };
        assert!(!matches(&a.text(), &b));
        let long = Identity {
            disk: Some(format!("wwid={}", "\u{e9}".repeat(100))),
            ..a
        };
        assert!(long.text().len() <= MAX_LEN);
        assert!(long.to_string().len() > MAX_LEN);
    }
}
