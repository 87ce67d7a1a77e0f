// SPDX-License-Identifier: GPL-2.0

//! Hooks run around the take of a snapshot, for application-consistent
//! snapshots: a database flushes or checkpoints before the freeze
//! (`pre-freeze`) and is told after the thaw (`post-thaw`).
//!
//! The hooks of a take, in the order they run:
//!
//! 1. `pre-freeze`: every executable regular file of the hooks directory
//!    (default [`DEFAULT_DIR`]) in lexical order, called with the argument
//!    `pre-freeze`; then the `--pre-freeze` commands in the order given (run
//!    with `sh -c CMD blksnap-hook pre-freeze`).
//! 2. The take (the ioctl that freezes the file systems, switches the
//!    devices to copy-on-write and thaws them): the *freeze window*.
//! 3. `post-thaw`: the `--post-thaw` commands in the order given, then the
//!    directory's hooks whose `pre-freeze` ran, in reverse lexical order,
//!    called with `post-thaw`.
//!
//! Each hook runs in a process group of its own with stdin from /dev/null,
//! its stdout and stderr captured together (the last lines are kept), for at
//! most the timeout; a hook still running then is killed with its whole
//! process group (SIGKILL) and counts as failed. A hook may leave a process
//! behind (one that holds a lock until `post-thaw`): only the hook itself is
//! waited for, not its output's end.
//!
//! A `pre-freeze` hook that fails (a non-zero exit, a signal, the timeout)
//! aborts the take: no further `pre-freeze` hook runs and the snapshot is not
//! taken. The `post-thaw` hooks run whenever a `pre-freeze` hook started or
//! the take was attempted, even if it failed: a directory hook's whenever its
//! own `pre-freeze` started (even if that failed), the `--post-thaw`
//! commands always. A failing `post-thaw` hook is reported, and makes the
//! command fail, but the snapshot stays valid.
//!
//! Their environment: `BLKSNAP_PHASE` (`pre-freeze` or `post-thaw`),
//! `BLKSNAP_SNAPSHOT_ID`, `BLKSNAP_DEVICES` (the device paths, separated by
//! spaces), `BLKSNAP_HOOK_TIMEOUT` (seconds) and, for `post-thaw`,
//! `BLKSNAP_TAKE_RESULT`: `taken`, `failed` (the take failed) or `aborted`
//! (a `pre-freeze` hook failed; no take).
//!
//! The hooks run with the rights of blksnapctl, root: the directory, every
//! directory above it and every hook in it must be owned by root (or by the
//! user running blksnapctl) and not writable by group or others (a directory
//! above may be if it is sticky, as /tmp); else the take is refused.

use serde::Serialize;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The hooks directory when none is given.
pub const DEFAULT_DIR: &str = "/etc/blksnap/hooks.d";
/// The environment variable that names another hooks directory (for tests).
pub const DIR_ENV: &str = "BLKSNAP_HOOKS_DIR";
/// The timeout of a hook when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of a hook's output kept for its report.
const TAIL_LINES: usize = 20;
/// Bytes of a hook's output kept (the last ones).
const TAIL_BYTES: usize = 16 << 10;
/// How long a killed hook may take to go.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// When a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Before the take.
    PreFreeze,
    /// After the take (or after a failed `pre-freeze` hook).
    PostThaw,
}

impl Phase {
    /// `pre-freeze` or `post-thaw`: the hook's argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PreFreeze => "pre-freeze",
            Phase::PostThaw => "post-thaw",
        }
    }
}

/// What a hook's run came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "status", content = "value")]
pub enum Status {
    /// Exit status 0.
    Ok,
    /// Another exit status.
    Exit(i32),
    /// Ended by this signal.
    Signal(i32),
    /// Still running at the timeout: killed with its process group.
    TimedOut,
    /// It could not be started (the reason).
    NotStarted(String),
}

impl Status {
    /// Exit status 0.
    pub fn ok(&self) -> bool {
        *self == Status::Ok
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Ok => write!(f, "ok"),
            Status::Exit(c) => write!(f, "exit status {c}"),
            Status::Signal(s) => write!(f, "killed by signal {s}"),
            Status::TimedOut => write!(f, "timed out, killed with its process group"),
            Status::NotStarted(e) => write!(f, "not started: {e}"),
        }
    }
}

