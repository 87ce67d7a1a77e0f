// SPDX-License-Identifier: GPL-2.0

//! Instant access to a restore point: `blksnapctl mount --point N DIR
//! MOUNTPOINT` exports the point's chain as a block device through
//! `qemu-nbd`, finds its partitions and LVM volumes and mounts their file
//! systems read-only under MOUNTPOINT; `blksnapctl umount MOUNTPOINT` undoes
//! it all, in reverse order. A mount that fails midway undoes what it did.
//!
//! - The chain is opened as restore opens it ([`points::point_files`]):
//!   every image checked against its manifest, and the checked files
//!   themselves handed to `qemu-nbd` (`/proc/self/fd/N`, the backing chain
//!   given explicitly in a `json:` spec): nothing a qcow2 header names is
//!   opened, by qemu either.
//! - The device is a throwaway qcow2 overlay over the point, in the state
//!   directory (deleted at `umount`): the point files are only read. Writes
//!   land in the overlay: a file system's journal replayed at its mount (an
//!   image of a file system that was not frozen at the snapshot, such as
//!   one on an LVM volume of a snapshotted disk, is as after a crash: read
//!   without its journal it would lack what was committed there), and the
//!   new identity `vgimportclone` gives a volume group.
//! - A volume group of the point is renamed in the overlay (new name and
//!   UUIDs: `vgimportclone`, LVM restricted to the point's devices with
//!   `--devices`) before it is activated: the running system may have the
//!   same volume group (the point is a backup of its disk), whose name and
//!   UUIDs must not clash. LVM does not archive the clone's metadata in
//!   /etc/lvm.
//! - What was done is recorded in a state file (`/run/blksnap/mounts/
//!   KEY.json`, KEY from the mount point's path), written after each step,
//!   so that `umount` (or the undo of a failed mount) finds it all, even
//!   after a crash of `blksnapctl` midway.

use crate::backup::hex;
use crate::points;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the state files and overlays go by default.
pub const STATE_DIR: &str = "/run/blksnap/mounts";

/// The current state file format.
const FORMAT: u32 = 1;

/// One file system mounted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mounted {
    /// Its name under the mount point: `p1`, `disk`, or `VG-LV` (the
    /// volume group's name in the point).
    pub name: String,
    /// The device mounted.
    pub source: String,
    /// Where.
    pub target: PathBuf,
    /// The file system type.
    pub fstype: String,
    /// The mount options.
    pub options: String,
}

/// One volume group of the point, renamed and activated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vg {
    /// Its name in the point.
    pub name: String,
    /// Its name while mounted.
    pub clone: String,
    /// Its physical volumes (partitions of the nbd device).
    pub pvs: Vec<String>,
}

/// What a mount did, in order; `umount` undoes it in reverse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format of this file.
    pub format: u32,
    /// The mount point (canonical).
    pub mountpoint: PathBuf,
    /// The chain.
    pub chain: PathBuf,
    /// The point.
    pub point: u32,
    /// The overlay file, once made.
    pub overlay: Option<PathBuf>,
    /// The nbd device, once `qemu-nbd` was started on it.
    pub nbd: Option<String>,
    /// The `qemu-nbd` process, once known.
    pub pid: Option<u32>,
    /// The volume groups renamed (and activated).
    pub vgs: Vec<Vg>,
    /// The directories made under the mount point.
    pub dirs: Vec<PathBuf>,
    /// The file systems mounted.
    pub mounts: Vec<Mounted>,
    /// What was found but not mounted, and why.
    pub skipped: Vec<String>,
}

impl State {
    fn save(&self, path: &Path) -> Result<(), String> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let mut f = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn load(path: &Path) -> Result<Self, String> {
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let s: State = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a mount state file: {e}", path.display()))?;
        if s.format != FORMAT {
            return Err(format!(
                "{}: state format {} is not {FORMAT}",
                path.display(),
                s.format
            ));
        }
        Ok(s)
    }
}

/// The name of a mount point's state files: 16 hex digits of the SHA-256
/// of its canonical path.
pub fn key(mountpoint: &Path) -> String {
    let h = Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    hex(&h)[..16].to_string()
}

