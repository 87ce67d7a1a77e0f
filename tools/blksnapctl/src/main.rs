// SPDX-License-Identifier: GPL-2.0

//! blksnapctl: drive the blksnap kernel module from the command line.

use blksnap::backup::{self, Kind, Progress};
use blksnap::boot::{self, DEFAULT_CONFIG};
use blksnap::points;
use blksnap::{
    changed_ranges, uuid_string, Control, MapKind, Persisted, Restore, SectorRange, SnapshotId,
    Tracker,
};
use clap::{CommandFactory, Parser, Subcommand};
use nix::errno::Errno;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit codes.
mod exit {
    /// The operation failed.
    pub const FAILED: u8 = 1;
    /// A verification found a mismatch.
    pub const MISMATCH: u8 = 3;
    /// A post-thaw hook failed; the snapshot (and the backup) is valid.
    pub const HOOK_FAILED: u8 = 4;
    /// Interrupted by a signal; nothing looks complete that is not.
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Parser)]
#[command(
    name = "blksnapctl",
    version,
    about = "Change block tracking and snapshots of block devices (blksnap)",
    after_help = "Examples:\n  blksnapctl attach /dev/vdb\n  blksnapctl cbt info /dev/vdb\n  blksnapctl cbt read --active /dev/vdb\n  blksnapctl backup full /dev/vdb /dev/vdc1 --store /var/tmp --to /backup\n  blksnapctl backup incremental /dev/vdb /dev/vdc1 --store /var/tmp --to /backup\n  blksnapctl backup list /backup\n  blksnapctl restore --point 2 /backup /dev/vdd --device vdb\n  blksnapctl backup prune /backup --keep 7\n  blksnapctl verify /backup --device vdb\n  blksnapctl verify --source /dev/vdb /backup --store /var/tmp\n  blksnapctl backup full /dev/vdb --store /var/tmp --to /backup --pre-freeze 'sync'\n\nExit status: 0 success, 1 failure, 2 usage error, 3 verification mismatch,\n4 a post-thaw hook failed (the snapshot and backup are valid),\n130 interrupted (the backup is left marked in-progress)."
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the interface version of the loaded module.
    Version,
    /// Attach the blksnap filter to a block device: start tracking changes.
    Attach { device: PathBuf },
    /// Detach the blksnap filter from a block device: stop tracking.
    Detach { device: PathBuf },
    /// Change block tracking.
    #[command(subcommand)]
    Cbt(CbtCommand),
    /// Snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Difference storage.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Back up devices: a full image, or the blocks changed since.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Check backups: every restore point of a chain (DIR), a raw image
    /// against its manifest (IMAGE --manifest FILE), or a chain against its
    /// device (--source DEV DIR).
    ///
    /// With --source: takes a snapshot of DEV, reads it whole (a full read
    /// of the device), and compares it with the newest complete point of
    /// DEV's chain in DIR, taking into account what the change map says
    /// changed since that point. Blocks that differ although the map does
    /// not mark them were missed by the chain (a write the tracking never
    /// saw): they are listed with their byte ranges, and the exit status
    /// is 3. --repair then makes a new point that includes them.
    Verify {
        /// A backup directory (or one device's chain in it), or a raw image.
        path: PathBuf,
        /// The raw image's manifest.
        #[arg(long, conflicts_with = "source")]
        manifest: Option<PathBuf>,
        /// The device whose chain to check, when DIR has several.
        #[arg(long, conflicts_with = "source")]
        device: Option<String>,
        /// Check the chain against this device (see above).
        #[arg(long, requires = "store")]
        source: Option<PathBuf>,
        /// With --source: difference storage for its snapshot (a
        /// directory, file or device, as for `backup`).
        #[arg(long, requires = "source")]
        store: Option<PathBuf>,
        /// With --source: largest size of the difference storage.
        #[arg(long, value_parser = parse_size, default_value = "1G")]
        limit: u64,
        /// With --source: when blocks were missed, make a new restore point
        /// from the same snapshot that includes them (it equals the device).
        #[arg(long, requires = "source")]
        repair: bool,
        /// With --source: the hooks around its take.
        #[command(flatten)]
        hooks: HookArgs,
    },
    /// Write a restore point's content to a device or a raw file.
    Restore {
        /// The point's number (see `backup list`).
        #[arg(long)]
        point: u32,
        /// The backup directory (or one device's chain in it).
        dir: PathBuf,
        /// A block device, or a raw file (created, or overwritten).
        target: PathBuf,
        /// The device whose point, when DIR has points of several.
        #[arg(long)]
        device: Option<String>,
        /// Write even to a mounted or in-use device, or one in a snapshot.
        #[arg(long)]
        force: bool,
    },
    /// Generate the man pages or shell completions.
    #[command(subcommand, hide = true)]
    Generate(GenerateCommand),
    /// Measure reading FILE against reading and digesting it (the digest
    /// paths: digest incrementals, verify, verify --source), with direct
    /// I/O and from the page cache.
    #[command(hide = true)]
    DigestBench {
        /// A file on the disk to measure (made of mixed data if missing).
        file: PathBuf,
        /// Size of the file made.
        #[arg(long, value_parser = parse_size, default_value = "1G")]
        size: u64,
        /// Rounds of every row (interleaved; the median is shown).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[derive(clap::Args)]
struct BackupArgs {
    /// The devices, captured by one snapshot.
    #[arg(required = true)]
    devices: Vec<PathBuf>,
    /// Difference storage for the snapshot: a directory, file or device.
    #[arg(long)]
    store: PathBuf,
    /// Largest size of the difference storage, like 4G.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    limit: u64,
    /// Directory of the backup images and manifests.
    #[arg(long)]
    to: PathBuf,
    /// Keep the snapshot after the backup (its id is printed), to inspect
    /// or compare its images; destroy it with `snapshot destroy`.
    #[arg(long)]
    keep_snapshot: bool,
    /// qcow2: each backup is a new restore point in DIR/<name>/ (a base,
    /// then overlays); raw: one image DIR/<name>.img updated in place.
    #[arg(long, value_enum, default_value = "qcow2")]
    format: Format,
    #[command(flatten)]
    hooks: HookArgs,
}

/// The hooks run around a take (application-consistent snapshots): see
/// README.md "Application-consistent snapshots".
#[derive(clap::Args, Clone, Default)]
#[command(next_help_heading = "Hooks around the take")]
struct HookArgs {
    /// Run CMD (with `sh -c`) before the freeze, after the hooks
    /// directory's; a failure aborts the take. Repeatable.
    #[arg(long = "pre-freeze", value_name = "CMD")]
    pre_freeze: Vec<String>,
    /// Run CMD (with `sh -c`) after the thaw, before the hooks directory's
    /// (also when the take failed or was aborted). Repeatable.
    #[arg(long = "post-thaw", value_name = "CMD")]
    post_thaw: Vec<String>,
    /// The hooks directory: its executable files run with `pre-freeze`
    /// in lexical order, then with `post-thaw` in reverse [default:
    /// $BLKSNAP_HOOKS_DIR, else /etc/blksnap/hooks.d].
    #[arg(long, value_name = "DIR")]
    hooks_dir: Option<PathBuf>,
    /// Do not run the hooks directory's hooks.
    #[arg(long, conflicts_with = "hooks_dir")]
    no_hooks: bool,
    /// Kill a hook (its whole process group) still running after SECS
    /// seconds; it counts as failed.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    hook_timeout: u64,
}

impl HookArgs {
    /// Any hook option given.
    fn given(&self) -> bool {
        !self.pre_freeze.is_empty()
            || !self.post_thaw.is_empty()
            || self.hooks_dir.is_some()
            || self.no_hooks
            || self.hook_timeout != 60
    }

    /// The hooks, checked (the directory's permissions).
    fn load(&self) -> Result<blksnap::hooks::Hooks, (u8, String)> {
        use blksnap::hooks::{Hooks, Settings};
        let (dir, dir_explicit) = Settings::choose_dir(self.hooks_dir.clone(), self.no_hooks);
        Hooks::load(&Settings {
            pre: self.pre_freeze.clone(),
            post: self.post_thaw.clone(),
            dir,
            dir_explicit,
            timeout: std::time::Duration::from_secs(self.hook_timeout),
        })
        .map_err(|e| (exit::FAILED, e))
    }
}

/// The error for failed post-thaw hooks, if any.
fn post_thaw_failed(ran: Option<&blksnap::hooks::Ran>) -> Result<(), (u8, String)> {
    match ran.and_then(|r| r.post_failure_message()) {
        Some(m) => Err((exit::HOOK_FAILED, m)),
        None => Ok(()),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Qcow2,
    Raw,
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Copy each whole device: a new base restore point (or, with
    /// --format raw, DIR/<name>.img) with a manifest.
    Full(BackupArgs),
    /// Copy the blocks changed since the last backup: a new restore point
    /// backed by the previous one (or, raw, into the image).
    Incremental {
        #[command(flatten)]
        args: BackupArgs,
        /// Raw format only: keep the base image and write the changes
        /// since it to DIR/<name>.diff.img instead.
        #[arg(long)]
        differential: bool,
        /// Also check the device against the last backup (a full read, as
        /// `verify --source`): blocks the change map missed are copied too,
        /// with a warning.
        #[arg(long, conflicts_with = "differential")]
        verify_source: bool,
    },
    /// List the restore points in DIR.
    List { dir: PathBuf },
    /// Keep the newest N restore points of each chain in DIR: the oldest
    /// kept becomes a base holding what the older ones did.
    Prune {
        dir: PathBuf,
        /// How many points to keep.
        #[arg(long)]
        keep: usize,
        /// Only this device's chain.
        #[arg(long)]
        device: Option<String>,
        /// For tests: exit after this step (mark, merge, manifest, remove), as a
        /// crash would.
        #[arg(long, hide = true)]
        crash_after: Option<String>,
    },
}

#[derive(Subcommand)]
enum GenerateCommand {
    /// Write the man pages into DIR.
    Man { dir: PathBuf },
    /// Print a completion script for SHELL.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Create a snapshot and its difference storage; prints its id.
    Create {
        /// Difference storage: a file, a directory (for an unnamed
        /// temporary file), or a block device.
        #[arg(long, conflicts_with_all = ["memory", "devices"], required_unless_present_any = ["memory", "devices"])]
        store: Option<PathBuf>,
        /// Keep the difference storage in kernel memory, up to --limit.
        #[arg(long)]
        memory: bool,
        /// Keep the difference storage on block device ranges, given later
        /// with `blksnapctl store append`.
        #[arg(long, conflicts_with = "memory")]
        devices: bool,
        /// Largest size of the storage, like 4G or 512M (bytes).
        #[arg(long, value_parser = parse_size, default_value = "1G")]
        limit: u64,
    },
    /// Add a device to a snapshot (the device must be tracked).
    Add { id: SnapshotId, device: PathBuf },
    /// Take a snapshot: all its devices at one instant (`--json` also
    /// gives the time the take ioctl took, in ms), between the pre-freeze
    /// and post-thaw hooks. A failed pre-freeze hook leaves the snapshot
    /// untaken (take it again or destroy it).
    Take {
        id: SnapshotId,
        /// The snapshot's devices: for the hooks (BLKSNAP_DEVICES), and the
        /// file systems on devices stacked over them (LVM, dm-crypt, md) are
        /// frozen for the take.
        #[arg(long = "device", value_name = "DEV")]
        devices: Vec<PathBuf>,
        #[command(flatten)]
        hooks: HookArgs,
    },
    /// Destroy a snapshot: its images and storage go away.
    Destroy { id: SnapshotId },
    /// List the snapshots.
    List,
    /// Show the snapshot state of a device: image name and error.
    Info { device: PathBuf },
    /// Wait for events of a snapshot and print them, until it is destroyed.
    Watch {
        id: SnapshotId,
        /// Stop after this many seconds without an event.
        #[arg(long)]
        timeout: Option<u32>,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Give a snapshot ranges of a block device as difference storage.
    Append {
        id: SnapshotId,
        device: PathBuf,
        /// OFFSET:COUNT in 512-byte sectors.
        #[arg(required = true, value_parser = parse_range)]
        ranges: Vec<SectorRange>,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|e| format!("size `{s}`: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

#[derive(Subcommand)]
enum CbtCommand {
    /// Print the tracking block size, block count, generation and number.
    Info { device: PathBuf },
    /// Print the changed blocks.
    Read {
        device: PathBuf,
        /// Read the active map (changes as they happen) instead of the map
        /// as of the last snapshot.
        #[arg(long)]
        active: bool,
        /// Show blocks whose change number is greater than this.
        #[arg(long, default_value_t = 0)]
        since: u8,
    },
    /// Mark sector ranges, given as OFFSET:COUNT in 512-byte sectors, changed.
    Mark {
        device: PathBuf,
        #[arg(required = true, value_parser = parse_range)]
        ranges: Vec<SectorRange>,
    },
    /// Open the CBT state device and read the CBT states saved on it.
    ///
    /// `cbt save` writes the CBT of the devices registered with `cbt
    /// persist` there. The saved states are used at most once: opening the
    /// device marks them not clean on it. Opening it again gives the same
    /// answer.
    StateDevice {
        /// A block device of its own, never tracked (16 MiB is plenty).
        path: PathBuf,
        /// Write an empty state header first (once, on a new device; it
        /// drops any saved states).
        #[arg(long)]
        format: bool,
        /// Open PATH as the mirror of the state device opened before (on
        /// another disk): every save writes both, and a state saved on both
        /// is restored only where they agree.
        #[arg(long)]
        mirror: bool,
    },
    /// Register a device for `cbt save` and restore its saved CBT.
    ///
    /// Attaches the filter first if needed, registers the device under ID
    /// and restores the CBT saved under ID at the last shutdown if it may
    /// be used; if not, says why (the next incremental then reads the whole
    /// device). Exits with 0 in each case.
    Persist {
        device: PathBuf,
        /// The name its CBT is saved under, 1 to 63 bytes: a stable name
        /// such as its /dev/disk/by-id/ path.
        #[arg(long)]
        id: String,
        /// Accept that its saved CBT is restored although nothing proves
        /// that nobody wrote to it while it was not tracked (it has no file
        /// system to fingerprint): such writes would be missing from the
        /// next incremental. Needed at the save's registration and at the
        /// restore's.
        #[arg(long)]
        accept_missed_writes: bool,
    },
    /// Save the CBT of every registered device to the state device.
    ///
    /// Meant for the very end of shutdown (blksnap-cbt.shutdown): the first
    /// write to one of the devices after it, or its detach, marks the saved
    /// state not clean before it passes.
    Save,
    /// Open the state device and attach + persist the tracked devices.
    ///
    /// Run at boot by the udev rule (with --device) and by
    /// blksnap-cbt.service. Entries whose path does not exist are skipped;
    /// without a configuration file it exits quietly with 0.
    Boot {
        /// The configuration: `state PATH` (one), `track PATH [ID]` (any),
        /// `#` comments.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Only the entry that resolves to this device node (all of them if
        /// it is the state device).
        #[arg(long)]
        device: Option<PathBuf>,
    },
}

fn parse_range(s: &str) -> Result<SectorRange, String> {
    let (o, c) = s.split_once(':').ok_or("expected OFFSET:COUNT")?;
    Ok(SectorRange {
        offset: o.parse().map_err(|e| format!("offset: {e}"))?,
        count: c.parse().map_err(|e| format!("count: {e}"))?,
    })
}

fn run(cli: Cli) -> Result<(), blksnap::Error> {
    match cli.command {
        Command::Version => {
            let v = Control::open()?.version()?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"major": v.major, "minor": v.minor, "revision": v.revision, "build": v.build})
                );
            } else {
                println!("{}.{}.{}.{}", v.major, v.minor, v.revision, v.build);
            }
        }
        Command::Attach { device } => {
            Tracker::open(&device)?.attach()?;
            if !cli.json {
                println!("tracking {}", device.display());
            }
        }
        Command::Detach { device } => {
            Tracker::open(&device)?.detach()?;
            if !cli.json {
                println!("stopped tracking {}", device.display());
            }
        }
        Command::Cbt(CbtCommand::Info { device }) => {
            let t = Tracker::open(&device)?;
            let info = t.cbt_info()?;
            // The fine map is our extension: absent on an upstream module.
            let fine = t.read_fine(0, 0, &mut []).ok();
            if cli.json {
                let mut v = serde_json::to_value(&info).unwrap();
                v["fine"] = serde_json::to_value(fine).unwrap();
                println!("{v}");
            } else {
                println!("device:         {}", device.display());
                println!("capacity:       {} bytes", info.device_capacity);
                println!("block size:     {} bytes", info.block_size);
                println!("blocks:         {}", info.block_count);
                println!("generation:     {}", info.generation);
                println!("changes number: {}", info.changes_number);
                if let Some(f) = fine {
                    println!("fine blocks:    {} bytes", f.block_size);
                    println!(
                        "fine map:       {} bytes (limit {})",
                        f.memory, f.memory_limit
                    );
                }
            }
        }
        Command::Cbt(CbtCommand::Read {
            device,
            active,
            since,
        }) => {
            let t = Tracker::open(&device)?;
            let info = t.cbt_info()?;
            let kind = if active {
                MapKind::Active
            } else {
                MapKind::Snapshot
            };
            let map = t.read_cbt_map(kind)?;
            let ranges = changed_ranges(&map, since);
            let changed: u64 = ranges.iter().map(|(s, e)| u64::from(e - s)).sum();
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "block_size": info.block_size,
                        "block_count": info.block_count,
                        "generation": info.generation,
                        "changes_number": info.changes_number,
                        "since": since,
                        "changed_blocks": changed,
                        "changed": ranges,
                    })
                );
            } else {
                println!(
                    "{}: {} of {} blocks of {} bytes changed ({} bytes)",
                    device.display(),
                    changed,
                    info.block_count,
                    info.block_size,
                    changed * u64::from(info.block_size)
                );
                const SHOWN: usize = 16;
                if ranges.len() > SHOWN {
                    println!("  ({} ranges, the first {SHOWN} shown)", ranges.len());
                }
                for &(s, e) in ranges.iter().take(SHOWN) {
                    if e - s == 1 {
                        println!("  block {s}");
                    } else {
                        println!("  blocks {s}-{}", e - 1);
                    }
                }
            }
        }
        Command::Cbt(CbtCommand::Mark { device, ranges }) => {
            Tracker::open(&device)?.mark_dirty(&ranges)?;
        }
        Command::Cbt(CbtCommand::StateDevice {
            path,
            format,
            mirror,
        }) => {
            let state = Control::open()?
                .cbt_state_device_as(&path, format, mirror)
                .map_err(hint)?;
            if cli.json {
                println!("{}", state_json(&path, &state));
            } else {
                println!("{}", state_line(&path, &state));
            }
        }
        Command::Cbt(CbtCommand::Persist {
            device,
            id,
            accept_missed_writes,
        }) => {
            let p = attach_and_persist(&device, &id, accept_missed_writes)?;
            if cli.json {
                println!("{}", persist_json(&device, &id, &p));
            } else {
                println!("{}", persist_line(&device, &id, &p));
            }
        }
        Command::Cbt(CbtCommand::Save) => {
            let saved = Control::open()?.cbt_save().map_err(hint)?;
            if cli.json {
                println!("{}", serde_json::to_string(&saved).unwrap());
            } else {
                println!(
                    "saved the CBT of {} devices ({} bytes)",
                    saved.devices, saved.bytes
                );
            }
        }
        Command::Snapshot(cmd) => snapshot(cmd, cli.json)?,
        Command::Store(StoreCommand::Append { id, device, ranges }) => {
            Control::open()?.snapshot_append_storage(&id, &device, &ranges)?
        }
        Command::Backup(_)
        | Command::Verify { .. }
        | Command::Restore { .. }
        | Command::Generate(_)
        | Command::DigestBench { .. }
        | Command::Cbt(CbtCommand::Boot { .. }) => unreachable!(),
    }
    Ok(())
}

