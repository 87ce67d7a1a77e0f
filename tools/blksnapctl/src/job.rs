// SPDX-License-Identifier: GPL-2.0

//! Backup jobs: the agent's daily routine. A job file (by default
//! `/etc/blksnap/jobs/NAME.conf`) says what to back up, where, and how many
//! points to keep:
//!
//! ```text
//! # comment
//! device /dev/disk/by-id/virtio-data   # one or more: one snapshot of all
//! device /dev/disk/by-id/virtio-logs
//! store /var/tmp                       # difference storage: a directory, file or device
//! limit 4G                             # its largest size (default 1G)
//! to /backup/data                      # the backup directory
//! keep 14                              # points kept per device (default: all)
//! verify-source                        # incrementals also check the device (a full read)
//! ```
//!
//! `blksnapctl job run NAME` ([`run`]) checks that the backup directory
//! exists (it is not made: a missing one is a backup disk not mounted), makes a full backup when a device
//! has no complete point yet (of all the job's devices: one snapshot),
//! else an incremental, then prunes each device's chain to `keep` points.
//! It records the run's result in the backup directory, `last-run.json`
//! ([`Record`], written atomically): `running` when it starts, then `ok`
//! or `failed` with a one-line reason; `blksnapctl backup list DIR` shows
//! it.

use crate::backup::{self, Kind, Method, Progress};
use crate::points;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Where `blksnapctl job run NAME` finds `NAME.conf`.
pub const JOBS_DIR: &str = "/etc/blksnap/jobs";

/// The file of a job's last run, in its backup directory.
pub const LAST_RUN: &str = "last-run.json";

/// Default largest size of the difference storage.
pub const DEFAULT_LIMIT: u64 = 1 << 30;

/// A parsed job file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The devices, in file order.
    pub devices: Vec<PathBuf>,
    /// The difference storage.
    pub store: PathBuf,
    /// Its largest size in bytes.
    pub limit: u64,
    /// The backup directory.
    pub to: PathBuf,
    /// Points kept per device; None keeps all.
    pub keep: Option<usize>,
    /// Incrementals check the device too.
    pub verify_source: bool,
}

/// Parses a size like `4G`, `512M` or bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
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

/// Cuts a comment: `#` at the start of the line or after white space.
fn strip_comment(line: &str) -> &str {
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_space {
            return &line[..i];
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// Parses the text of a job file. Errors name the line.
pub fn parse(text: &str) -> Result<Job, String> {
    let mut devices: Vec<PathBuf> = Vec::new();
    let mut store = None;
    let mut limit = None;
    let mut to = None;
    let mut keep = None;
    let mut verify_source = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let words: Vec<&str> = strip_comment(line).split_whitespace().collect();
        let Some((&keyword, args)) = words.split_first() else {
            continue;
        };
        let one = || match args {
            [v] => Ok(*v),
            _ => Err(format!("line {n}: expected `{keyword} VALUE`")),
        };
        let path = || {
            let v = one()?;
            if !v.starts_with('/') {
                return Err(format!(
                    "line {n}: `{keyword}` needs an absolute path, not `{v}`"
                ));
            }
            Ok(PathBuf::from(v))
        };
        let twice = |set: bool| {
            if set {
                Err(format!("line {n}: a second `{keyword}` line"))
            } else {
                Ok(())
            }
        };
        match keyword {
            "device" => {
                let p = path()?;
                if devices.contains(&p) {
                    return Err(format!("line {n}: `{}` is listed twice", p.display()));
                }
                devices.push(p);
            }
            "store" => {
                twice(store.is_some())?;
                store = Some(path()?);
            }
            "to" => {
                twice(to.is_some())?;
                to = Some(path()?);
            }
            "limit" => {
                twice(limit.is_some())?;
                let v = parse_size(one()?).map_err(|e| format!("line {n}: {e}"))?;
                if v < 1 << 20 {
                    return Err(format!("line {n}: a limit of {v} bytes is below 1M"));
                }
                limit = Some(v);
            }
            "keep" => {
                twice(keep.is_some())?;
                let v = one()?;
                let k: usize = v
                    .parse()
                    .map_err(|_| format!("line {n}: `keep` needs a number of points, not `{v}`"))?;
                if k == 0 {
                    return Err(format!("line {n}: `keep 0` would remove every point"));
                }
                keep = Some(k);
            }
            "verify-source" => {
                if !args.is_empty() {
                    return Err(format!("line {n}: `verify-source` takes no value"));
                }
                verify_source = true;
            }
            _ => {
                return Err(format!(
                    "line {n}: unknown directive `{keyword}` (device, store, limit, to, keep, verify-source)"
                ))
            }
        }
    }
    if devices.is_empty() {
        return Err("no `device` line: nothing to back up".into());
    }
    Ok(Job {
        devices,
        store: store.ok_or("no `store` line: the snapshot needs a difference storage")?,
        limit: limit.unwrap_or(DEFAULT_LIMIT),
        to: to.ok_or("no `to` line: where do the backups go?")?,
        keep,
        verify_source,
    })
}

/// The job file of `job`: a path (with a `/`) as it is, a name in
/// `jobs_dir`; and the job's name (the file's, without `.conf`).
pub fn locate(job: &str, jobs_dir: &Path) -> (PathBuf, String) {
    if job.contains('/') {
        let p = PathBuf::from(job);
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".conf").to_string())
            .unwrap_or_else(|| job.to_string());
        (p, name)
    } else {
        (jobs_dir.join(format!("{job}.conf")), job.to_string())
    }
}