/// What to mount.
pub struct Request<'a> {
    /// The chain ([`points::chain`]).
    pub chain: &'a Path,
    /// The point.
    pub point: u32,
    /// An empty directory.
    pub mountpoint: &'a Path,
    /// Where the state file goes (and the overlay, unless `overlay_dir`).
    pub state_dir: &'a Path,
    /// Where the overlay goes.
    pub overlay_dir: Option<&'a Path>,
    /// For tests: fail after this step (`overlay`, `nbd`, `lvm`, `mount`),
    /// as a failure there would.
    pub fail_after: Option<&'a str>,
    /// Messages.
    pub log: &'a dyn Fn(&str),
}

/// What a mount failed at says when stopped by `fail_after`.
pub const FAILED_AS_ASKED: &str = "failed as asked (a test of the undo) after";

/// Runs a program; its stdout, or a one-line error naming it and the last
/// line it wrote to stderr.
fn run(prog: &str, args: &[&str]) -> Result<String, String> {
    run_env(prog, args, &[])
}

/// [`run`] with more environment.
fn run_env(prog: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} {}: {}: {}",
            args.join(" "),
            out.status,
            last_line(&String::from_utf8_lossy(&out.stderr))
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The last non-empty line of a program's error output.
fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no message)")
        .to_string()
}

/// Unescapes a field of /proc/self/mountinfo (`\040` for a space...).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// The mount points in a mountinfo text.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|f| PathBuf::from(unescape(f)))
        .collect()
}

/// Whether a file system is mounted on `dir`.
pub fn is_mount_point(dir: &Path) -> Result<bool, String> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    Ok(mount_points(&text).iter().any(|m| m == dir))
}

/// The mount point, canonical, if it may be used: an empty directory with
/// nothing mounted on it.
fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf, String> {
    let mp = fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let md = fs::metadata(&mp).map_err(|e| format!("{}: {e}", mp.display()))?;
    if !md.is_dir() {
        return Err(format!("{}: not a directory", mp.display()));
    }
    if is_mount_point(&mp)? {
        return Err(format!(
            "{}: a file system is mounted on it; give an empty directory",
            mp.display()
        ));
    }
    if fs::read_dir(&mp)
        .map_err(|e| format!("{}: {e}", mp.display()))?
        .next()
        .is_some()
    {
        return Err(format!(
            "{}: not empty; give an empty directory",
            mp.display()
        ));
    }
    Ok(mp)
}

/// The lock of the state directory, held while a mount or an umount
/// changes anything (they take an nbd device, name volume groups).
fn lock(state_dir: &Path) -> Result<Flock<File>, String> {
    fs::create_dir_all(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let path = state_dir.join(".lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| format!("{}: {e}", path.display()))
}

/// The `json:` spec of the overlay (file descriptor `overlay`) over the
/// chain's images (`layers`, the point first): every image named by its
/// descriptor, every backing given, the base's as none.
pub fn spec(overlay: i32, layers: &[i32]) -> String {
    let file =
        |fd: i32| serde_json::json!({"driver": "file", "filename": format!("/proc/self/fd/{fd}")});
    let mut below = serde_json::Value::Null;
    for &fd in layers.iter().rev() {
        below = serde_json::json!({"driver": "qcow2", "file": file(fd), "backing": below});
    }
    let top = serde_json::json!({"driver": "qcow2", "file": file(overlay), "backing": below});
    format!("json:{top}")
}

/// Makes `cmd` inherit the descriptors `fds` (under the same numbers),
/// for a [`spec`] that names them.
pub fn inherit(cmd: &mut Command, fds: Vec<i32>) {
    // SAFETY: only fcntl, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The nbd devices, by number.
fn nbd_devices() -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("nbd")?.parse().ok()?;
            Some((n, name))
        })
        .collect();
    out.sort();
    out
}