/// Adds what to do about the errors of persistent CBT that need it.
fn hint(mut e: blksnap::Error) -> blksnap::Error {
    let h = match e.errno {
        Errno::ENXIO => " (no CBT state device is open: `blksnapctl cbt state-device PATH` first)",
        Errno::ENODATA => " (it has no CBT state header: `--format` writes one, once)",
        Errno::EBUSY if e.what.contains("state device") => {
            " (another device is the state device, or this one is tracked)"
        }
        _ => "",
    };
    e.what += h;
    e
}

fn state_line(path: &std::path::Path, s: &blksnap::StateDevice) -> String {
    format!(
        "state device {}: {} saved device states, {}",
        path.display(),
        s.records,
        if s.clean {
            "clean"
        } else {
            "not clean: they will not be used"
        }
    )
}

fn state_json(path: &std::path::Path, s: &blksnap::StateDevice) -> serde_json::Value {
    serde_json::json!({
        "device": path.display().to_string(),
        "records": s.records,
        "clean": s.clean,
    })
}

/// Opens `device` and attaches the filter unless it is attached.
fn open_attached(device: &std::path::Path) -> Result<Tracker, blksnap::Error> {
    let t = Tracker::open(device)?;
    match t.attach() {
        // Attached already (by udev, or an earlier run); another filter
        // makes the filter commands fail later.
        Err(e) if !matches!(e.errno, Errno::EALREADY | Errno::EBUSY) => Err(e),
        _ => Ok(t),
    }
}