/// Loads a job file.
pub fn load(path: &Path) -> Result<Job, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Started, not finished: running, or killed.
    Running,
    /// Backed up and pruned.
    Ok,
    /// See the reason.
    Failed,
}

/// One point a run made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Made {
    /// The device.
    pub device: String,
    /// The point's number.
    pub point: Option<u32>,
    /// What it is.
    pub kind: Kind,
    /// How it found what to copy.
    pub method: Method,
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Bytes written to the point.
    pub bytes_written: u64,
}

/// What a prune of one chain did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    /// The chain.
    pub chain: String,
    /// The point that became the base, if any.
    pub merged: Option<u32>,
    /// The points removed.
    pub removed: Vec<u32>,
}

/// The result of a job's run, `last-run.json` in its backup directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The job's name.
    pub job: String,
    /// How it ended.
    pub status: Status,
    /// Why it failed: one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it started, seconds since the epoch (UTC).
    pub started: u64,
    /// Seconds it took.
    #[serde(default)]
    pub seconds: f64,
    /// The process that ran it.
    pub pid: u32,
    /// What it made: full or incremental (None until decided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// The points made.
    #[serde(default)]
    pub points: Vec<Made>,
    /// The prunes.
    #[serde(default)]
    pub pruned: Vec<Pruned>,
}

impl Record {
    /// Bytes read and written by the run's backups.
    pub fn bytes(&self) -> (u64, u64) {
        self.points
            .iter()
            .fold((0, 0), |(r, w), p| (r + p.bytes_read, w + p.bytes_written))
    }

