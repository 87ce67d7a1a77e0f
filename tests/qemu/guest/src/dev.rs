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

/// Mounts a tmpfs of `size` (as mount's `size=`) on `dir`, made if needed;
/// returns `dir`.
pub fn mount_tmpfs(dir: &Path, size: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let opt = format!("size={size}");
    run(
        "mount",
        &["-t", "tmpfs", "-o", &opt, "none", dir.to_str().unwrap()],
    )?;
    Ok(dir.to_path_buf())
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

/// Unloads the module, failing if that does not end within `secs`
/// seconds (the module's exit may wait forever for something that leaked;
/// the stuck thread is left behind). While the module is in use (EAGAIN:
/// references that are released asynchronously, like the last reference
/// of a deleted image disk), it tries again every 100 ms. Returns how long
/// the module stayed in use and its largest reference count meanwhile.
pub fn unload_module_within(secs: u64) -> Result<(std::time::Duration, u32), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let start = std::time::Instant::now();
    let limit = std::time::Duration::from_secs(secs);
    std::thread::spawn(move || {
        let mut refs = 0;
        loop {
            match unload_module() {
                Err(nix::errno::Errno::EAGAIN) if start.elapsed() < limit => {
                    let r = std::fs::read_to_string("/sys/module/blksnap/refcnt")
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(0);
                    refs = refs.max(r);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                r => {
                    let _ = tx.send(r.map(|()| (start.elapsed(), refs)));
                    return;
                }
            }
        }
    });
    match rx.recv_timeout(limit + std::time::Duration::from_secs(5)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!(
            "rmmod blksnap: {e} (tried for {} s; refcnt {})",
            start.elapsed().as_secs(),
            std::fs::read_to_string("/sys/module/blksnap/refcnt")
                .unwrap_or_default()
                .trim()
        )),
        Err(_) => Err(format!(
            "rmmod blksnap did not return within {secs} s; {}",
            blocked_threads()
        )),
    }
}

/// Unloads the module (see [`unload_module_within`]) and loads it again;
/// prints how long it stayed in use.
pub fn reload_module(what: &str) -> Result<(), String> {
    let (waited, refs) = unload_module_within(30)?;
    load_module("")?;
    if refs == 0 {
        println!("    rmmod and insmod after {what}: ok");
    } else {
        println!(
            "    rmmod and insmod after {what}: ok, after the module stayed in use for {} ms (refcnt up to {refs})",
            waited.as_millis()
        );
    }
    Ok(())
}

/// The kernel stacks of this process's threads that sleep uninterruptibly
/// (state D), for the report of a hang.
pub fn blocked_threads() -> String {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            if state != Some("D") {
                continue;
            }
            let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
            let frames: Vec<&str> = stack
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .take(12)
                .collect();
            out.push(format!(
                "thread {} in D state: {}",
                t.file_name().to_string_lossy(),
                frames.join(" < ")
            ));
        }
    }
    if out.is_empty() {
        "no thread of the test in D state".into()
    } else {
        out.join("; ")
    }
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

/// Sets a module parameter of blksnap (`/sys/module/blksnap/parameters/`);
/// the old value comes back on drop.
pub struct ModuleParam {
    path: PathBuf,
    old: String,
}

impl ModuleParam {
    /// Sets parameter `name` to `value`.
    pub fn set(name: &str, value: &str) -> Result<Self, String> {
        let path = Path::new("/sys/module/blksnap/parameters").join(name);
        let old = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .trim()
            .to_string();
        std::fs::write(&path, value).map_err(|e| format!("{} = {value}: {e}", path.display()))?;
        Ok(Self { path, old })
    }
}

impl Drop for ModuleParam {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}

/// Lowers the console log level (`/proc/sys/kernel/printk`) while it lives,
/// so that a test that makes the kernel log a lot is not slowed down by the
/// serial console; the records still reach /dev/kmsg, where the harness
/// checks them. The old level comes back on drop.
pub struct QuietConsole(String);

impl QuietConsole {
    /// Shows only messages more severe than `level` on the console.
    pub fn new(level: u32) -> Result<Self, String> {
        let p = "/proc/sys/kernel/printk";
        let old = std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"))?;
        let first = old.split_whitespace().next().unwrap_or("7").to_string();
        std::fs::write(p, level.to_string()).map_err(|e| format!("{p}: {e}"))?;
        Ok(Self(first))
    }
}

impl Drop for QuietConsole {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/printk", &self.0);
    }
}

/// True in `make soak` (guest.sh sets `BLKSNAP_SOAK=1`): the fuzzer, the
/// stress and the fault tests run longer.
pub fn soak() -> bool {
    std::env::var("BLKSNAP_SOAK").is_ok_and(|v| v == "1")
}

/// A number from the environment (decimal or 0x hex), or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    };
    parsed.unwrap_or(default)
}

/// The seed of a randomized test: `name` from the environment (a replay),
/// else a fresh one in `make soak` (each soak run explores new sequences),
/// else `fixed`: `make test` runs the same sequence every time.
pub fn seed(name: &str, fixed: u64) -> u64 {
    env_u64(name, if soak() { fresh_seed() } else { fixed })
}

/// A seed from the clock and the process id, for runs that are not replays.
pub fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x | 1
}

/// The kernel stacks of the tasks in uninterruptible sleep (state D), of
/// the kernel workers and of fio, one indented block each, and the I/O in
/// flight on each disk: what a test that found itself stuck prints before
/// it fails.
pub fn blocked_tasks() -> String {
    let mut out = String::new();
    if let Ok(dir) = std::fs::read_dir("/sys/block") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let inflight =
                std::fs::read_to_string(entry.path().join("inflight")).unwrap_or_default();
            let v: Vec<&str> = inflight.split_whitespace().collect();
            if v.iter().any(|n| *n != "0") {
                out.push_str(&format!(
                    "    {name}: in flight (reads, writes) {}\n",
                    v.join(" ")
                ));
            }
        }
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) state ...": the comm may hold spaces, not ')'.
        let Some((comm, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
        else {
            continue;
        };
        let state = rest.chars().next().unwrap_or('?');
        if state != 'D' && !(comm.starts_with("kworker") && state != 'I') && comm != "fio" {
            continue;
        }
        let stack = std::fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
        if stack.trim().is_empty() {
            continue;
        }
        out.push_str(&format!("    task {pid} ({comm}) state {state}:\n"));
        for line in stack.lines().take(16) {
            out.push_str(&format!("    |   {line}\n"));
        }
    }
    out
}