/// Attaches the filter unless it is attached, then `CBTPERSIST` with the
/// device's identity.
fn attach_and_persist(
    device: &std::path::Path,
    id: &str,
    accept_missed_writes: bool,
) -> Result<Persisted, blksnap::Error> {
    // The id and the identity are checked before anything changes on the
    // device.
    blksnap::persist_id(id)?;
    let identity = blksnap::identity::Identity::read(device).map_err(|e| blksnap::Error {
        what: format!("identity of {}: {e}", device.display()),
        errno: Errno::ENODEV,
    })?;
    open_attached(device)?
        .persist_as(id, &identity.text(), accept_missed_writes)
        .map_err(hint)
}

/// What proves the device unwritten, for the lines below.
fn proof_words(p: &Persisted) -> String {
    match p.proof {
        0 => format!(
            "nothing proves it unwritten while not tracked (no file system): its saved CBT is \
             refused unless its `track` line ends with `{}`",
            boot::ACCEPT_MISSED_WRITES
        ),
        n => format!("proof at the next save: {}", blksnap::proof_name(n)),
    }
}

fn persist_line(device: &std::path::Path, id: &str, p: &Persisted) -> String {
    let d = device.display();
    match p.restored {
        Restore::Restored => format!(
            "{d}: CBT restored (generation {}; {})",
            uuid_string(&p.generation),
            proof_words(p)
        ),
        Restore::NoneSaved => format!("{d}: no saved CBT under {id} ({})", proof_words(p)),
        Restore::Refused(e) => {
            let writes = match (e, p.writes_before) {
                (Errno::EBUSY, Some(n)) if n > 0 => {
                    format!(" ({n} writes counted before or since the attach)")
                }
                (Errno::EBUSY, None) => " (the block layer cannot count its writes)".into(),
                _ => String::new(),
            };
            format!(
                "{d}: saved CBT not used: {e:?}, {}{writes}; the next incremental reads the whole device",
                Restore::reason(e)
            )
        }
    }
}