    /// Writes the record to `dir/last-run.json` atomically (temporary
    /// file, fsync, rename, fsync of the directory).
    pub fn store(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join(LAST_RUN);
        let tmp = dir.join(format!(".{LAST_RUN}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let mut f = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    /// Reads `dir/last-run.json`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(LAST_RUN);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{}: not a run record: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The record as one line, for `backup list`; `running` says whether
    /// the process that wrote a `running` record still runs.
    pub fn line(&self, running: bool) -> String {
        let when = crate::points::utc(self.started);
        let job = &self.job;
        match self.status {
            Status::Running if running => {
                format!("last run: job {job}, started {when} UTC, running (pid {})", self.pid)
            }
            Status::Running => format!(
                "last run: job {job}, started {when} UTC, did not finish (pid {} is gone: killed, or the machine stopped)",
                self.pid
            ),
            Status::Failed => format!(
                "last run: job {job}, {when} UTC, FAILED after {:.1} s: {}",
                self.seconds,
                self.reason.as_deref().unwrap_or("(no reason recorded)")
            ),
            Status::Ok => {
                let (read, written) = self.bytes();
                let points: Vec<String> = self
                    .points
                    .iter()
                    .map(|p| {
                        format!(
                            "{} point {}",
                            Path::new(&p.device)
                                .file_name()
                                .map_or(p.device.clone(), |n| n.to_string_lossy().to_string()),
                            p.point.map_or("?".into(), |n| n.to_string())
                        )
                    })
                    .collect();
                let removed: usize = self.pruned.iter().map(|p| p.removed.len()).sum();
                format!(
                    "last run: job {job}, {when} UTC, ok in {:.1} s: {} {} ({}), read {}, wrote {}; pruned {removed} point{}",
                    self.seconds,
                    match self.kind {
                        Some(Kind::Full) => "full",
                        Some(Kind::Incremental) => "incremental",
                        Some(Kind::Differential) => "differential",
                        None => "-",
                    },
                    if self.points.len() == 1 { "backup" } else { "backups" },
                    points.join(", "),
                    mib(read),
                    mib(written),
                    if removed == 1 { "" } else { "s" }
                )
            }
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Makes an error one line.
pub fn one_line(e: &str) -> String {
    e.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether every device has a complete point in `dir`: an incremental can
/// be made of them all.
pub fn kind_for(job: &Job) -> Result<Kind, String> {
    for d in &job.devices {
        if points::latest(&points::chain_dir(&job.to, d))?.is_none() {
            return Ok(Kind::Full);
        }
    }
    Ok(Kind::Incremental)
}

/// Runs a job: a backup and a prune ([`crate::job`]), recording the
/// result in its backup directory. Returns the record; a failed run is an
/// `Err` with the one-line reason (also in the record, if it could be
/// written).
pub fn run(
    job: &Job,
    name: &str,
    stop: &AtomicBool,
    progress: &dyn Progress,
    log: &dyn Fn(&str),
) -> Result<Record, String> {
    let started = Instant::now();
    let mut rec = Record {
        job: name.to_string(),
        status: Status::Running,
        reason: None,
        started: now(),
        seconds: 0.0,
        pid: std::process::id(),
        kind: None,
        points: Vec::new(),
        pruned: Vec::new(),
    };
    // The backup directory is not made: one missing is a backup disk not
    // mounted, and backups must not fill the file system below instead.
    match std::fs::metadata(&job.to) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(format!("the backup directory {} is not a directory", job.to.display())),
        Err(e) => {
            return Err(one_line(&format!(
                "the backup directory {}: {e} (a backup disk not mounted? make the directory for a new job)",
                job.to.display()
            )))
        }
    }
    // Nothing is done unless the result can be recorded.
    rec.store(&job.to)
        .map_err(|e| one_line(&format!("cannot record the run: {e}")))?;
    let r = (|| {
        // The hooks directory's hooks (application-consistent takes), as
        // for `backup full`: $BLKSNAP_HOOKS_DIR, else /etc/blksnap/hooks.d.
        let (dir, dir_explicit) = crate::hooks::Settings::choose_dir(None, false);
        let hooks = crate::hooks::Hooks::load(&crate::hooks::Settings {
            dir,
            dir_explicit,
            timeout: std::time::Duration::from_secs(60),
            ..Default::default()
        })?;
        let kind = kind_for(job)?;
        rec.kind = Some(kind);
        let report = backup::run(&backup::Options {
            devices: &job.devices,
            store: &job.store,
            limit_sectors: job.limit >> 9,
            dir: &job.to,
            kind,
            stop,
            progress,
            log,
            keep_snapshot: false,
            layout: backup::Layout::Points,
            verify_source: job.verify_source && kind == Kind::Incremental,
            hooks: &hooks,
        })?;
        // A failed post-thaw hook leaves a valid backup (recorded and
        // pruned below) but fails the run.
        let hook_failure = report.hooks.as_ref().and_then(|r| r.post_failure_message());
        for o in &report.devices {
            rec.points.push(Made {
                device: o.device.clone(),
                point: o.point,
                kind: o.kind,
                method: o.method,
                bytes_read: o.copied.read,
                bytes_written: o.copied.written,
            });
        }
        if rec.points.iter().any(|p| p.kind == Kind::Full) {
            // A fallback (a device changed size, a chain that cannot be
            // built on) shows in the record.
            rec.kind = Some(if rec.points.iter().all(|p| p.kind == Kind::Full) {
                Kind::Full
            } else {
                Kind::Incremental
            });
        }
        if let Some(keep) = job.keep {
            for d in &job.devices {
                let chain = points::chain_dir(&job.to, d);
                let p = points::prune(&chain, keep, log, None).map_err(|e| {
                    format!(
                        "the backup is made, but the prune of {} failed: {e}",
                        chain.display()
                    )
                })?;
                rec.pruned.push(Pruned {
                    chain: chain.display().to_string(),
                    merged: p.merged,
                    removed: p.removed,
                });
            }
        }
        if let Some(m) = hook_failure {
            return Err(format!("the backup is made, but {m}"));
        }
        Ok::<(), String>(())
    })();
    rec.seconds = started.elapsed().as_secs_f64();
    match r {
        Ok(()) => {
            rec.status = Status::Ok;
            rec.store(&job.to).map_err(|e| {
                one_line(&format!("the backup is made, but its record is not: {e}"))
            })?;
            Ok(rec)
        }
        Err(e) => {
            let reason = one_line(&e);
            rec.status = Status::Failed;
            rec.reason = Some(reason.clone());
            match rec.store(&job.to) {
                Ok(()) => Err(reason),
                Err(w) => Err(one_line(&format!(
                    "{reason} (and the run could not be recorded: {w})"
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "# daily\n\
        device /dev/disk/by-id/virtio-data\n\
        device /dev/vdc1   # second\n\
        store /var/tmp\n\
        limit 4G\n\
        to /backup/data\n\
        keep 14\n\
        verify-source\n";

    #[test]
    fn parses_a_job() {
        let j = parse(EXAMPLE).unwrap();
        assert_eq!(
            j,
            Job {
                devices: vec![
                    PathBuf::from("/dev/disk/by-id/virtio-data"),
                    PathBuf::from("/dev/vdc1")
                ],
                store: PathBuf::from("/var/tmp"),
                limit: 4 << 30,
                to: PathBuf::from("/backup/data"),
                keep: Some(14),
                verify_source: true,
            }
        );
        let j = parse("device /dev/vdb\nstore /dev/vdc\nto /b\n").unwrap();
        assert_eq!(j.limit, DEFAULT_LIMIT);
        assert_eq!(j.keep, None);
        assert!(!j.verify_source);
    }

    #[test]
    fn bad_jobs_name_the_line() {
        for (text, want) in [
            ("device /dev/vdb\nstore /s\n", "no `to` line"),
            ("device /dev/vdb\nto /b\n", "no `store` line"),
            ("store /s\nto /b\n", "no `device` line"),
            (
                "device vdb\n",
                "line 1: `device` needs an absolute path, not `vdb`",
            ),
            (
                "device /dev/vdb\ndevice /dev/vdb\n",
                "line 2: `/dev/vdb` is listed twice",
            ),
            (
                "device /dev/vdb\nto /a\nto /b\n",
                "line 3: a second `to` line",
            ),
            ("keep 0\n", "line 1: `keep 0` would remove"),
            (
                "keep seven\n",
                "line 1: `keep` needs a number of points, not `seven`",
            ),
            ("limit 4Q\n", "line 1: size `4Q`"),
            ("limit 512K\n", "below 1M"),
            ("store /a /b\n", "line 1: expected `store VALUE`"),
            (
                "verify-source yes\n",
                "line 1: `verify-source` takes no value",
            ),
            ("\n\nretain 3\n", "line 3: unknown directive `retain`"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // A `#` inside a word is no comment.
        let j = parse("device /dev/disk/by-id/a#b\nstore /s\nto /b\n").unwrap();
        assert_eq!(j.devices[0], PathBuf::from("/dev/disk/by-id/a#b"));
    }

    #[test]
    fn job_files_by_name_or_path() {
        let d = Path::new("/etc/blksnap/jobs");
        assert_eq!(
            locate("data", d),
            (PathBuf::from("/etc/blksnap/jobs/data.conf"), "data".into())
        );
        assert_eq!(
            locate("/srv/jobs/db.conf", d),
            (PathBuf::from("/srv/jobs/db.conf"), "db".into())
        );
        assert_eq!(locate("./x.conf", d).1, "x");
    }

    fn record(status: Status) -> Record {
        Record {
            job: "data".into(),
            status,
            reason: None,
            started: 1_795_729_445,
            seconds: 3.25,
            pid: 4242,
            kind: Some(Kind::Incremental),
            points: vec![Made {
                device: "/dev/vdb".into(),
                point: Some(5),
                kind: Kind::Incremental,
                method: Method::Cbt,
                bytes_read: 3 << 20,
                bytes_written: 1 << 20,
            }],
            pruned: vec![Pruned {
                chain: "/backup/vdb".into(),
                merged: Some(3),
                removed: vec![1, 2],
            }],
        }
    }

    #[test]
    fn record_lines() {
        assert_eq!(
            record(Status::Ok).line(false),
            "last run: job data, 2026-11-26 21:44:05 UTC, ok in 3.2 s: incremental backup (vdb point 5), read 3.0 MiB, wrote 1.0 MiB; pruned 2 points"
        );
        let mut f = record(Status::Failed);
        f.reason = Some("/dev/vdb: No such file or directory".into());
        assert_eq!(
            f.line(false),
            "last run: job data, 2026-11-26 21:44:05 UTC, FAILED after 3.2 s: /dev/vdb: No such file or directory"
        );
        let r = record(Status::Running);
        assert!(
            r.line(true).ends_with("running (pid 4242)"),
            "{}",
            r.line(true)
        );
        assert!(r.line(false).contains("did not finish (pid 4242 is gone"));
    }

    #[test]
    fn record_is_stored_atomically_and_read_back() {
        let d = std::env::temp_dir().join(format!("blksnap-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(Record::load(&d).unwrap(), None);
        let r = record(Status::Ok);
        r.store(&d).unwrap();
        assert_eq!(Record::load(&d).unwrap(), Some(r.clone()));
        let mut f = record(Status::Failed);
        f.reason = Some("x".into());
        f.store(&d).unwrap();
        assert_eq!(Record::load(&d).unwrap(), Some(f));
        // No temporary file is left; only the record.
        let names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec![LAST_RUN.to_string()]);
        std::fs::write(d.join(LAST_RUN), b"{").unwrap();
        assert!(Record::load(&d).unwrap_err().contains("not a run record"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reasons_are_one_line() {
        assert_eq!(one_line("a\n  b\n\nc  "), "a; b; c");
    }
}