/// One hook's run.
#[derive(Clone, Debug, Serialize)]
pub struct HookRun {
    /// The file name of a directory hook, or `--pre-freeze CMD` /
    /// `--post-thaw CMD`.
    pub name: String,
    /// Its phase.
    pub phase: Phase,
    /// How it ended.
    #[serde(flatten)]
    pub status: Status,
    /// How long it ran, in ms.
    pub ms: f64,
    /// The last lines of its stdout and stderr.
    pub output: Vec<String>,
}

impl HookRun {
    /// `hook NAME PHASE: STATUS in MS ms`, then its output, indented.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "hook {} {}: {} in {:.1} ms",
            self.name,
            self.phase.as_str(),
            self.status,
            self.ms
        );
        for l in &self.output {
            let _ = write!(s, "\n    | {l}");
        }
        s
    }
}

/// What ran around a take.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ran {
    /// The hooks, in the order they ran.
    pub hooks: Vec<HookRun>,
    /// From the end of the `pre-freeze` hooks to the start of the
    /// `post-thaw` hooks (the take), in ms; none if the take was not
    /// attempted.
    pub freeze_ms: Option<f64>,
}

impl Ran {
    /// The `post-thaw` hooks that failed.
    pub fn post_failures(&self) -> Vec<&HookRun> {
        self.hooks
            .iter()
            .filter(|h| h.phase == Phase::PostThaw && !h.status.ok())
            .collect()
    }

    /// An error message for the failed `post-thaw` hooks, if any.
    pub fn post_failure_message(&self) -> Option<String> {
        let failed = self.post_failures();
        if failed.is_empty() {
            return None;
        }
        let mut s = format!(
            "{} post-thaw hook{} failed (the snapshot itself is valid):",
            failed.len(),
            if failed.len() == 1 { "" } else { "s" }
        );
        for h in failed {
            let _ = write!(s, "\n  {}", h.describe());
        }
        Some(s)
    }
}

/// What to run, as given by the user.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `--pre-freeze` commands.
    pub pre: Vec<String>,
    /// `--post-thaw` commands.
    pub post: Vec<String>,
    /// The hooks directory; `None`: none (`--no-hooks`).
    pub dir: Option<PathBuf>,
    /// The directory was named (not the default): it must exist.
    pub dir_explicit: bool,
    /// The timeout of each hook.
    pub timeout: Duration,
}

impl Settings {
    /// The directory to use: `dir` if given, else `$BLKSNAP_HOOKS_DIR`,
    /// else [`DEFAULT_DIR`]; none with `no_hooks`. Returns the directory
    /// and whether it was named.
    pub fn choose_dir(dir: Option<PathBuf>, no_hooks: bool) -> (Option<PathBuf>, bool) {
        if no_hooks {
            return (None, false);
        }
        if let Some(d) = dir {
            return (Some(d), true);
        }
        match std::env::var_os(DIR_ENV) {
            Some(d) if !d.is_empty() => (Some(PathBuf::from(d)), true),
            _ => (Some(PathBuf::from(DEFAULT_DIR)), false),
        }
    }
}

/// The hooks of a take, checked and ready to run.
#[derive(Clone, Debug)]
pub struct Hooks {
    /// The directory's hooks, in lexical order.
    files: Vec<PathBuf>,
    pre: Vec<String>,
    post: Vec<String>,
    timeout: Duration,
}

/// Where a take happens: what the hooks are told.
pub struct Context<'a> {
    /// The snapshot.
    pub snapshot: String,
    /// Its devices.
    pub devices: &'a [PathBuf],
}

/// The files of a directory that are hooks: names of letters, digits, `_`
/// and `-` only (as run-parts: no editor or package manager leftovers such
/// as `x~`, `x.dpkg-old`, `.x`).
fn hook_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whom the hooks may belong to: root, or the user running us.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Refuses `path` unless its owner is trusted and it is not writable by
/// group or others (a directory above the hooks may be if it is sticky).
fn check_owner_mode(
    path: &Path,
    md: &std::fs::Metadata,
    what: &str,
    sticky_ok: bool,
) -> Result<(), String> {
    let mode = md.permissions().mode();
    let why = if !trusted_owner(md.uid()) {
        Some(format!(
            "it is owned by uid {}, not by root{}",
            md.uid(),
            match nix::unistd::geteuid().as_raw() {
                0 => String::new(),
                me => format!(" or uid {me}"),
            }
        ))
    } else if mode & 0o022 != 0 && !(sticky_ok && mode & 0o1000 != 0) {
        Some(format!(
            "it is writable by {} (mode {:04o})",
            match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "its group and others",
                (true, false) => "its group",
                _ => "others",
            },
            mode & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "refusing the hooks: {what} {}: {why}; hooks run as root, so only root may be able to change them (chown root, chmod go-w), or skip the hooks directory with --no-hooks",
            path.display()
        )),
        None => Ok(()),
    }
}