fn persist_json(device: &std::path::Path, id: &str, p: &Persisted) -> serde_json::Value {
    let (refused, reason) = match p.restored {
        Restore::Refused(e) => (Some(format!("{e:?}")), Some(Restore::reason(e))),
        _ => (None, None),
    };
    serde_json::json!({
        "device": device.display().to_string(),
        "id": id,
        "restored": p.restored == Restore::Restored,
        "refused": refused,
        "reason": reason,
        "generation": uuid_string(&p.generation),
        "writes_before": p.writes_before,
        "proof": blksnap::proof_name(p.proof),
    })
}

fn boot_failed(errors: u32) -> String {
    format!(
        "cbt boot: {errors} error{} above",
        if errors == 1 { "" } else { "s" }
    )
}

/// `cbt boot`: the state device of the configuration, then its tracked
/// devices. Goes on after an error, and fails at the end if there was one.
fn cbt_boot(
    config: &std::path::Path,
    device: Option<&std::path::Path>,
    json: bool,
) -> Result<(), (u8, String)> {
    let Some(conf) = boot::load(config).map_err(|e| (exit::FAILED, e))? else {
        return Ok(());
    };
    let plan = conf.plan(device, |p| std::fs::canonicalize(p).ok());
    if plan.is_empty() {
        return Ok(());
    }
    let mut errors = 0u32;
    let mut fail = |e: String| {
        eprintln!("blksnapctl: {e}");
        errors += 1;
    };
    for p in &plan.problems {
        fail(format!("{}: {p}", config.display()));
    }
    if plan.state_missing {
        let state = conf.state.as_ref().unwrap();
        fail(format!(
            "the state device {} is not there: no saved CBT is restored",
            state.display()
        ));
    }
    let ctl = match Control::open() {
        Ok(c) => c,
        Err(e) => {
            fail(e.to_string());
            return Err((exit::FAILED, boot_failed(errors)));
        }
    };
    let mut state_out = serde_json::Value::Null;
    let mut state_open = false;
    if let Some(s) = &plan.state {
        match ctl.cbt_state_device(&s.resolved, false).map_err(hint) {
            Ok(st) => {
                state_open = true;
                if json {
                    state_out = state_json(&s.path, &st);
                } else if plan.show_state {
                    println!("{}", state_line(&s.path, &st));
                }
            }
            Err(e) => fail(format!("state {}: {e}", s.path.display())),
        }
        if state_open {
            if let Some(m) = &plan.mirror {
                match ctl
                    .cbt_state_device_as(&m.resolved, false, true)
                    .map_err(hint)
                {
                    Ok(st) => {
                        if json {
                            state_out["mirror"] = state_json(&m.path, &st);
                        } else if plan.show_state {
                            println!("mirror {}", state_line(&m.path, &st));
                        }
                    }
                    Err(e) => fail(format!("state mirror {}: {e}", m.path.display())),
                }
            }
        }
    }
    if plan.mirror_missing {
        let m = conf.mirror.as_ref().unwrap();
        fail(format!(
            "the state device's mirror {} is not there: a CBT saved mirrored is not restored",
            m.display()
        ));
    }
    let mut devices = Vec::new();
    let mut tracking_only = Vec::new();
    for (t, _) in &plan.tracks {
        if !state_open {
            // Tracking starts before anything writes; the saved CBT waits
            // for the state device (its own udev event persists this one).
            match open_attached(&t.path) {
                Ok(_) => {
                    if !json {
                        println!(
                            "{}: tracking (no state device open: no saved CBT restored now)",
                            t.path.display()
                        );
                    }
                    tracking_only.push(t.path.display().to_string());
                }
                Err(e) => fail(e.to_string()),
            }
            continue;
        }
        match attach_and_persist(&t.path, &t.id, t.accept_missed_writes) {
            Ok(p) => {
                if json {
                    devices.push(persist_json(&t.path, &t.id, &p));
                } else {
                    println!("{}", persist_line(&t.path, &t.id, &p));
                }
            }
            Err(e) => fail(e.to_string()),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "config": config.display().to_string(),
                "state": state_out,
                "devices": devices,
                "tracking_only": tracking_only,
            })
        );
    }
    if errors > 0 {
        return Err((exit::FAILED, boot_failed(errors)));
    }
    Ok(())
}

