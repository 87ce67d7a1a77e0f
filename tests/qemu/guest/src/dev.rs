// SPDX-License-Identifier: GPL-2.0

//! Guest helpers: finding the test disks, direct I/O, block ioctls, loop
//! devices and module loading.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The guest's scratch directory: a tmpfs that guest.sh mounts, named by
/// `BLKSNAP_SCRATCH` (the repository itself may be under /tmp).
pub fn scratch() -> PathBuf {
    std::env::var_os("BLKSNAP_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/blksnap"))
}

/// Sector size in bytes.
pub const SECTOR: u64 = 512;

/// Returns `/dev/vdX` of the virtio disk whose serial is `serial`.
pub fn disk_by_serial(serial: &str) -> Result<PathBuf, String> {
    for entry in std::fs::read_dir("/sys/block").map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let s = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if s.trim() == serial {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(format!("no disk with serial {serial}"))
}

/// Returns the path of partition `n` of `disk`.
pub fn partition(disk: &Path, n: u32) -> PathBuf {
    let s = disk.to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

/// Sysfs directory of a block device (disk or partition).
pub fn sysfs_dir(dev: &Path) -> PathBuf {
    let name = dev.file_name().unwrap().to_string_lossy().to_string();
    let direct = Path::new("/sys/class/block").join(&name);
    direct
}

/// Reads a sysfs attribute of a block device, trimmed.
pub fn sysfs_attr(dev: &Path, attr: &str) -> Result<String, String> {
    let p = sysfs_dir(dev).join(attr);
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// Major and minor numbers of a block device, from sysfs.
pub fn major_minor(dev: &Path) -> Result<(u32, u32), String> {
    let s = sysfs_attr(dev, "dev")?;
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("dev of {}: {s}", dev.display()))?;
    Ok((
        a.parse().map_err(|_| s.clone())?,
        b.parse().map_err(|_| s.clone())?,
    ))
}

/// Size of a block device in sectors, from sysfs.
pub fn size_sectors(dev: &Path) -> Result<u64, String> {
    sysfs_attr(dev, "size")?
        .parse()
        .map_err(|e| format!("size of {}: {e}", dev.display()))
}

/// A page-aligned buffer for direct I/O.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    /// Allocates `len` bytes filled with `fill`.
    pub fn new(len: usize, fill: u8) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `ptr` is valid for `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(ptr, fill, layout.size()) };
        Self { ptr, len }
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: valid for `len` bytes, see `new`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: valid for `len` bytes, see `new`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(4096), 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Opens a block device for direct I/O.
pub fn open_direct(dev: &Path, write: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("open {}: {e}", dev.display()))
}

/// Writes `sectors` sectors of `fill` at `sector` with O_DIRECT.
pub fn write_direct(dev: &Path, sector: u64, sectors: u64, fill: u8) -> Result<(), String> {
    let f = open_direct(dev, true)?;
    let buf = AlignedBuf::new((sectors * SECTOR) as usize, fill);
    f.write_all_at(buf.as_slice(), sector * SECTOR)
        .map_err(|e| {
            format!(
                "write {} sectors at {sector} of {}: {e}",
                sectors,
                dev.display()
            )
        })
}

/// Reads `sectors` sectors at `sector` with O_DIRECT.
pub fn read_direct(dev: &Path, sector: u64, sectors: u64) -> Result<Vec<u8>, String> {
    let f = open_direct(dev, false)?;
    let mut buf = AlignedBuf::new((sectors * SECTOR) as usize, 0);
    f.read_exact_at(buf.as_mut_slice(), sector * SECTOR)
        .map_err(|e| {
            format!(
                "read {} sectors at {sector} of {}: {e}",
                sectors,
                dev.display()
            )
        })?;
    Ok(buf.as_slice().to_vec())
}

nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Issues a byte-range ioctl (`BLKDISCARD`, `BLKZEROOUT`) on `dev`.
fn range_ioctl(
    dev: &Path,
    name: &str,
    ioctl: unsafe fn(i32, *const [u64; 2]) -> nix::Result<i32>,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    let f = OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| e.to_string())?;
    // SAFETY: the argument is a valid [u64; 2].
    unsafe { ioctl(f.as_raw_fd(), &[offset, len]) }
        .map(|_| ())
        .map_err(|e| format!("{name} {offset}+{len} on {}: {e}", dev.display()))
}

/// Discards a byte range (`BLKDISCARD`).
pub fn discard(dev: &Path, offset: u64, len: u64) -> Result<(), String> {
    range_ioctl(dev, "BLKDISCARD", blkdiscard, offset, len)
}

/// Zeroes a byte range (`BLKZEROOUT`).
pub fn zeroout(dev: &Path, offset: u64, len: u64) -> Result<(), String> {
    range_ioctl(dev, "BLKZEROOUT", blkzeroout, offset, len)
}

/// Runs a command, failing with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {} ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Waits until udev has handled the events queued so far (it opens devices
/// to probe them). Without a running udev this returns at once.
pub fn udev_settle() {
    let _ = run("udevadm", &["settle", "--timeout=10"]);
}

/// Path of the module file, from the environment set by guest.sh.
pub fn module_path() -> Result<PathBuf, String> {
    std::env::var_os("BLKSNAP_KO")
        .map(PathBuf::from)
        .ok_or_else(|| "BLKSNAP_KO is not set".into())
}

/// Loads the module with parameters.
pub fn load_module(params: &str) -> Result<(), String> {
    let ko = module_path()?;
    let f = File::open(&ko).map_err(|e| format!("{}: {e}", ko.display()))?;
    let params = std::ffi::CString::new(params).unwrap();
    nix::kmod::finit_module(&f, &params, nix::kmod::ModuleInitFlags::empty())
        .map_err(|e| format!("load {}: {e}", ko.display()))
}

/// Unloads the module; returns the errno on failure.
pub fn unload_module() -> Result<(), nix::errno::Errno> {
    nix::kmod::delete_module(c"blksnap", nix::kmod::DeleteModuleFlags::O_NONBLOCK)
}

/// Returns true if the module is loaded.
pub fn module_loaded() -> bool {
    Path::new("/sys/module/blksnap").exists()
}

/// A loop device backed by a file in /tmp, removed on drop.
pub struct LoopDev {
    /// Path of the loop device.
    pub path: PathBuf,
    backing: PathBuf,
    removed: bool,
}

nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);

impl LoopDev {
    /// Creates a loop device over a new sparse file of `bytes` bytes.
    pub fn new(name: &str, bytes: u64) -> Result<Self, String> {
        let backing = scratch().join(format!("{name}.img"));
        let f = File::create(&backing).map_err(|e| e.to_string())?;
        f.set_len(bytes).map_err(|e| e.to_string())?;
        drop(f);
        let out = run(
            "losetup",
            &["--find", "--show", "--partscan", backing.to_str().unwrap()],
        )?;
        Ok(Self {
            path: PathBuf::from(out.trim()),
            backing,
            removed: false,
        })
    }

    /// The backing file.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Detaches the backing file and deletes the loop disk (`del_gendisk`).
    pub fn remove(&mut self) -> Result<(), String> {
        let f = File::open(&self.path).map_err(|e| e.to_string())?;
        // SAFETY: LOOP_CLR_FD takes no argument. ENXIO: cleared already (a
        // clear deferred while the device was open took effect since).
        match unsafe { loop_clr_fd(f.as_raw_fd()) } {
            Ok(_) | Err(nix::errno::Errno::ENXIO) => {}
            Err(e) => return Err(format!("LOOP_CLR_FD: {e}")),
        }
        drop(f);
        let n: i64 = self
            .path
            .to_string_lossy()
            .trim_start_matches("/dev/loop")
            .parse()
            .map_err(|e| format!("loop number: {e}"))?;
        let ctl = File::open("/dev/loop-control").map_err(|e| e.to_string())?;
        // LOOP_CTL_REMOVE may race with the release of the last opener.
        for _ in 0..50 {
            // SAFETY: LOOP_CTL_REMOVE takes the device number as argument.
            let r = unsafe { nix::libc::ioctl(ctl.as_raw_fd(), 0x4C81, n) };
            if r >= 0 {
                self.removed = true;
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(format!(
            "LOOP_CTL_REMOVE {}: {}",
            n,
            std::io::Error::last_os_error()
        ))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if !self.removed {
            let _ = run("losetup", &["-d", self.path.to_str().unwrap()]);
        }
        let _ = std::fs::remove_file(&self.backing);
    }
}