/// No hooks.
pub static NONE: Hooks = Hooks {
    files: Vec::new(),
    pre: Vec::new(),
    post: Vec::new(),
    timeout: DEFAULT_TIMEOUT,
};

impl Hooks {
    /// Reads the hooks directory and checks it (see the module's
    /// description). A missing default directory means no hooks; a named
    /// one must exist.
    pub fn load(s: &Settings) -> Result<Hooks, String> {
        if s.timeout.is_zero() {
            return Err("the hook timeout must be at least 1 second".into());
        }
        let mut files = Vec::new();
        if let Some(dir) = &s.dir {
            match std::fs::metadata(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !s.dir_explicit => {}
                Err(e) => return Err(format!("hooks directory {}: {e}", dir.display())),
                Ok(md) if !md.is_dir() => {
                    return Err(format!(
                        "hooks directory {}: not a directory",
                        dir.display()
                    ))
                }
                Ok(md) => {
                    check_owner_mode(dir, &md, "directory", false)?;
                    let real = std::fs::canonicalize(dir)
                        .map_err(|e| format!("hooks directory {}: {e}", dir.display()))?;
                    for up in real.ancestors().skip(1) {
                        let md =
                            std::fs::metadata(up).map_err(|e| format!("{}: {e}", up.display()))?;
                        check_owner_mode(up, &md, "directory above the hooks,", true)?;
                    }
                    files = Self::scan(dir)?;
                }
            }
        }
        Ok(Hooks {
            files,
            pre: s.pre.clone(),
            post: s.post.clone(),
            timeout: s.timeout,
        })
    }