fn snapshot(cmd: SnapshotCommand, json: bool) -> Result<(), blksnap::Error> {
    match cmd {
        SnapshotCommand::Create {
            store,
            memory,
            devices,
            limit,
        } => {
            let ctl = Control::open()?;
            let id = match store {
                Some(store) => ctl.snapshot_create(&store, limit >> 9)?,
                None if memory => ctl.snapshot_create_memory(limit >> 9)?,
                None => {
                    debug_assert!(devices);
                    ctl.snapshot_create_devices()?
                }
            };
            if json {
                println!("{}", serde_json::json!({ "id": id.to_string() }));
            } else {
                println!("{id}");
            }
        }
        SnapshotCommand::Add { id, device } => Tracker::open(&device)?.snapshot_add(&id)?,
        SnapshotCommand::Take { .. } => unreachable!("run by take_cmd"),
        SnapshotCommand::Destroy { id } => Control::open()?.snapshot_destroy(&id)?,
        SnapshotCommand::List => {
            let ids = Control::open()?.snapshot_collect()?;
            if json {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                println!("{}", serde_json::json!({ "snapshots": ids }));
            } else {
                for id in ids {
                    println!("{id}");
                }
            }
        }
        SnapshotCommand::Watch { id, timeout } => {
            let ctl = Control::open()?;
            let limit = timeout.map(|t| std::time::Duration::from_secs(t.into()));
            let mut last = std::time::Instant::now();
            loop {
                // Each wait is cut to what is left of the timeout: a wait
                // ends early when a signal interrupts it.
                let ms = match limit {
                    Some(limit) => {
                        let left = limit.saturating_sub(last.elapsed());
                        if left.is_zero() {
                            return Ok(());
                        }
                        left.as_millis().clamp(1, u32::MAX.into()) as u32
                    }
                    None => u32::MAX,
                };
                match ctl.snapshot_wait_event(&id, ms) {
                    Ok(Some(ev)) => {
                        if json {
                            println!("{}", serde_json::to_string(&ev).unwrap());
                        } else {
                            println!("{ev:?}");
                        }
                        last = std::time::Instant::now();
                    }
                    Ok(None) => {}
                    Err(e) if e.errno == nix::errno::Errno::ESRCH => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        SnapshotCommand::Info { device } => {
            let info = Tracker::open(&device)?.snapshot_info()?;
            if json {
                println!("{}", serde_json::to_string(&info).unwrap());
            } else {
                println!(
                    "image: {}",
                    if info.image.is_empty() {
                        "-"
                    } else {
                        &info.image
                    }
                );
                println!("error: {}", info.error_code);
            }
        }
    }
    Ok(())
}

/// A progress bar on a terminal.
struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn update(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn backup_cmd(cmd: BackupCommand, json: bool) -> Result<(), (u8, String)> {
    let (args, kind, verify_source) = match cmd {
        BackupCommand::List { dir } => return list_cmd(&dir, json),
        BackupCommand::Prune {
            dir,
            keep,
            device,
            crash_after,
        } => return prune_cmd(&dir, keep, device.as_deref(), crash_after.as_deref(), json),
        BackupCommand::Full(args) => (args, Kind::Full, false),
        BackupCommand::Incremental {
            args,
            differential,
            verify_source,
        } => (
            args,
            if differential {
                Kind::Differential
            } else {
                Kind::Incremental
            },
            verify_source,
        ),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed));
    }
    let progress = progress(json);
    let progress = progress.as_ref();
    let log = |m: &str| eprintln!("blksnapctl: {m}");
    let hooks = args.hooks.load()?;
    let result = backup::run(&backup::Options {
        devices: &args.devices,
        store: &args.store,
        limit_sectors: args.limit >> 9,
        dir: &args.to,
        kind,
        stop: &stop,
        progress,
        log: &log,
        keep_snapshot: args.keep_snapshot,
        layout: match args.format {
            Format::Qcow2 => backup::Layout::Points,
            Format::Raw => backup::Layout::Raw,
        },
        verify_source,
        hooks: &hooks,
    });
    match result {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report).unwrap());
            } else {
                if let Some(id) = &report.snapshot {
                    println!("snapshot {id} kept");
                }
                for o in report.devices {
                    println!(
                        "{}: {:?} backup ({}), device {}, read {}, wrote {} ({:.1}% of the device) -> {}",
                        o.device,
                        o.kind,
                        match o.method {
                            backup::Method::Full => "whole device",
                            backup::Method::Cbt => "changed blocks by the change map",
                            backup::Method::Digest => "changed blocks by digest",
                        },
                        mib(o.size),
                        mib(o.copied.read),
                        mib(o.copied.written),
                        100.0 * o.copied.read as f64 / o.size.max(1) as f64,
                        match o.point {
                            Some(n) => format!("point {n}, {}", o.file.display()),
                            None => o.manifest.display().to_string(),
                        }
                    );
                }
            }
            post_thaw_failed(report.hooks.as_ref())
        }
        Err(e) if stop.load(Ordering::Relaxed) => Err((
            exit::INTERRUPTED,
            match args.format {
                Format::Raw => format!(
                    "interrupted ({e}); the snapshot is destroyed and the backup is marked in-progress"
                ),
                Format::Qcow2 => format!(
                    "interrupted ({e}); the snapshot is destroyed and no restore point was made"
                ),
            },
        )),
        Err(e) => Err((exit::FAILED, e)),
    }
}