/// The pid a connected nbd device names (the task that serves it), or
/// None when it is not connected.
fn nbd_pid(name: &str) -> Option<u32> {
    fs::read_to_string(format!("/sys/block/{name}/pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn nbd_size(name: &str) -> u64 {
    fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The free nbd devices (not connected, size 0), by number.
fn free_nbds(log: &dyn Fn(&str)) -> Result<Vec<String>, String> {
    if nbd_devices().is_empty() {
        // A module, not loaded yet.
        let _ = run("modprobe", &["nbd"]);
        log("loaded the nbd module");
    }
    let all = nbd_devices();
    if all.is_empty() {
        return Err("no nbd devices (/sys/block/nbd*): the kernel has no nbd driver (CONFIG_BLK_DEV_NBD; `modprobe nbd`)".into());
    }
    let free: Vec<String> = all
        .into_iter()
        .filter(|(_, n)| nbd_pid(n).is_none() && nbd_size(n) == 0)
        .map(|(_, n)| n)
        .collect();
    if free.is_empty() {
        return Err("every nbd device is in use (more: modprobe nbd nbds_max=N)".into());
    }
    Ok(free)
}

/// Whether process `pid` (or thread) has `file` open.
fn has_open(pid: u32, file: &Path) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| fs::read_link(e.path()).is_ok_and(|l| l == file))
}

fn alive(pid: u32) -> bool {
    // A zombie is gone too: it holds no file.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// Polls `done` every 100 ms for up to `secs` seconds.
fn wait_for(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether udev runs: it makes device nodes and answers LVM; without it,
/// LVM makes its nodes itself.
fn udev_running() -> bool {
    Path::new("/run/udev/control").exists()
}

/// The `--config` of every LVM command here: no metadata backup or
/// archive of a throwaway clone in /etc/lvm; without udev, LVM neither
/// waits for it nor asks it for devices.
fn lvm_config() -> String {
    let mut c = String::from("backup { backup = 0 archive = 0 }");
    if !udev_running() {
        c.push_str(
            " activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 }",
        );
    }
    c
}

/// Runs `lvm CMD` restricted to the devices `pvs` (none: all of the
/// system's).
fn lvm(cmd: &str, pvs: &[String], args: &[&str]) -> Result<String, String> {
    let config = lvm_config();
    let mut a: Vec<&str> = vec![cmd, "--config", &config];
    for p in pvs {
        a.push("--devices");
        a.push(p);
    }
    a.extend_from_slice(args);
    // What an error shows is LVM's own last line, not its complaints
    // about descriptors it inherits.
    run_env("lvm", &a, &[("LVM_SUPPRESS_FD_WARNINGS", "1")])
}

/// `KEY=value` lines of `blkid -o export`.
fn parse_export(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What `blkid -p` finds on a device: its `KEY=value` pairs (none when it
/// finds nothing).
fn probe(dev: &str) -> Result<Vec<(String, String)>, String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export", dev])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("blkid: {e}"))?;
    match out.status.code() {
        Some(0) => Ok(parse_export(&String::from_utf8_lossy(&out.stdout))),
        // 2: nothing found.
        Some(2) => Ok(Vec::new()),
        _ => Err(format!(
            "blkid -p {dev}: {}: {}",
            out.status,
            last_line(&String::from_utf8_lossy(&out.stderr))
        )),
    }
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The mount options of a file system type this mounts, or None. XFS
/// refuses a second file system of the same UUID (the running system's,
/// when the point is a backup of its disk) unless `nouuid`. Never ext4's
/// `noload` nor XFS's `norecovery`: a file system not frozen at the take
/// has committed transactions in its journal only, which a mount without
/// the replay would not show; the replay writes to the overlay.
pub fn mount_options(fstype: &str) -> Option<&'static str> {
    match fstype {
        "ext2" | "ext3" | "ext4" | "vfat" | "exfat" | "f2fs" | "btrfs" => Some("ro"),
        "xfs" => Some("ro,nouuid"),
        _ => None,
    }
}

/// The partitions of the nbd device `name` (`/dev/nbdN`), as
/// (name under the mount point, device): its partitions `pM`, or the whole
/// device `disk` when it has no partition table.
fn partitions(name: &str) -> Result<Vec<(String, String)>, String> {
    let dev = format!("/dev/{name}");
    // An open makes the kernel scan the partition table of a device that
    // was just connected.
    drop(File::open(&dev).map_err(|e| format!("{dev}: {e}"))?);
    let found = probe(&dev)?;
    if get(&found, "PTTYPE").is_none() {
        return Ok(vec![("disk".into(), dev)]);
    }
    let numbers: Vec<u32> = run("partx", &["-g", "-o", "NR", &dev])?
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let max_part = fs::read_to_string("/sys/module/nbd/parameters/max_part")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if !numbers.is_empty() && max_part == Some(0) {
        return Err(format!(
            "{dev} has a partition table but the nbd driver does not scan partitions (its max_part is 0): load it with max_part=16 (modprobe -r nbd; modprobe nbd max_part=16), or boot with nbd.max_part=16"
        ));
    }
    let node = |n: u32| format!("/dev/{name}p{n}");
    let present = |n: u32| {
        Path::new(&format!("/sys/block/{name}/{name}p{n}")).exists()
            && fs::metadata(node(n)).is_ok_and(|m| m.file_type().is_block_device())
    };
    if !wait_for(10, || numbers.iter().all(|&n| present(n))) {
        // Scanned before the size was known, or never: ask again.
        let f = File::open(&dev).map_err(|e| format!("{dev}: {e}"))?;
        // SAFETY: BLKRRPART takes no argument.
        let _ = unsafe { blkrrpart(f.as_raw_fd()) };
        drop(f);
        if !wait_for(10, || numbers.iter().all(|&n| present(n))) {
            let missing: Vec<String> = numbers
                .iter()
                .filter(|&&n| !present(n))
                .map(|&n| node(n))
                .collect();
            return Err(format!(
                "{dev}: partitions {} of its partition table did not appear",
                missing.join(", ")
            ));
        }
    }
    Ok(numbers
        .into_iter()
        .map(|n| (format!("p{n}"), node(n)))
        .collect())
}

nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Whether anything holds a partition of `name` (dm, md).
fn holders(dev: &str) -> Vec<String> {
    let base = Path::new(dev)
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let disk = base.split('p').next().unwrap_or(&base).to_string();
    let dir = if base == disk {
        PathBuf::from(format!("/sys/block/{disk}/holders"))
    } else {
        PathBuf::from(format!("/sys/block/{disk}/{base}/holders"))
    };
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
}

/// The device-mapper devices of the volume group `vg` (named `VG-LV`, a
/// `-` in either doubled).
fn dm_of(vg: &str) -> Vec<String> {
    fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("dm/name")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| dm_name_of(n, vg))
        .collect()
}

/// Whether the device-mapper name `name` is of a volume of `vg`: `VG-LV`
/// with each `-` of VG and LV doubled.
fn dm_name_of(name: &str, vg: &str) -> bool {
    let prefix = format!("{}-", vg.replace('-', "--"));
    name.strip_prefix(&prefix)
        .is_some_and(|lv| !lv.is_empty() && !lv.starts_with('-'))
}

/// A name for the clone of volume group `vg` that no volume group of the
/// system (`taken`) has: `VG_pointN`, then `VG_pointN_2`...
pub fn clone_name(vg: &str, point: u32, taken: &[String]) -> String {
    let base = format!("{vg}_point{point}");
    if !taken.contains(&base) {
        return base;
    }
    (2..)
        .map(|i| format!("{base}_{i}"))
        .find(|n| !taken.contains(n))
        .expect("a free name")
}

/// `A|B` lines of an LVM report (`--noheadings --separator |`), trimmed.
fn report(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.split('|').map(|f| f.trim().to_string()).collect())
        .collect()
}

/// Mounts point `req.point` of `req.chain` (see the module's doc); on
/// failure, undoes what it did.
pub fn mount(req: &Request<'_>) -> Result<State, String> {
    let mp = check_mountpoint(req.mountpoint)?;
    let _lock = lock(req.state_dir)?;
    let sp = req.state_dir.join(format!("{}.json", key(&mp)));
    if sp.exists() {
        return Err(format!(
            "{}: a point is mounted there already (state {}); `blksnapctl umount {}` first",
            mp.display(),
            sp.display(),
            mp.display()
        ));
    }
    // Every image checked, and held open, before anything is done.
    let (m, files) = points::point_files(req.chain, req.point)?;
    let mut st = State {
        format: FORMAT,
        mountpoint: mp.clone(),
        chain: req.chain.to_path_buf(),
        point: req.point,
        overlay: None,
        nbd: None,
        pid: None,
        vgs: Vec::new(),
        dirs: Vec::new(),
        mounts: Vec::new(),
        skipped: Vec::new(),
    };
    st.save(&sp)?;
    match setup(&mut st, &sp, &files, m.size, req) {
        Ok(()) => Ok(st),
        Err(e) => match undo(&mut st, &sp, req.log) {
            Ok(()) => Err(format!("{e}; undone: nothing is left of the mount")),
            Err(u) => Err(format!(
                "{e}; undoing it failed too: {u} (state in {}; `blksnapctl umount {}` tries again)",
                sp.display(),
                mp.display()
            )),
        },
    }
}

fn setup(
    st: &mut State,
    sp: &Path,
    files: &[(u32, File)],
    size: u64,
    req: &Request<'_>,
) -> Result<(), String> {
    let log = req.log;
    let fail_after = |step: &str| {
        if req.fail_after == Some(step) {
            return Err(format!("{FAILED_AS_ASKED} {step}"));
        }
        Ok(())
    };
    let key = key(&st.mountpoint);
    let dir = req.overlay_dir.unwrap_or(req.state_dir);
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    // The overlay: a new file of ours, then a qcow2 image in it.
    let overlay = dir.join(format!("{key}.qcow2"));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&overlay)
        .map_err(|e| format!("{}: {e}", overlay.display()))?;
    st.overlay = Some(overlay.clone());
    st.save(sp)?;
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            overlay.to_str().ok_or("the overlay's path is not UTF-8")?,
            &size.to_string(),
        ],
    )?;
    fail_after("overlay")?;

    // qemu-nbd on a free nbd device, given the overlay and the checked
    // images by descriptor.
    let ov = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&overlay)
        .map_err(|e| format!("{}: {e}", overlay.display()))?;
    let fds: Vec<i32> = files.iter().map(|(_, f)| f.as_raw_fd()).collect();
    let spec = spec(ov.as_raw_fd(), &fds);
    let pidfile = req.state_dir.join(format!("{key}.pid"));
    let errfile = req.state_dir.join(format!("{key}.err"));
    let mut last = String::new();
    let mut connected = None;
    for name in free_nbds(log)?.into_iter().take(4) {
        st.nbd = Some(format!("/dev/{name}"));
        st.save(sp)?;
        match connect(&name, &spec, &ov, &fds, &pidfile, &errfile) {
            Ok(pid) => {
                connected = Some((name, pid));
                break;
            }
            Err(Connect::Refused(e)) => {
                // Another user took it meanwhile (qemu-nbd exited,
                // nothing runs): the next one.
                last = e;
                st.nbd = None;
                st.save(sp)?;
            }
            // qemu-nbd may run on it: the undo disconnects it.
            Err(Connect::Failed(e)) => {
                let _ = fs::remove_file(&errfile);
                return Err(e);
            }
        }
    }
    let _ = fs::remove_file(&errfile);
    let (name, pid) = connected.ok_or(last)?;
    st.pid = Some(pid);
    st.save(sp)?;
    // qemu-nbd holds the files now.
    drop(ov);
    let dev = format!("/dev/{name}");
    log(&format!(
        "point {} of {} on {dev} (qemu-nbd {pid}), writes to {}",
        st.point,
        st.chain.display(),
        overlay.display()
    ));
    fail_after("nbd")?;

    // What is on it.
    let mut found = Vec::new();
    let mut lvm_pvs = Vec::new();
    for (part, node) in partitions(&name)? {
        let p = probe(&node)?;
        match get(&p, "TYPE") {
            Some("LVM2_member") => lvm_pvs.push(node),
            Some(t) => found.push((part, node, t.to_string())),
            None => {}
        }
    }
    if !lvm_pvs.is_empty() {
        for pv in &lvm_pvs {
            let h = holders(pv);
            if !h.is_empty() {
                return Err(format!(
                    "{pv}: used by {} before blksnapctl touched it (LVM autoactivation? exclude /dev/nbd* in lvm.conf's global_filter, or use a devices file)",
                    h.join(", ")
                ));
            }
        }
        let rows = report(&lvm(
            "pvs",
            &lvm_pvs,
            &["--noheadings", "--separator", "|", "-o", "pv_name,vg_name"],
        )?);
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for r in rows {
            let [pv, vg] = &r[..] else { continue };
            if vg.is_empty() {
                st.skipped
                    .push(format!("{pv}: an LVM physical volume in no volume group"));
                continue;
            }
            match groups.iter_mut().find(|g| &g.0 == vg) {
                Some(g) => g.1.push(pv.clone()),
                None => groups.push((vg.clone(), vec![pv.clone()])),
            }
        }
        let taken: Vec<String> = report(&lvm("vgs", &[], &["--noheadings", "-o", "vg_name"])?)
            .into_iter()
            .flatten()
            .collect();
        for (vg, pvs) in groups {
            let clone = clone_name(&vg, st.point, &taken);
            st.vgs.push(Vg {
                name: vg.clone(),
                clone: clone.clone(),
                pvs: pvs.clone(),
            });
            st.save(sp)?;
            let mut args = vec!["--basevgname", clone.as_str()];
            args.extend(pvs.iter().map(String::as_str));
            lvm("vgimportclone", &pvs, &args)?;
            lvm("vgchange", &pvs, &["--activate", "y", &clone])?;
            log(&format!("volume group {vg} of the point is {clone}"));
            let lvs = report(&lvm(
                "lvs",
                &pvs,
                &[
                    "--noheadings",
                    "--separator",
                    "|",
                    "-o",
                    "lv_name,lv_dm_path,lv_active",
                    &clone,
                ],
            )?);
            for r in lvs {
                let [lv, path, active] = &r[..] else { continue };
                if active != "active" || path.is_empty() {
                    st.skipped.push(format!("{vg}/{lv}: not active"));
                    continue;
                }
                if !wait_for(10, || Path::new(path).exists()) {
                    return Err(format!("{vg}/{lv}: {path} did not appear"));
                }
                match get(&probe(path)?, "TYPE") {
                    Some(t) => found.push((format!("{vg}-{lv}"), path.clone(), t.to_string())),
                    None => st.skipped.push(format!("{vg}/{lv}: no file system found")),
                }
            }
        }
    }
    fail_after("lvm")?;

    // The file systems, read-only.
    for (part, node, fstype) in found {
        let Some(options) = mount_options(&fstype) else {
            st.skipped.push(format!(
                "{part} ({node}): {fstype}, not a file system this mounts"
            ));
            continue;
        };
        let target = st.mountpoint.join(&part);
        fs::create_dir(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        st.dirs.push(target.clone());
        st.save(sp)?;
        let t = target
            .to_str()
            .ok_or("the mount point's path is not UTF-8")?;
        run("mount", &["-t", &fstype, "-o", options, &node, t])?;
        st.mounts.push(Mounted {
            name: part,
            source: node,
            target,
            fstype,
            options: options.into(),
        });
        st.save(sp)?;
    }
    fail_after("mount")?;
    if st.mounts.is_empty() {
        return Err(format!(
            "point {}: no file system to mount{}",
            st.point,
            if st.skipped.is_empty() {
                String::new()
            } else {
                format!(" ({})", st.skipped.join("; "))
            }
        ));
    }
    Ok(())
}

