// SPDX-License-Identifier: GPL-2.0

//! blksnapctl: drive the blksnap kernel module from the command line.

use blksnap::{changed_ranges, Control, MapKind, SectorRange, SnapshotId, Tracker};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "blksnapctl",
    version,
    about = "Change block tracking and snapshots of block devices (blksnap)",
    after_help = "Examples:\n  blksnapctl attach /dev/vdb\n  blksnapctl cbt info /dev/vdb\n  blksnapctl cbt read --active /dev/vdb\n  blksnapctl cbt mark /dev/vdb 0:8 2048:16\n  blksnapctl detach /dev/vdb"
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
    /// Take a snapshot: all its devices at one instant.
    Take { id: SnapshotId },
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
            let info = Tracker::open(&device)?.cbt_info()?;
            if cli.json {
                println!("{}", serde_json::to_string(&info).unwrap());
            } else {
                println!("device:         {}", device.display());
                println!("capacity:       {} bytes", info.device_capacity);
                println!("block size:     {} bytes", info.block_size);
                println!("blocks:         {}", info.block_count);
                println!("generation:     {}", info.generation);
                println!("changes number: {}", info.changes_number);
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
        Command::Snapshot(cmd) => snapshot(cmd, cli.json)?,
        Command::Store(StoreCommand::Append { id, device, ranges }) => {
            Control::open()?.snapshot_append_storage(&id, &device, &ranges)?
        }
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
        SnapshotCommand::Take { id } => Control::open()?.snapshot_take(&id)?,
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
            let ms = timeout.map(|t| t.saturating_mul(1000)).unwrap_or(u32::MAX);
            loop {
                match ctl.snapshot_wait_event(&id, ms) {
                    Ok(ev) => {
                        if json {
                            println!("{}", serde_json::to_string(&ev).unwrap());
                        } else {
                            println!("{ev:?}");
                        }
                    }
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blksnapctl: {e}");
            ExitCode::FAILURE
        }
    }
}