    /// The hooks of `dir`, sorted, each checked.
    fn scan(dir: &Path) -> Result<Vec<PathBuf>, String> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if hook_name(&name) {
                names.push(name);
            }
        }
        names.sort();
        let mut files = Vec::new();
        for name in names {
            let path = dir.join(&name);
            // A symbolic link counts as what it points to.
            let md =
                std::fs::metadata(&path).map_err(|e| format!("hook {}: {e}", path.display()))?;
            if !md.is_file() || md.permissions().mode() & 0o111 == 0 {
                continue;
            }
            check_owner_mode(&path, &md, "hook", false)?;
            files.push(path);
        }
        Ok(files)
    }

    /// No hook at all.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.pre.is_empty() && self.post.is_empty()
    }

    /// The directory's hooks, in the order their `pre-freeze` runs.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Runs the `pre-freeze` hooks, then `take` (unless one failed), then
    /// the `post-thaw` hooks, logging each with its duration and the freeze
    /// window. `Err`: a `pre-freeze` hook failed (the take was not
    /// attempted) or the take failed; the message has the failed hooks'
    /// outputs. A failed `post-thaw` hook is in the [`Ran`] returned with
    /// `Ok` ([`Ran::post_failure_message`]).
    pub fn around<T>(
        &self,
        ctx: &Context<'_>,
        log: &dyn Fn(&str),
        take: impl FnOnce() -> Result<T, String>,
    ) -> Result<(T, Ran), String> {
        let mut ran = Ran::default();
        if self.is_empty() {
            return take().map(|t| (t, ran));
        }
        let mut started = 0;
        let mut pre_failed = None;
        for (i, f) in self.files.iter().enumerate() {
            let h = self.run_one(
                file_name(f),
                self.file_command(f, Phase::PreFreeze),
                Phase::PreFreeze,
                ctx,
                None,
            );
            log(&h.describe());
            started = i + 1;
            let ok = h.status.ok();
            ran.hooks.push(h);
            if !ok {
                pre_failed = Some(ran.hooks.len() - 1);
                break;
            }
        }
        if pre_failed.is_none() {
            for c in &self.pre {
                let h = self.run_one(
                    command_name("--pre-freeze", c),
                    shell_command(c, Phase::PreFreeze),
                    Phase::PreFreeze,
                    ctx,
                    None,
                );
                log(&h.describe());
                let ok = h.status.ok();
                ran.hooks.push(h);
                if !ok {
                    pre_failed = Some(ran.hooks.len() - 1);
                    break;
                }
            }
        }
        let taken = match pre_failed {
            Some(_) => None,
            None => {
                let start = Instant::now();
                let r = take();
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                ran.freeze_ms = Some(ms);
                log(&format!(
                    "freeze window {ms:.1} ms (the take, from the end of the pre-freeze hooks to the start of the post-thaw hooks){}",
                    if r.is_err() { "; the take failed" } else { "" }
                ));
                Some(r)
            }
        };
        let result = match &taken {
            None => "aborted",
            Some(Ok(_)) => "taken",
            Some(Err(_)) => "failed",
        };
        for c in &self.post {
            let h = self.run_one(
                command_name("--post-thaw", c),
                shell_command(c, Phase::PostThaw),
                Phase::PostThaw,
                ctx,
                Some(result),
            );
            log(&h.describe());
            ran.hooks.push(h);
        }
        for f in self.files[..started].iter().rev() {
            let h = self.run_one(
                file_name(f),
                self.file_command(f, Phase::PostThaw),
                Phase::PostThaw,
                ctx,
                Some(result),
            );
            log(&h.describe());
            ran.hooks.push(h);
        }
        let post = ran.post_failure_message();
        let also = |s: String| match &post {
            Some(p) => format!("{s}\n{p}"),
            None => s,
        };
        match (pre_failed, taken) {
            (Some(i), _) => Err(also(format!(
                "the snapshot is not taken: pre-freeze {}",
                ran.hooks[i].describe()
            ))),
            (None, Some(Err(e))) => Err(also(e)),
            (None, Some(Ok(t))) => Ok((t, ran)),
            (None, None) => unreachable!("no pre-freeze hook failed: the take ran"),
        }
    }

    fn file_command(&self, f: &Path, phase: Phase) -> Command {
        let mut c = Command::new(f);
        c.arg(phase.as_str());
        c
    }

    /// Runs one hook to its end or its timeout.
    fn run_one(
        &self,
        name: String,
        mut cmd: Command,
        phase: Phase,
        ctx: &Context<'_>,
        result: Option<&str>,
    ) -> HookRun {
        let devices: Vec<String> = ctx
            .devices
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        cmd.env("BLKSNAP_PHASE", phase.as_str())
            .env("BLKSNAP_SNAPSHOT_ID", &ctx.snapshot)
            .env("BLKSNAP_DEVICES", devices.join(" "))
            .env("BLKSNAP_HOOK_TIMEOUT", self.timeout.as_secs().to_string())
            .env_remove("BLKSNAP_TAKE_RESULT")
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(r) = result {
            cmd.env("BLKSNAP_TAKE_RESULT", r);
        }
        let start = Instant::now();
        let (status, output) = match run_captured(cmd, self.timeout) {
            Ok(r) => r,
            Err(e) => (Status::NotStarted(e), Vec::new()),
        };
        HookRun {
            name,
            phase,
            status,
            ms: start.elapsed().as_secs_f64() * 1000.0,
            output,
        }
    }
}

fn file_name(f: &Path) -> String {
    f.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| f.display().to_string())
}

/// `--pre-freeze 'CMD'`, the command cut at 60 characters.
fn command_name(opt: &str, cmd: &str) -> String {
    let mut c: String = cmd.chars().take(60).collect();
    if c.len() < cmd.len() {
        c.push_str("...");
    }
    format!("{opt} '{c}'")
}

/// `sh -c CMD blksnap-hook PHASE`: the phase is `$1`, as for a directory
/// hook.
fn shell_command(cmd: &str, phase: Phase) -> Command {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", cmd, "blksnap-hook", phase.as_str()]);
    c
}

/// The last bytes written to a hook's stdout and stderr.
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, b: &[u8]) {
        let b = &b[b.len().saturating_sub(TAIL_BYTES)..];
        let excess = (self.0.len() + b.len()).saturating_sub(TAIL_BYTES);
        self.0.drain(..excess);
        self.0.extend(b);
    }

    fn lines(&self) -> Vec<String> {
        let bytes: Vec<u8> = self.0.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..]
            .iter()
            .map(|l| l.chars().take(400).collect())
            .collect()
    }
}

/// Reads what is in the pipe now; false at its end.
fn drain(fd: &OwnedFd, tail: &mut Tail) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => return false,
            Ok(n) => tail.push(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => {}
            // EAGAIN: nothing more for now.
            Err(_) => return true,
        }
    }
}