/// Why [`connect`] failed.
enum Connect {
    /// qemu-nbd exited with an error: nothing of it runs.
    Refused(String),
    /// Anything else: a qemu-nbd may run.
    Failed(String),
}

/// Starts `qemu-nbd --connect` on nbd device `name`; its pid once the
/// device is connected.
fn connect(
    name: &str,
    spec: &str,
    overlay: &File,
    fds: &[i32],
    pidfile: &Path,
    errfile: &Path,
) -> Result<u32, Connect> {
    let dev = format!("/dev/{name}");
    let _ = fs::remove_file(pidfile);
    // Its error output to a file: the server it leaves running must not
    // hold a pipe of ours.
    let err = File::create(errfile)
        .map_err(|e| Connect::Refused(format!("{}: {e}", errfile.display())))?;
    let mut keep: Vec<i32> = fds.to_vec();
    keep.push(overlay.as_raw_fd());
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg(format!("--connect={dev}"))
        .arg(format!("--pid-file={}", pidfile.display()))
        .arg(spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    inherit(&mut cmd, keep);
    let mut child = cmd
        .spawn()
        .map_err(|e| Connect::Refused(format!("qemu-nbd: {e}")))?;
    let status = if wait_for(120, || child.try_wait().is_ok_and(|s| s.is_some())) {
        child.wait().map_err(|e| Connect::Failed(e.to_string()))?
    } else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(Connect::Failed(format!(
            "qemu-nbd --connect={dev}: no answer within 120 s"
        )));
    };
    let mut msg = String::new();
    let _ = File::open(errfile).and_then(|mut f| f.read_to_string(&mut msg));
    if !status.success() {
        return Err(Connect::Refused(format!(
            "qemu-nbd --connect={dev}: {status}: {}",
            last_line(&msg)
        )));
    }
    let pid = fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            Connect::Failed(format!(
                "qemu-nbd --connect={dev}: no pid in {}",
                pidfile.display()
            ))
        })?;
    if !wait_for(30, || nbd_pid(name).is_some() && nbd_size(name) > 0) {
        return Err(Connect::Failed(format!(
            "{dev}: not connected 30 s after qemu-nbd started"
        )));
    }
    // The first open scans the partition table: now, while connected.
    drop(File::open(&dev));
    Ok(pid)
}