/// A progress bar on a terminal, else nothing.
fn progress(json: bool) -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() && !json {
        Box::new(Bar(indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap(),
        )))
    } else {
        Box::new(backup::Quiet)
    }
}

fn list_cmd(dir: &Path, json: bool) -> Result<(), (u8, String)> {
    let failed = |e: String| (exit::FAILED, e);
    let chains = points::chains(dir).map_err(failed)?;
    if chains.is_empty() {
        return Err(failed(format!("{}: no restore points", dir.display())));
    }
    let mut rows = Vec::new();
    for (name, chain) in &chains {
        for p in points::scan(chain).map_err(failed)? {
            rows.push((name.clone(), p));
        }
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(name, p)| {
                serde_json::json!({
                    "device": name,
                    "point": p.number,
                    "time": p.manifest.time,
                    "kind": p.manifest.kind,
                    "method": p.manifest.method,
                    "status": p.manifest.status,
                    "backing": p.manifest.backing,
                    "merged": p.manifest.merged,
                    "size": p.manifest.size,
                    "bytes_read": p.manifest.bytes_read,
                    "bytes_written": p.manifest.bytes_written,
                    "allocated": p.allocated,
                    "sha256": p.manifest.sha256,
                    "image": p.image,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<10} {:>5}  {:<19}  {:<11}  {:<6}  {:>10}  {:>10}  {:<11}  BACKING",
        "DEVICE", "POINT", "TIME (UTC)", "KIND", "METHOD", "COPIED", "FILE", "STATUS"
    );
    for (name, p) in rows {
        let m = &p.manifest;
        let kind = match (m.kind, m.merged) {
            (_, true) => "base*",
            (Kind::Full, _) => "full",
            (Kind::Incremental, _) => "incremental",
            (Kind::Differential, _) => "differential",
        };
        println!(
            "{:<10} {:>5}  {:<19}  {:<11}  {:<6}  {:>10}  {:>10}  {:<11}  {}",
            name,
            p.number,
            m.time.map(points::utc).unwrap_or_default(),
            kind,
            match m.method {
                Some(backup::Method::Full) => "full",
                Some(backup::Method::Cbt) => "cbt",
                Some(backup::Method::Digest) => "digest",
                None => "-",
            },
            mib(m.bytes_read),
            mib(p.allocated),
            match m.status {
                backup::Status::Complete => "complete",
                backup::Status::InProgress => "incomplete",
            },
            m.backing.as_deref().unwrap_or("-")
        );
    }
    println!("(COPIED: bytes read from the snapshot; FILE: the point's image on disk; base*: merged by a prune)");
    Ok(())
}

fn prune_cmd(
    dir: &Path,
    keep: usize,
    device: Option<&str>,
    crash_after: Option<&str>,
    json: bool,
) -> Result<(), (u8, String)> {
    let failed = |e: String| (exit::FAILED, e);
    let chains: Vec<PathBuf> = match device {
        Some(_) => vec![points::chain(dir, device).map_err(failed)?],
        None => points::chains(dir)
            .map_err(failed)?
            .into_iter()
            .map(|c| c.1)
            .collect(),
    };
    if chains.is_empty() {
        return Err(failed(format!("{}: no restore points", dir.display())));
    }
    let log = |m: &str| eprintln!("blksnapctl: {m}");
    let mut out = Vec::new();
    for chain in chains {
        let r = points::prune(&chain, keep, &log, crash_after).map_err(|e| {
            if e.starts_with(points::CRASHED) {
                (137, e)
            } else {
                failed(e)
            }
        })?;
        if !json {
            println!(
                "{}: {}{}{}",
                chain.display(),
                match r.merged {
                    Some(n) => format!("point {n} is now a base ({}); ", mib(r.merged_bytes)),
                    None => String::new(),
                },
                if r.removed.is_empty() {
                    "no point removed".to_string()
                } else {
                    format!("removed points {:?}", r.removed)
                },
                if r.leftovers.is_empty() {
                    String::new()
                } else {
                    format!("; removed leftovers {:?}", r.leftovers)
                }
            );
        }
        out.push(serde_json::json!({ "chain": chain, "pruned": r }));
    }
    if json {
        println!("{}", serde_json::Value::Array(out));
    }
    Ok(())
}

fn verify_cmd(dir: &Path, device: Option<&str>, json: bool) -> Result<(), (u8, String)> {
    let failed = |e: String| (exit::FAILED, e);
    let chain = points::chain(dir, device).map_err(failed)?;
    let progress = progress(json);
    let checked = points::verify(&chain, progress.as_ref()).map_err(failed)?;
    let bad = checked.iter().filter(|c| c.error.is_some()).count();
    if json {
        println!(
            "{}",
            serde_json::json!({ "ok": bad == 0, "points": checked })
        );
    } else {
        for c in &checked {
            match &c.error {
                None => println!(
                    "point {}: OK ({})",
                    c.number,
                    match &c.sha256 {
                        Some(sum) => format!("digests and sha256 {sum} as recorded"),
                        None => "digests as recorded".into(),
                    }
                ),
                Some(e) => println!("point {}: FAILED: {e}", c.number),
            }
        }
    }
    if checked.is_empty() {
        return Err(failed(format!(
            "{}: no complete restore point",
            chain.display()
        )));
    }
    if bad > 0 {
        return Err((
            exit::MISMATCH,
            format!("{bad} of {} points failed", checked.len()),
        ));
    }
    Ok(())
}

fn verify_source_cmd(
    device: &Path,
    dir: &Path,
    store: Option<&Path>,
    limit: u64,
    repair: bool,
    hooks: &blksnap::hooks::Hooks,
    json: bool,
) -> Result<(), (u8, String)> {
    let store = store.ok_or((2, "--source needs --store".to_string()))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed));
    }
    let progress = progress(json);
    let log = |m: &str| eprintln!("blksnapctl: {m}");
    let r = blksnap::source::verify(&blksnap::source::Options {
        device,
        dir,
        store,
        limit_sectors: limit >> 9,
        repair,
        stop: &stop,
        progress: progress.as_ref(),
        log: &log,
        hooks,
    })
    .map_err(|e| {
        if stop.load(Ordering::Relaxed) {
            (
                exit::INTERRUPTED,
                format!("interrupted ({e}); the snapshot is destroyed"),
            )
        } else {
            (exit::FAILED, e)
        }
    })?;
    let f = &r.found;
    let missed: u64 = f.missed.iter().map(|m| m.end - m.start).sum();
    if json {
        println!("{}", serde_json::to_string(&r).unwrap());
    } else {
        println!(
            "{}: read {} of the device; {} blocks of {} KiB differ from point {} of {}",
            r.device,
            mib(r.bytes_read),
            f.differ,
            blksnap::digest::BLOCK >> 10,
            r.point,
            r.chain.display()
        );
        if f.cbt {
            println!(
                "  {} of them marked by the change map since point {} (the next incremental copies them)",
                f.explained, r.point
            );
            if f.missed.is_empty() {
                println!("  none missed: the chain and the change map account for the device");
            } else {
                println!(
                    "  MISSED by the change map: {} blocks ({missed} bytes); the chain does not hold them and no CBT incremental would copy them:",
                    f.missed.len()
                );
                for l in f.missed_lines(64) {
                    println!("    missed {l}");
                }
            }
        } else {
            println!(
                "  the change map cannot say which of them changed since point {}: {}",
                r.point,
                f.why_not.as_deref().unwrap_or("")
            );
            println!("  (the next incremental is a digest incremental: it copies every block that differs)");
            for &(a, b) in f.unexplained.iter().take(64) {
                println!("    differ: bytes {a}..{b}");
            }
            if f.unexplained.len() > 64 {
                println!("    ... and {} more ranges", f.unexplained.len() - 64);
            }
        }
        if let Some(o) = &r.repaired {
            println!(
                "REPAIRED: point {} made from the same snapshot, with every block that differs ({} written); it equals the device -> {}",
                o.point.unwrap_or(0),
                mib(o.copied.written),
                o.file.display()
            );
        } else if !f.missed.is_empty() && !repair {
            println!("  (`blksnapctl verify --source {} {} --store ... --repair` makes a point that includes them)", r.device, dir.display());
        }
    }
    if !f.missed.is_empty() {
        let what = if r.repaired.is_some() {
            "; they are in the new point"
        } else {
            ""
        };
        return Err((
            exit::MISMATCH,
            format!(
                "{}: the change map missed {} blocks ({missed} bytes) that differ from point {}{what}",
                r.device,
                f.missed.len(),
                r.point
            ),
        ));
    }
    post_thaw_failed(r.hooks.as_ref())
}