/// Starts `cmd` with stdout and stderr into one pipe and waits for it at
/// most `timeout`; kills its process group then. Waits for the process,
/// not for the pipe's end: what it started may keep the pipe open.
fn run_captured(mut cmd: Command, timeout: Duration) -> Result<(Status, Vec<String>), String> {
    use nix::fcntl::OFlag;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| format!("pipe: {e}"))?;
    // The child's end blocks as usual.
    nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
        .map_err(|e| format!("pipe: {e}"))?;
    let w2 = w.try_clone().map_err(|e| format!("pipe: {e}"))?;
    cmd.stdout(Stdio::from(w)).stderr(Stdio::from(w2));
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    // Our copies of the write end go.
    drop(cmd);
    let pid = child.id() as i32;
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor
    // or -1.
    let pidfd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = std::io::Error::last_os_error();
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
        return Err(format!("pidfd_open: {e}"));
    }
    // SAFETY: a new descriptor, ours only.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut tail = Tail(VecDeque::new());
    let mut pipe_open = true;
    let mut timed_out = false;
    let mut deadline = start + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if timed_out {
                // Killed, and still not gone: not waited for.
                drain(&r, &mut tail);
                let mut out = tail.lines();
                out.push(format!(
                    "(blksnapctl: still there {} s after SIGKILL; not waited for)",
                    KILL_GRACE.as_secs()
                ));
                return Ok((Status::TimedOut, out));
            }
            timed_out = true;
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            deadline = Instant::now() + KILL_GRACE;
            continue;
        }
        let ms = PollTimeout::try_from(left.as_millis().clamp(1, i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = vec![PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        if pipe_open {
            fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, ms) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let exited = fds[0].revents().is_some_and(|e| !e.is_empty());
        let readable = fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|e| !e.is_empty());
        drop(fds);
        if readable {
            pipe_open = drain(&r, &mut tail);
        }
        if exited {
            break;
        }
    }
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    // What it wrote before it ended is in the pipe now.
    drain(&r, &mut tail);
    let status = if timed_out {
        Status::TimedOut
    } else if let Some(c) = status.code() {
        if c == 0 {
            Status::Ok
        } else {
            Status::Exit(c)
        }
    } else {
        Status::Signal(status.signal().unwrap_or(0))
    };
    Ok((status, tail.lines()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::fs;

    /// A fresh directory under the system's temporary directory (sticky),
    /// mode 0755.
    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("blksnap-hooks-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn settings(dir: &Path) -> Settings {
        Settings {
            pre: Vec::new(),
            post: Vec::new(),
            dir: Some(dir.to_path_buf()),
            dir_explicit: true,
            timeout: Duration::from_secs(10),
        }
    }

    fn ctx(devices: &[PathBuf]) -> Context<'_> {
        Context {
            snapshot: "0123abcd".into(),
            devices,
        }
    }

    /// Runs the hooks around a take that appends `take` to `log`; returns
    /// the result, the log file's lines and the messages.
    fn around(
        hooks: &Hooks,
        logfile: &Path,
        take_ok: bool,
    ) -> (Result<Ran, String>, Vec<String>, Vec<String>) {
        let msgs = RefCell::new(Vec::new());
        let devices = [PathBuf::from("/dev/vdx"), PathBuf::from("/dev/vdy1")];
        let r = hooks.around(
            &ctx(&devices),
            &|m| msgs.borrow_mut().push(m.to_string()),
            || {
                let mut s = fs::read_to_string(logfile).unwrap_or_default();
                s.push_str("take\n");
                fs::write(logfile, s).unwrap();
                if take_ok {
                    Ok(())
                } else {
                    Err("take snapshot: Device or resource busy (EBUSY)".to_string())
                }
            },
        );
        let lines = fs::read_to_string(logfile)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        (r.map(|((), ran)| ran), lines, msgs.into_inner())
    }

    #[test]
    fn hooks_run_in_order_post_in_reverse() {
        let d = tempdir("order");
        let hd = d.join("hooks.d");
        fs::create_dir(&hd).unwrap();
        fs::set_permissions(&hd, fs::Permissions::from_mode(0o755)).unwrap();
        let log = d.join("log");
        let body = format!("echo \"$(basename \"$0\") $1\" >>{}", log.display());
        // Created out of order; 10 < 9 lexically.
        script(&hd, "20-b", &body);
        script(&hd, "10-a", &body);
        script(&hd, "9-c", &body);
        // Not hooks: not executable, a leftover name, a directory.
        fs::write(hd.join("15-off"), format!("#!/bin/sh\n{body}\n")).unwrap();
        script(&hd, "30-x.dpkg-old", &body);
        script(&hd, ".40-hidden", &body);
        fs::create_dir(hd.join("50-dir")).unwrap();
        let mut s = settings(&hd);
        s.pre = vec![
            format!("echo cmd-pre1 $1 >>{}", log.display()),
            format!("echo cmd-pre2 >>{}", log.display()),
        ];
        s.post = vec![
            format!("echo cmd-post1 $1 >>{}", log.display()),
            format!("echo cmd-post2 >>{}", log.display()),
        ];
        let hooks = Hooks::load(&s).unwrap();
        let (r, lines, msgs) = around(&hooks, &log, true);
        let ran = r.unwrap();
        assert_eq!(
            lines,
            [
                "10-a pre-freeze",
                "20-b pre-freeze",
                "9-c pre-freeze",
                "cmd-pre1 pre-freeze",
                "cmd-pre2",
                "take",
                "cmd-post1 post-thaw",
                "cmd-post2",
                "9-c post-thaw",
                "20-b post-thaw",
                "10-a post-thaw",
            ]
        );
        assert_eq!(ran.hooks.len(), 10);
        assert!(ran.hooks.iter().all(|h| h.status.ok() && h.ms >= 0.0));
        assert!(ran.freeze_ms.is_some());
        assert!(ran.post_failure_message().is_none());
        // Each hook's line with its duration, and the freeze window.
        assert!(
            msgs[0].starts_with("hook 10-a pre-freeze: ok in "),
            "{msgs:?}"
        );
        assert!(msgs[0].ends_with(" ms"), "{msgs:?}");
        assert!(msgs[5].starts_with("freeze window "), "{msgs:?}");
        assert!(
            msgs[6].starts_with("hook --post-thaw 'echo cmd-post1"),
            "{msgs:?}"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hook_environment() {
        let d = tempdir("env");
        let log = d.join("log");
        let mut s = settings(&d);
        s.dir = None;
        s.timeout = Duration::from_secs(7);
        let dump = format!(
            "echo \"$BLKSNAP_PHASE|$BLKSNAP_SNAPSHOT_ID|$BLKSNAP_DEVICES|$BLKSNAP_HOOK_TIMEOUT|${{BLKSNAP_TAKE_RESULT-unset}}|$1\" >>{}",
            log.display()
        );
        s.pre = vec![dump.clone()];
        s.post = vec![dump];
        let hooks = Hooks::load(&s).unwrap();
        let (r, lines, _) = around(&hooks, &log, true);
        r.unwrap();
        assert_eq!(
            lines,
            [
                "pre-freeze|0123abcd|/dev/vdx /dev/vdy1|7|unset|pre-freeze",
                "take",
                "post-thaw|0123abcd|/dev/vdx /dev/vdy1|7|taken|post-thaw",
            ]
        );
        // A failed take: the post-thaw hooks run and are told.
        fs::remove_file(&log).unwrap();
        let (r, lines, _) = around(&hooks, &log, false);
        assert!(r.unwrap_err().contains("EBUSY"));
        assert_eq!(
            lines[2],
            "post-thaw|0123abcd|/dev/vdx /dev/vdy1|7|failed|post-thaw"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failing_pre_hook_aborts_the_take_and_posts_run() {
        let d = tempdir("abort");
        let hd = d.join("hooks.d");
        fs::create_dir(&hd).unwrap();
        fs::set_permissions(&hd, fs::Permissions::from_mode(0o755)).unwrap();
        let log = d.join("log");
        let body = format!(
            "echo \"$(basename \"$0\") $1 $BLKSNAP_TAKE_RESULT\" >>{}",
            log.display()
        );
        script(&hd, "10-ok", &body);
        script(
            &hd,
            "20-fails",
            &format!(
                "{body}\n[ \"$1\" = post-thaw ] && exit 0\nfor i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25; do echo line $i; done\necho to stderr >&2\nexit 3"
            ),
        );
        script(&hd, "30-never", &body);
        let mut s = settings(&hd);
        s.pre = vec![format!("echo cmd-pre >>{}", log.display())];
        s.post = vec![format!(
            "echo cmd-post $BLKSNAP_TAKE_RESULT >>{}",
            log.display()
        )];
        let hooks = Hooks::load(&s).unwrap();
        let (r, lines, _) = around(&hooks, &log, true);
        let e = r.unwrap_err();
        // No take, no later pre-freeze hook; the post-thaw hooks of every
        // hook that started, the failed one too, and the commands'.
        assert_eq!(
            lines,
            [
                "10-ok pre-freeze ",
                "20-fails pre-freeze ",
                "cmd-post aborted",
                "20-fails post-thaw aborted",
                "10-ok post-thaw aborted",
            ]
        );
        assert!(
            e.starts_with(
                "the snapshot is not taken: pre-freeze hook 20-fails pre-freeze: exit status 3 in "
            ),
            "{e}"
        );
        // Its last 20 lines, stdout and stderr.
        assert!(e.contains("\n    | line 7\n"), "{e}");
        assert!(!e.contains("| line 6\n"), "{e}");
        assert!(e.ends_with("| line 25\n    | to stderr"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failing_pre_command_aborts_and_post_failure_is_reported() {
        let d = tempdir("abortcmd");
        let log = d.join("log");
        let mut s = settings(&d);
        s.dir = None;
        s.pre = vec![
            format!("echo pre1 >>{}", log.display()),
            format!(
                "echo pre2 >>{}; echo cannot lock >&2; exit 1",
                log.display()
            ),
            format!("echo pre3 >>{}", log.display()),
        ];
        s.post = vec![
            format!("echo post1 >>{}; echo broken; exit 9", log.display()),
            format!("echo post2 >>{}", log.display()),
        ];
        let hooks = Hooks::load(&s).unwrap();
        let (r, lines, _) = around(&hooks, &log, true);
        let e = r.unwrap_err();
        assert_eq!(lines, ["pre1", "pre2", "post1", "post2"]);
        assert!(e.contains("pre-freeze hook --pre-freeze 'echo pre2"), "{e}");
        assert!(e.contains(": exit status 1 in "), "{e}");
        assert!(e.contains("    | cannot lock"), "{e}");
        assert!(e.contains("1 post-thaw hook failed"), "{e}");
        assert!(e.contains("exit status 9"), "{e}");
        // With the take: it is valid, the failed post-thaw hook is reported.
        s.pre.remove(1);
        fs::remove_file(&log).unwrap();
        let hooks = Hooks::load(&s).unwrap();
        let (r, lines, _) = around(&hooks, &log, true);
        let ran = r.unwrap();
        assert_eq!(lines, ["pre1", "pre3", "take", "post1", "post2"]);
        let m = ran.post_failure_message().unwrap();
        assert!(
            m.starts_with("1 post-thaw hook failed (the snapshot itself is valid):"),
            "{m}"
        );
        assert!(
            m.contains("exit status 9") && m.contains("    | broken"),
            "{m}"
        );
        // As --json reports them.
        let v = serde_json::to_value(&ran).unwrap();
        let name = format!("--pre-freeze 'echo pre1 >>{}'", log.display());
        assert_eq!(v["hooks"][0]["name"], name.as_str());
        assert_eq!(v["hooks"][0]["phase"], "pre-freeze");
        assert_eq!(v["hooks"][0]["status"], "ok");
        assert_eq!(v["hooks"][2]["phase"], "post-thaw");
        assert_eq!(v["hooks"][2]["status"], "exit");
        assert_eq!(v["hooks"][2]["value"], 9);
        assert_eq!(v["hooks"][2]["output"], serde_json::json!(["broken"]));
        assert!(v["hooks"][2]["ms"].as_f64().unwrap() > 0.0);
        assert!(v["freeze_ms"].as_f64().unwrap() >= 0.0);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hung_hook_is_killed_with_its_group_at_the_timeout() {
        let d = tempdir("timeout");
        let log = d.join("log");
        let pids = d.join("pids");
        let mut s = settings(&d);
        s.dir = None;
        s.timeout = Duration::from_secs(1);
        // A grandchild in the background that keeps stdout open, and the
        // hook itself hangs.
        s.pre = vec![format!(
            "sleep 1000 & echo $! >{p}; echo $$ >>{p}; echo started; sleep 1000",
            p = pids.display()
        )];
        s.post = vec![format!(
            "echo post $BLKSNAP_TAKE_RESULT >>{}",
            log.display()
        )];
        let hooks = Hooks::load(&s).unwrap();
        let t = Instant::now();
        let (r, lines, _) = around(&hooks, &log, true);
        let took = t.elapsed();
        let e = r.unwrap_err();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(4),
            "{took:?}"
        );
        assert!(
            e.contains("timed out, killed with its process group"),
            "{e}"
        );
        assert!(e.contains("    | started"), "{e}");
        assert_eq!(lines, ["post aborted"]);
        // The hook and its grandchild are gone.
        let pids = fs::read_to_string(&pids).unwrap();
        for p in pids.split_whitespace() {
            let p: i32 = p.parse().unwrap();
            // Alive: not gone and not a zombie (SIGKILL takes a moment).
            let alive = || {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
                    && !fs::read_to_string(format!("/proc/{p}/stat"))
                        .unwrap_or_default()
                        .contains(") Z ")
            };
            let t = Instant::now();
            while alive() && t.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(!alive(), "process {p} of the hook survived");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_background_child_holding_stdout_does_not_hang() {
        let d = tempdir("background");
        let log = d.join("log");
        let pid = d.join("pid");
        let mut s = settings(&d);
        s.dir = None;
        s.timeout = Duration::from_secs(20);
        // The hook ends at once, a child it leaves keeps the pipe open (a
        // lock holder until post-thaw): not waited for, not killed.
        s.pre = vec![format!("sleep 30 & echo $! >{}; echo done", pid.display())];
        s.post = vec![format!(
            "kill $(cat {}) && echo killed >>{}",
            pid.display(),
            log.display()
        )];
        let hooks = Hooks::load(&s).unwrap();
        let t = Instant::now();
        let (r, lines, msgs) = around(&hooks, &log, true);
        let ran = r.unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(lines, ["take", "killed"]);
        assert_eq!(ran.hooks[0].output, ["done"]);
        assert!(msgs[0].contains(": ok in "), "{msgs:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unsafe_hooks_directory_is_refused() {
        let d = tempdir("perm");
        let hd = d.join("hooks.d");
        fs::create_dir(&hd).unwrap();
        let log = d.join("log");
        script(&hd, "10-a", &format!("echo ran >>{}", log.display()));
        let s = settings(&hd);
        let load = |mode: u32| {
            fs::set_permissions(&hd, fs::Permissions::from_mode(mode)).unwrap();
            Hooks::load(&s)
        };
        assert_eq!(load(0o755).unwrap().files().len(), 1);
        for (mode, why) in [
            (0o775, "writable by its group (mode 0775)"),
            (0o757, "writable by others (mode 0757)"),
            (0o1777, "writable by its group and others (mode 1777)"),
        ] {
            let e = load(mode).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "refusing the hooks: directory {}: it is {why}",
                    hd.display()
                )),
                "{e}"
            );
        }
        load(0o755).unwrap();
        // A hook writable by others.
        let hook = hd.join("10-a");
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o777)).unwrap();
        let e = Hooks::load(&s).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "refusing the hooks: hook {}: it is writable by its group and others",
                hook.display()
            )),
            "{e}"
        );
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        // A directory above writable by others and not sticky.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = Hooks::load(&s).unwrap_err();
        assert!(
            e.contains(&format!(
                "directory above the hooks, {}: it is writable",
                d.display()
            )),
            "{e}"
        );
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        Hooks::load(&s).unwrap();
        // Owned by another user (only root can make that here).
        if nix::unistd::geteuid().is_root() {
            let nobody = Some(nix::unistd::Uid::from_raw(65534));
            nix::unistd::chown(&hd, nobody, None).unwrap();
            let e = Hooks::load(&s).unwrap_err();
            assert!(e.contains("it is owned by uid 65534, not by root"), "{e}");
            nix::unistd::chown(&hd, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
            nix::unistd::chown(&hook, nobody, None).unwrap();
            let e = Hooks::load(&s).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "refusing the hooks: hook {}: it is owned by uid 65534",
                    hook.display()
                )),
                "{e}"
            );
            nix::unistd::chown(&hook, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        }
        // Nothing ran; a refused directory is no take.
        assert!(!log.exists());
        // A named directory that is missing is an error; the default one
        // missing means no hooks.
        let mut s2 = settings(&d.join("missing"));
        assert!(Hooks::load(&s2).unwrap_err().contains("No such file"));
        s2.dir_explicit = false;
        assert!(Hooks::load(&s2).unwrap().is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut t = Tail(VecDeque::new());
        for i in 0..5000 {
            t.push(format!("line {i}\n").as_bytes());
        }
        let l = t.lines();
        assert_eq!(l.len(), TAIL_LINES);
        assert_eq!(l[0], "line 4980");
        assert_eq!(l[19], "line 4999");
        assert!(t.0.len() <= TAIL_BYTES);
    }
}