/// Unmounts point mounted on `mountpoint`: undoes everything its state
/// file records.
pub fn umount(mountpoint: &Path, state_dir: &Path, log: &dyn Fn(&str)) -> Result<State, String> {
    let mp = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let _lock = lock(state_dir)?;
    let sp = state_dir.join(format!("{}.json", key(&mp)));
    if !sp.exists() {
        return Err(format!(
            "{}: no point is mounted there by blksnapctl (no {})",
            mp.display(),
            sp.display()
        ));
    }
    let mut st = State::load(&sp)?;
    let done = st.clone();
    undo(&mut st, &sp, log).map_err(|e| {
        format!(
            "{e}; what is left is recorded in {}: `blksnapctl umount {}` tries again",
            sp.display(),
            mp.display()
        )
    })?;
    Ok(done)
}

/// Undoes what `st` records, last first, saving it after each step; removes
/// the state file at the end. Stops at the first step that fails.
fn undo(st: &mut State, sp: &Path, log: &dyn Fn(&str)) -> Result<(), String> {
    while let Some(m) = st.mounts.last() {
        if is_mount_point(&m.target)? {
            run("umount", &[m.target.to_str().unwrap_or_default()]).map_err(|e| {
                format!(
                    "{e} (a process uses it? `fuser -vm {}` tells)",
                    m.target.display()
                )
            })?;
        }
        st.mounts.pop();
        st.save(sp)?;
    }
    while let Some(vg) = st.vgs.last() {
        // Active only if its device-mapper devices are there (not
        // renamed yet, a failure before, none are).
        if !dm_of(&vg.clone).is_empty() {
            lvm("vgchange", &vg.pvs, &["--activate", "n", &vg.clone])?;
        }
        let left = dm_of(&vg.clone);
        if !left.is_empty() {
            return Err(format!(
                "device-mapper devices of {} are still there: {} (`dmsetup remove` them)",
                vg.clone,
                left.join(", ")
            ));
        }
        for pv in &vg.pvs {
            let h = holders(pv);
            if !h.is_empty() {
                return Err(format!(
                    "{pv}: still used by {} after the volume group {} was deactivated",
                    h.join(", "),
                    vg.clone
                ));
            }
        }
        st.vgs.pop();
        st.save(sp)?;
    }
    if let Some(dev) = st.nbd.clone() {
        let name = dev.trim_start_matches("/dev/").to_string();
        // Disconnected only if the server is ours: it has our overlay open.
        let ours = match (nbd_pid(&name), &st.overlay) {
            (Some(p), Some(o)) => has_open(p, o) || st.pid.is_some_and(|q| q == p),
            _ => false,
        };
        if ours {
            let h = holders(&dev);
            if !h.is_empty() {
                return Err(format!("{dev}: still used by {}", h.join(", ")));
            }
            run("qemu-nbd", &["--disconnect", &dev])?;
            if !wait_for(30, || nbd_pid(&name).is_none()) {
                return Err(format!(
                    "{dev}: still connected 30 s after qemu-nbd --disconnect"
                ));
            }
        } else if nbd_pid(&name).is_some() {
            log(&format!(
                "{dev}: served by another process: not ours, left alone"
            ));
        }
        if let Some(pid) = st.pid {
            let overlay = st.overlay.clone();
            let mine = |p: u32| overlay.as_ref().is_some_and(|o| has_open(p, o));
            if alive(pid) && mine(pid) && !wait_for(30, || !alive(pid)) {
                return Err(format!(
                    "qemu-nbd {pid}: still running 30 s after the disconnect of {dev}"
                ));
            }
        }
        st.nbd = None;
        st.pid = None;
        st.save(sp)?;
    }
    if let Some(o) = st.overlay.clone() {
        match fs::remove_file(&o) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("{}: {e}", o.display()))
            }
            _ => {}
        }
        st.overlay = None;
        st.save(sp)?;
    }
    while let Some(d) = st.dirs.last() {
        match fs::remove_dir(d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("{}: {e}", d.display()))
            }
            _ => {}
        }
        st.dirs.pop();
        st.save(sp)?;
    }
    let _ = fs::remove_file(sp.with_extension("pid"));
    let _ = fs::remove_file(sp.with_extension("err"));
    fs::remove_file(sp).map_err(|e| format!("{}: {e}", sp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    37 35 98:0 / /run/blksnap/m rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(text),
            vec![
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/run/blksnap/m")
            ]
        );
        assert_eq!(unescape("a\\011b\\134c"), "a\tb\\c");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn spec_names_every_image_by_descriptor() {
        let s = spec(9, &[5, 6, 7]);
        let v: serde_json::Value = serde_json::from_str(s.strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(v["file"]["filename"], "/proc/self/fd/9");
        assert_eq!(v["backing"]["file"]["filename"], "/proc/self/fd/5");
        assert_eq!(
            v["backing"]["backing"]["file"]["filename"],
            "/proc/self/fd/6"
        );
        let base = &v["backing"]["backing"]["backing"];
        assert_eq!(base["file"]["filename"], "/proc/self/fd/7");
        assert_eq!(base["driver"], "qcow2");
        // The base's backing is none, whatever its header says.
        assert!(base.get("backing").is_some_and(|b| b.is_null()));
        assert_eq!(s.matches("/proc/self/fd/").count(), 4);
    }

    #[test]
    fn dm_names_of_a_volume_group() {
        assert!(dm_name_of("vg0_point2-home", "vg0_point2"));
        assert!(dm_name_of("vg0_point2-my--lv", "vg0_point2"));
        assert!(dm_name_of("a--b_point1-lv", "a-b_point1"));
        // Another volume group whose name starts alike.
        assert!(!dm_name_of("vg0_point2--x-lv", "vg0_point2"));
        assert!(!dm_name_of("vg0_point22-lv", "vg0_point2"));
        assert!(!dm_name_of("vg0_point2-", "vg0_point2"));
        assert!(!dm_name_of("vg0-home", "vg0_point2"));
    }

    #[test]
    fn clone_names() {
        assert_eq!(clone_name("vg0", 2, &[]), "vg0_point2");
        let taken = vec![
            "vg0".to_string(),
            "vg0_point2".into(),
            "vg0_point2_2".into(),
        ];
        assert_eq!(clone_name("vg0", 2, &taken), "vg0_point2_3");
    }

    #[test]
    fn keys_and_reports() {
        assert_eq!(key(Path::new("/mnt/a")).len(), 16);
        assert_ne!(key(Path::new("/mnt/a")), key(Path::new("/mnt/b")));
        assert_eq!(
            report("  /dev/nbd0p3|vg0\n\n  /dev/nbd0p4|\n"),
            vec![
                vec!["/dev/nbd0p3".to_string(), "vg0".into()],
                vec!["/dev/nbd0p4".to_string(), String::new()]
            ]
        );
        assert_eq!(
            parse_export("DEVNAME=/dev/nbd0p1\nUUID=ab\nTYPE=ext4\n"),
            vec![
                ("DEVNAME".to_string(), "/dev/nbd0p1".to_string()),
                ("UUID".into(), "ab".into()),
                ("TYPE".into(), "ext4".into())
            ]
        );
        assert_eq!(mount_options("xfs"), Some("ro,nouuid"));
        assert_eq!(mount_options("ext4"), Some("ro"));
        // The journal is replayed (into the overlay), never skipped.
        for t in ["ext2", "ext3", "ext4", "xfs"] {
            let o = mount_options(t).unwrap();
            assert!(
                !o.contains("noload") && !o.contains("norecovery"),
                "{t}: {o}"
            );
        }
        assert_eq!(mount_options("swap"), None);
        assert_eq!(mount_options("crypto_LUKS"), None);
    }

    #[test]
    fn mountpoint_must_be_an_empty_directory() {
        let d = std::env::temp_dir().join(format!("blksnap-mp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("empty")).unwrap();
        fs::create_dir_all(d.join("full")).unwrap();
        fs::write(d.join("full/x"), b"x").unwrap();
        fs::write(d.join("file"), b"x").unwrap();
        assert_eq!(
            check_mountpoint(&d.join("empty")).unwrap(),
            fs::canonicalize(d.join("empty")).unwrap()
        );
        let e = check_mountpoint(&d.join("full")).unwrap_err();
        assert!(e.contains("not empty"), "{e}");
        let e = check_mountpoint(&d.join("file")).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        let e = check_mountpoint(&d.join("missing")).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