/// `snapshot take`: the take between the hooks.
fn take_cmd(
    id: &SnapshotId,
    devices: &[PathBuf],
    hooks: &HookArgs,
    json: bool,
) -> Result<(), (u8, String)> {
    let hooks = hooks.load()?;
    let failed = |e: String| (exit::FAILED, e);
    let ctl = Control::open().map_err(|e| failed(e.to_string()))?;
    let log = |m: &str| eprintln!("blksnapctl: {m}");
    let ctx = blksnap::hooks::Context {
        snapshot: id.to_string(),
        devices,
    };
    let (ms, ran) = hooks
        .around(&ctx, &log, || {
            let start = std::time::Instant::now();
            // With the file systems on devices stacked over the
            // snapshot's frozen too (LVM, dm-crypt, md).
            blksnap::backup::take(&ctl, id, devices, &log)?;
            // The take's time, without the process start.
            Ok(start.elapsed().as_secs_f64() * 1000.0)
        })
        .map_err(|e| {
            failed(if e.starts_with("the snapshot is not taken") {
                format!("{e}\nsnapshot {id} is still there, not taken: take it again or destroy it")
            } else {
                e
            })
        })?;
    if json {
        let mut v = serde_json::json!({ "id": id.to_string(), "ioctl_ms": ms });
        if !hooks.is_empty() {
            v["hooks"] = serde_json::to_value(&ran).unwrap();
        }
        println!("{v}");
    }
    post_thaw_failed((!hooks.is_empty()).then_some(&ran))
}

fn restore_cmd(
    dir: &Path,
    point: u32,
    target: &Path,
    device: Option<&str>,
    force: bool,
    json: bool,
) -> Result<(), (u8, String)> {
    let failed = |e: String| (exit::FAILED, e);
    let chain = points::chain(dir, device).map_err(failed)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed));
    }
    let progress = progress(json);
    let r =
        points::restore(&chain, point, target, force, &stop, progress.as_ref()).map_err(|e| {
            if stop.load(Ordering::Relaxed) {
                (
                    exit::INTERRUPTED,
                    format!("interrupted ({e}): {} is partly written", target.display()),
                )
            } else if e.contains(points::DAMAGED) {
                (exit::MISMATCH, e)
            } else {
                failed(e)
            }
        })?;
    if json {
        println!("{}", serde_json::to_string(&r).unwrap());
    } else {
        println!(
            "restored point {} of {} to {}: {} in {:.1} s ({} zeroed), read back: sha256 {}, digests as recorded",
            r.point,
            chain.display(),
            r.target.display(),
            mib(r.size),
            r.seconds,
            mib(r.zeroed),
            r.sha256
        );
    }
    Ok(())
}

fn digest_bench(file: &Path, size: u64, rounds: usize, json: bool) -> Result<(), (u8, String)> {
    let rows = blksnap::bench::run(file, size, rounds).map_err(|e| (exit::FAILED, e))?;
    if json {
        println!("{}", serde_json::to_string(&rows).unwrap());
        return Ok(());
    }
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}: {} MiB, {} rounds (median MB/s; ratio to the read of the same kind), {} CPUs, the pipeline digests on {} thread(s)",
        file.display(),
        len >> 20,
        rounds,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        blksnap::digest::threads()
    );
    let base = |direct: bool| {
        rows.iter()
            .find(|r| r.direct == Some(direct) && r.threads == 0)
            .map_or(1.0, |r| r.mb_s)
    };
    for r in &rows {
        let (kind, b) = match r.direct {
            Some(true) => ("direct I/O", base(true)),
            Some(false) => ("page cache", base(false)),
            None => ("memory", base(false)),
        };
        let rounds: Vec<String> = r.rounds.iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "  {:<10}  {:<50}  {:>8.0} MB/s  {:>5.2}  [{}]",
            kind,
            r.what,
            r.mb_s,
            r.mb_s / b,
            rounds.join(", ")
        );
    }
    Ok(())
}

fn generate(cmd: GenerateCommand) -> Result<(), (u8, String)> {
    match cmd {
        GenerateCommand::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(|e| (exit::FAILED, e.to_string()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .map_err(|e| (exit::FAILED, e.to_string()))?;
        }
        GenerateCommand::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "blksnapctl",
                &mut std::io::stdout(),
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let r = match cli.command {
        Command::Backup(cmd) => backup_cmd(cmd, json),
        Command::Verify {
            path,
            source: Some(source),
            store,
            limit,
            repair,
            hooks,
            ..
        } => hooks.load().and_then(|h| {
            verify_source_cmd(&source, &path, store.as_deref(), limit, repair, &h, json)
        }),
        Command::Verify { hooks, .. } if hooks.given() => Err((
            2,
            "the hook options (--pre-freeze, --post-thaw, --hooks-dir, --no-hooks, --hook-timeout) go with --source: only it takes a snapshot".into(),
        )),
        Command::Verify {
            path,
            manifest: Some(manifest),
            ..
        } => match backup::verify(&path, &manifest) {
            Ok(sum) => {
                if json {
                    println!("{}", serde_json::json!({ "ok": true, "sha256": sum }));
                } else {
                    println!("{}: OK (sha256 {sum})", path.display());
                }
                Ok(())
            }
            Err(e) => Err((exit::MISMATCH, e)),
        },
        Command::Verify {
            path,
            manifest: None,
            device,
            ..
        } => verify_cmd(&path, device.as_deref(), json),
        Command::Restore {
            point,
            dir,
            target,
            device,
            force,
        } => restore_cmd(&dir, point, &target, device.as_deref(), force, json),
        Command::Generate(cmd) => generate(cmd),
        Command::DigestBench { file, size, rounds } => digest_bench(&file, size, rounds, json),
        Command::Cbt(CbtCommand::Boot { config, device }) => {
            cbt_boot(&config, device.as_deref(), json)
        }
        Command::Snapshot(SnapshotCommand::Take { id, devices, hooks }) => {
            take_cmd(&id, &devices, &hooks, json)
        }
        command => run(Cli { json, command }).map_err(|e| (exit::FAILED, e.to_string())),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("blksnapctl: {e}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn persisted(restored: Restore) -> Persisted {
        Persisted {
            restored,
            generation: [
                0x0d, 0x4f, 0x2a, 0x9c, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 1,
            ],
            writes_before: Some(0),
            proof: 1,
        }
    }

    #[test]
    fn persist_lines() {
        let dev = Path::new("/dev/vdb");
        let id = "/dev/disk/by-id/virtio-b";
        assert_eq!(
            persist_line(dev, id, &persisted(Restore::Restored)),
            "/dev/vdb: CBT restored (generation 0d4f2a9c-0000-4000-8000-000000000001; \
             proof at the next save: ext4 superblock)"
        );
        assert_eq!(
            persist_line(dev, id, &persisted(Restore::NoneSaved)),
            "/dev/vdb: no saved CBT under /dev/disk/by-id/virtio-b (proof at the next save: \
             ext4 superblock)"
        );
        let raw = Persisted {
            proof: 0,
            ..persisted(Restore::NoneSaved)
        };
        assert!(persist_line(dev, id, &raw).ends_with(
            "(nothing proves it unwritten while not tracked (no file system): its saved CBT is \
             refused unless its `track` line ends with `accept-missed-writes`)"
        ));
        assert_eq!(
            persist_line(dev, id, &persisted(Restore::Refused(Errno::EMEDIUMTYPE))),
            "/dev/vdb: saved CBT not used: EMEDIUMTYPE, its size or CBT geometry differs \
             from the saved one; the next incremental reads the whole device"
        );
        let early = Persisted {
            writes_before: Some(12),
            ..persisted(Restore::Refused(Errno::EBUSY))
        };
        assert!(persist_line(dev, id, &early)
            .contains("(12 writes counted before or since the attach); the next incremental"));
        for e in [
            Errno::ESTALE,
            Errno::EXDEV,
            Errno::ENOKEY,
            Errno::EKEYREJECTED,
        ] {
            let l = persist_line(dev, id, &persisted(Restore::Refused(e)));
            assert!(l.contains(&Restore::reason(e)), "{l}");
            assert_ne!(Restore::reason(e), e.desc(), "{e:?} has words of its own");
        }
    }

    #[test]
    fn persist_json_keys() {
        let dev = Path::new("/dev/vdb");
        let v = persist_json(dev, "b", &persisted(Restore::Restored));
        assert_eq!(
            v,
            serde_json::json!({
                "device": "/dev/vdb",
                "id": "b",
                "restored": true,
                "refused": null,
                "reason": null,
                "generation": "0d4f2a9c-0000-4000-8000-000000000001",
                "writes_before": 0,
                "proof": "ext4 superblock",
            })
        );
        let v = persist_json(dev, "b", &persisted(Restore::Refused(Errno::EMEDIUMTYPE)));
        assert_eq!(v["restored"], false);
        assert_eq!(v["refused"], "EMEDIUMTYPE");
        let v = persist_json(dev, "b", &persisted(Restore::NoneSaved));
        assert_eq!(v["restored"], false);
        assert_eq!(v["refused"], serde_json::Value::Null);
    }

    #[test]
    fn state_lines() {
        let p = Path::new("/dev/vdh");
        let s = blksnap::StateDevice {
            records: 2,
            clean: true,
        };
        assert_eq!(
            state_line(p, &s),
            "state device /dev/vdh: 2 saved device states, clean"
        );
        let s = blksnap::StateDevice {
            records: 2,
            clean: false,
        };
        assert_eq!(
            state_line(p, &s),
            "state device /dev/vdh: 2 saved device states, not clean: they will not be used"
        );
        assert_eq!(
            state_json(p, &s),
            serde_json::json!({"device": "/dev/vdh", "records": 2, "clean": false})
        );
    }
}
