// SPDX-License-Identifier: GPL-2.0

//! Application-consistent snapshots: the hooks around a take
//! (`blksnapctl --pre-freeze/--post-thaw`, the hooks directory) with a real
//! database under load, and what a failing or hanging hook does.
//!
//! `app_postgresql_points_under_pgbench`: PostgreSQL 15 (the host's
//! binaries) with its data directory on ext4 on a tracked disk, data
//! checksums on, pgbench running (3 clients) while a full backup and an
//! incremental are made with the example hook dist/hooks.d/50-postgresql
//! (a CHECKPOINT before the freeze) linked into a hooks directory and a
//! `--pre-freeze`/`--post-thaw` pair that records timestamps. Each point is
//! restored to another disk and must: hold the hook's checkpoint as its
//! latest (the one the server made during that backup's pre-freeze hook);
//! start (crash recovery); pass `pg_amcheck --heapallindexed`; keep
//! pgbench's invariant (sum of the accounts' balances = the branches' = the
//! tellers' = the history's deltas); hold every transaction committed
//! before the backup started and none committed after it ended; after a
//! clean stop, pass `pg_checksums --check`. One line per point.
//!
//! `app_hooks_failing_or_hanging_pre_hook_aborts_the_take`: a failing
//! pre-freeze hook (and one that hangs, killed at its timeout with what it
//! started) aborts the take: no snapshot, no point, the post-thaw hooks
//! ran, the hook's output is in the message; a failing post-thaw hook
//! makes the command exit 4 with a valid snapshot; `snapshot take` and
//! `verify --source` run the hooks too; SIGINT during a pre-freeze hook of
//! `snapshot take` lets the take and the post-thaw hooks run, then exit 130.

use crate::dev;
use crate::snap::{disk, Tracked};
use crate::{check_eq, fail, TestResult};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The application tests, in the order they run.
pub const ALL: &[Test] = &[
    (
        "app_postgresql_points_under_pgbench",
        postgresql_points_under_pgbench,
    ),
    (
        "app_hooks_failing_or_hanging_pre_hook_aborts_the_take",
        failing_or_hanging_hooks,
    ),
];

/// The host's PostgreSQL 15.
const PG_HOST_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The PostgreSQL programs the tests run.
const PG_PROGRAMS: &[&str] = &[
    "postgres",
    "pg_ctl",
    "psql",
    "pgbench",
    "pg_amcheck",
    "pg_isready",
    "pg_checksums",
    "pg_controldata",
];

/// The PostgreSQL programs on tmpfs, and the libraries they load: started
/// from the host's root over 9p, each start of a program linked with libpq
/// or the server took seconds, up to tens under load.
struct Staged {
    bin: PathBuf,
    libs: PathBuf,
}

static STAGED: std::sync::OnceLock<Result<Staged, String>> = std::sync::OnceLock::new();

/// Unpacks the tar archive of disk blksnap-p (run.sh's pg_tools: the
/// programs, the amcheck module and the libraries, copying them over 9p
/// took a minute) into `$BLKSNAP_SCRATCH/pg-stage`: the programs in
/// `usr/lib/postgresql/15/bin` (the server finds its lib and share
/// directories relative to its own path), the libraries in `libs`.
fn stage() -> Result<&'static Staged, String> {
    STAGED
        .get_or_init(|| {
            let t = Instant::now();
            let root = dev::scratch().join("pg-stage");
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
            let tar = disk("blksnap-p")?;
            dev::run(
                "tar",
                &["-xf", tar.to_str().unwrap(), "-C", root.to_str().unwrap()],
            )?;
            let bin = root.join("usr/lib/postgresql/15/bin");
            let libs = root.join("libs");
            for p in PG_PROGRAMS {
                if !bin.join(p).exists() {
                    return Err(format!(
                        "no {p} in the PostgreSQL tools archive (disk blksnap-p): tests/qemu/run.sh makes it from the host's PostgreSQL 15 (scripts/deps.sh installs it)"
                    ));
                }
            }
            let staged_in = t.elapsed().as_secs_f64();
            // What it saves: a start of psql from each place.
            let time = |psql: &Path| {
                let t = Instant::now();
                let ok = Command::new(psql)
                    .arg("--version")
                    .env("LD_LIBRARY_PATH", &libs)
                    .output()
                    .is_ok_and(|o| o.status.success());
                (ok, t.elapsed().as_secs_f64())
            };
            let host = time(&Path::new(PG_HOST_BIN).join("psql"));
            let here = time(&bin.join("psql"));
            if !here.0 {
                return Err(format!("the staged psql does not start ({})", bin.display()));
            }
            println!(
                "    PostgreSQL unpacked in {} in {staged_in:.1} s; psql --version: {:.2} s from the host's root, {:.2} s unpacked",
                root.display(),
                host.1,
                here.1
            );
            Ok(Staged { bin, libs })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The staged programs' directory.
fn pg_bin() -> Result<String, String> {
    Ok(stage()?.bin.display().to_string())
}

/// The environment the staged programs need.
fn pg_env() -> Result<(&'static str, String), String> {
    Ok(("LD_LIBRARY_PATH", stage()?.libs.display().to_string()))
}
/// The unprivileged user the server runs as.
const PG_USER: &str = "postgres";

/// The repository (for dist/).
fn repo() -> PathBuf {
    match std::env::var_os("BLKSNAP_REPO") {
        Some(r) => PathBuf::from(r),
        // target/release/blksnap-guest-tests
        None => std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
            .unwrap_or_default(),
    }
}

/// A command's exit code (-1: killed or not started) and output.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
    secs: f64,
}

/// Runs `cmd ARGS` with `env`, printing it, its output (unless `quiet`)
/// and its time.
fn run_env(cmd: &str, args: &[&str], env: &[(&str, &str)], quiet: bool) -> Out {
    run_as(None, cmd, args, env, quiet)
}

/// [`run_env`] as user `user` (uid, gid) if given.
fn run_as(
    user: Option<(u32, u32)>,
    cmd: &str,
    args: &[&str],
    env: &[(&str, &str)],
    quiet: bool,
) -> Out {
    println!(
        "    ${} {cmd} {}",
        if user.is_some() { " (as postgres)" } else { "" },
        args.join(" ")
    );
    let start = Instant::now();
    let mut c = Command::new(cmd);
    // The server's user may not enter our directory.
    c.args(args).stdin(Stdio::null()).current_dir("/");
    if let Some((uid, gid)) = user {
        use std::os::unix::process::CommandExt;
        c.uid(uid).gid(gid);
    }
    if let Some(Ok(s)) = STAGED.get() {
        c.env("LD_LIBRARY_PATH", &s.libs);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let mut out = match c.output() {
        Ok(o) => Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
            secs: 0.0,
        },
        Err(err) => Out {
            code: -1,
            stdout: String::new(),
            stderr: format!("{cmd}: {err}"),
            secs: 0.0,
        },
    };
    out.secs = start.elapsed().as_secs_f64();
    if !quiet || out.code != 0 {
        for l in out.stdout.lines().chain(out.stderr.lines()) {
            println!("      {l}");
        }
    }
    println!("      [exit {}, {:.1} s]", out.code, out.secs);
    out
}

/// Runs `cmd ARGS`, which must succeed; its stdout.
fn ok(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = run_env(cmd, args, &[], false);
    if out.code != 0 {
        fail!(
            "{cmd} {} exited {}: {}",
            args.join(" "),
            out.code,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// The server's user: uid and gid.
fn pg_user() -> Result<(u32, u32), String> {
    let u = nix::unistd::User::from_name(PG_USER)
        .map_err(|e| format!("user {PG_USER}: {e}"))?
        .ok_or_else(|| format!("no user {PG_USER} (the postgresql package makes it)"))?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

/// Runs a PostgreSQL program (as the server's user for the server's own
/// programs, which refuse root); it must succeed.
fn pg(prog: &str, args: &[&str]) -> Result<String, String> {
    let user = match prog {
        "pg_controldata" | "pg_checksums" => None,
        _ => Some(pg_user()?),
    };
    let p = format!("{}/{prog}", pg_bin()?);
    let out = run_as(user, &p, args, &[], false);
    if out.code != 0 {
        fail!(
            "{prog} {} exited {}: {}",
            args.join(" "),
            out.code,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// One SQL query's result (`psql -At`), as root over the socket in `sock`.
fn sql(sock: &Path, query: &str) -> Result<String, String> {
    let (k, v) = pg_env()?;
    let out = Command::new(format!("{}/psql", pg_bin()?))
        .env(k, v)
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(sock)
        .args(["-U", PG_USER, "-d", "postgres", "-c", query])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        fail!(
            "psql -c {query:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A field of `pg_controldata`'s output.
fn control_field(controldata: &str, field: &str) -> Result<String, String> {
    controldata
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(str::trim))
        .map(str::to_string)
        .ok_or_else(|| format!("no `{field}` in pg_controldata's output"))
}

/// An LSN `X/Y` as a number.
fn lsn(s: &str) -> Result<u64, String> {
    let (hi, lo) = s.split_once('/').ok_or_else(|| format!("LSN {s:?}"))?;
    let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("LSN {s:?}: {e}"))?;
    let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("LSN {s:?}: {e}"))?;
    Ok(hi << 32 | lo)
}

/// Creates `dir` (mode 0755 root, empty).
fn fresh_dir(dir: &Path) -> TestResult {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

fn chown_pg(path: &Path) -> TestResult {
    ok("chown", &["-R", PG_USER, path.to_str().unwrap()]).map(|_| ())
}

/// The PostgreSQL settings of the test cluster (into its
/// postgresql.conf, so that a restored copy has them too).
fn pg_conf(sock: &Path) -> String {
    format!(
        "listen_addresses = ''\n\
         unix_socket_directories = '{}'\n\
         shared_buffers = 16MB\n\
         max_connections = 20\n\
         dynamic_shared_memory_type = sysv\n\
         # Only the hooks' checkpoints during the test.\n\
         checkpoint_timeout = 1h\n\
         max_wal_size = 48MB\n\
         min_wal_size = 4MB\n\
         log_checkpoints = on\n\
         jit = off\n",
        sock.display()
    )
}

/// What a backup with the hooks gave.
struct Backup {
    kind: &'static str,
    point: u64,
    /// History rows (committed transactions) before the backup started
    /// and after it ended.
    before: u64,
    after: u64,
    /// The server's latest checkpoint before and after.
    ckpt_before: String,
    ckpt_after: String,
    freeze_ms: f64,
    hooks: Vec<(String, String, f64)>,
    /// The `--pre-freeze` and `--post-thaw` timestamps' distance.
    stamps_ms: f64,
}

fn count_history(sock: &Path) -> Result<u64, String> {
    sql(sock, "SELECT count(*) FROM pgbench_history")?
        .parse()
        .map_err(|e| format!("history count: {e}"))
}

fn checkpoint_lsn(sock: &Path) -> Result<String, String> {
    sql(sock, "SELECT checkpoint_lsn FROM pg_control_checkpoint()")
}

/// `blksnapctl --json backup KIND ...` with the hooks; checks the report,
/// the hooks' runs and the timestamps they recorded.
#[allow(clippy::too_many_arguments)]
fn backup(
    kind: &'static str,
    src: &Path,
    dir: &Path,
    hooks_dir: &Path,
    conf: &Path,
    stamps: &Path,
    sock: &Path,
) -> Result<Backup, String> {
    let before = count_history(sock)?;
    let ckpt_before = checkpoint_lsn(sock)?;
    let _ = std::fs::remove_file(stamps);
    let store = dev::scratch();
    let record = |phase: &str| {
        format!(
            "echo \"{phase} $(date +%s.%N) $BLKSNAP_PHASE $BLKSNAP_SNAPSHOT_ID $BLKSNAP_DEVICES ${{BLKSNAP_TAKE_RESULT:-}}\" >>{}",
            stamps.display()
        )
    };
    let (pre, post) = (record("pre"), record("post"));
    let args = [
        "--json",
        "backup",
        kind,
        src.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--limit",
        "256M",
        "--to",
        dir.to_str().unwrap(),
        "--pre-freeze",
        &pre,
        "--post-thaw",
        &post,
        // Starts of psql are slow under TCG and a loaded host.
        "--hook-timeout",
        "300",
    ];
    let out = run_env(
        "blksnapctl",
        &args,
        &[
            ("BLKSNAP_HOOKS_DIR", hooks_dir.to_str().unwrap()),
            ("BLKSNAP_HOOKS_CONF", conf.to_str().unwrap()),
        ],
        false,
    );
    if out.code != 0 {
        fail!("backup {kind} exited {}: {}", out.code, out.stderr.trim());
    }
    let after = count_history(sock)?;
    let ckpt_after = checkpoint_lsn(sock)?;
    let v: Value = serde_json::from_str(&out.stdout)
        .map_err(|err| format!("backup {kind}: not JSON ({err})"))?;
    let o = &v["devices"][0];
    check_eq!(o["kind"].as_str(), Some(kind), "the kind of backup made");
    let point = o["point"].as_u64().ok_or("no point in the report")?;
    let h = &v["hooks"];
    let freeze_ms = h["freeze_ms"]
        .as_f64()
        .ok_or_else(|| format!("no freeze window in {h}"))?;
    let runs = h["hooks"].as_array().ok_or("no hooks in the report")?;
    let mut hooks = Vec::new();
    for r in runs {
        let name = r["name"].as_str().unwrap_or("?").to_string();
        let phase = r["phase"].as_str().unwrap_or("?").to_string();
        if r["status"].as_str() != Some("ok") {
            fail!("hook {name} {phase}: {r}");
        }
        hooks.push((name, phase, r["ms"].as_f64().unwrap_or(-1.0)));
    }
    // The order: the directory's hook, the command; the take; the
    // command, the directory's hook.
    let order: Vec<(&str, &str)> = hooks
        .iter()
        .map(|(n, p, _)| (n.split(' ').next().unwrap_or(""), p.as_str()))
        .collect();
    check_eq!(
        order,
        vec![
            ("50-postgresql", "pre-freeze"),
            ("--pre-freeze", "pre-freeze"),
            ("--post-thaw", "post-thaw"),
            ("50-postgresql", "post-thaw"),
        ],
        "the hooks' order"
    );
    if !out.stderr.contains("CHECKPOINT done (host=") {
        fail!("50-postgresql did not say it checkpointed: {}", out.stderr);
    }
    // The timestamps: pre then post, the same snapshot id and device.
    let s = std::fs::read_to_string(stamps).map_err(|e| format!("{}: {e}", stamps.display()))?;
    let lines: Vec<Vec<&str>> = s.lines().map(|l| l.split(' ').collect()).collect();
    if lines.len() != 2 || lines[0][0] != "pre" || lines[1][0] != "post" {
        fail!("the recorded stamps: {s:?}");
    }
    check_eq!(lines[0][2], "pre-freeze", "BLKSNAP_PHASE of --pre-freeze");
    check_eq!(lines[1][2], "post-thaw", "BLKSNAP_PHASE of --post-thaw");
    check_eq!(lines[0][3], lines[1][3], "BLKSNAP_SNAPSHOT_ID pre and post");
    if lines[0][3].parse::<blksnap::SnapshotId>().is_err() {
        fail!("BLKSNAP_SNAPSHOT_ID {:?} is no snapshot id", lines[0][3]);
    }
    check_eq!(lines[0][4], src.to_str().unwrap(), "BLKSNAP_DEVICES");
    check_eq!(
        lines[1].get(5).copied(),
        Some("taken"),
        "BLKSNAP_TAKE_RESULT"
    );
    let t = |l: &[&str]| l[1].parse::<f64>().map_err(|e| format!("stamp {l:?}: {e}"));
    let stamps_ms = (t(&lines[1])? - t(&lines[0])?) * 1000.0;
    if stamps_ms < freeze_ms {
        fail!("the stamps are {stamps_ms:.1} ms apart, less than the freeze window {freeze_ms:.1} ms between them");
    }
    Ok(Backup {
        kind,
        point,
        before,
        after,
        ckpt_before,
        ckpt_after,
        freeze_ms,
        hooks,
        stamps_ms,
    })
}

/// Waits for `child` up to `secs`; kills it then.
fn stop_child(child: &mut std::process::Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn postgresql_points_under_pgbench() -> TestResult {
    let src = disk("blksnap-h")?;
    let tgt = disk("blksnap-e")?;
    let sd = src.to_str().unwrap().to_string();
    let td = tgt.to_str().unwrap().to_string();
    let name = src.file_name().unwrap().to_string_lossy().to_string();
    let scratch = dev::scratch();
    let mnt = scratch.join("app-mnt");
    let rmnt = scratch.join("app-restored");
    let sock = scratch.join("app-sock");
    let dir = scratch.join("app-points");
    let hooks_dir = scratch.join("app-hooks.d");
    let conf = scratch.join("app-hooks.conf");
    let stamps = scratch.join("app-stamps");
    let log = scratch.join("app-pg.log");
    let rlog = scratch.join("app-pg-restored.log");
    let bench_log = scratch.join("app-pgbench.log");
    for d in [&mnt, &rmnt, &sock, &dir, &hooks_dir] {
        fresh_dir(d)?;
    }
    chown_pg(&sock)?;
    let hook = repo().join("dist/hooks.d/50-postgresql");
    std::os::unix::fs::symlink(&hook, hooks_dir.join("50-postgresql"))
        .map_err(|e| format!("link {}: {e}", hook.display()))?;
    std::fs::write(
        &conf,
        format!(
            "BLKSNAP_PG=yes\nBLKSNAP_PG_CONNINFO='host={} port=5432'\nBLKSNAP_PG_OSUSER={PG_USER}\nBLKSNAP_PG_BINDIR={}\n",
            sock.display(),
            pg_bin()?
        ),
    )
    .map_err(|e| e.to_string())?;
    let data = mnt.join("pgdata");
    let pgdata = data.to_str().unwrap().to_string();
    let rdata = rmnt.join("pgdata");
    let rpgdata = rdata.to_str().unwrap().to_string();
    let t0 = Instant::now();
    if let Ok(t) = blksnap::Tracker::open(&src) {
        let _ = t.detach();
    }
    let tracked = Tracked::new(&src)?;
    dev::run("mount", &[&sd, mnt.to_str().unwrap()])?;
    let mut bench: Option<std::process::Child> = None;
    let mut server_up = false;
    let r = (|| -> TestResult {
        // run.sh made the cluster (initdb --data-checksums, pgbench -i -s 1,
        // the amcheck extension) with the host's binaries: seconds there,
        // 90 s here.
        if !data.join("PG_VERSION").exists() {
            fail!(
                "no PostgreSQL cluster on {sd} (blksnap-h): tests/qemu/run.sh makes it with the host's PostgreSQL 15 (scripts/deps.sh installs it)"
            );
        }
        let pc = data.join("postgresql.conf");
        let mut c = std::fs::read_to_string(&pc).map_err(|e| e.to_string())?;
        c.push_str(&pg_conf(&sock));
        std::fs::write(&pc, c).map_err(|e| e.to_string())?;
        pg(
            "pg_ctl",
            &[
                "-D",
                &pgdata,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "300",
                "start",
            ],
        )?;
        server_up = true;
        let s = sock.to_str().unwrap();
        check_eq!(
            sql(&sock, "SELECT count(*) FROM pgbench_accounts")?,
            "100000",
            "pgbench's accounts (scale 1)"
        );
        check_eq!(sql(&sock, "SHOW data_checksums")?, "on", "data checksums");
        println!(
            "    database ready after {:.1} s; pgbench: 3 clients from now on",
            t0.elapsed().as_secs_f64()
        );
        let bl = std::fs::File::create(&bench_log).map_err(|e| e.to_string())?;
        bench = Some(
            Command::new(format!("{}/pgbench", pg_bin()?))
                .env(pg_env()?.0, pg_env()?.1)
                .args([
                    "-h", s, "-U", PG_USER, "-c", "3", "-j", "1", "-T", "900", "-n", "-P", "5",
                    "postgres",
                ])
                .stdin(Stdio::null())
                .stdout(bl.try_clone().map_err(|e| e.to_string())?)
                .stderr(bl)
                .spawn()
                .map_err(|e| format!("pgbench: {e}"))?,
        );
        let mut made = Vec::new();
        for kind in ["full", "incremental"] {
            std::thread::sleep(Duration::from_secs(2));
            let b = backup(kind, &src, &dir, &hooks_dir, &conf, &stamps, &sock)?;
            if b.ckpt_after == b.ckpt_before {
                fail!(
                    "backup {kind}: the server's latest checkpoint is still {}: the hook did not checkpoint",
                    b.ckpt_before
                );
            }
            println!(
                "    backup {kind} -> point {}: hooks {}; freeze window {:.1} ms; --pre-freeze to --post-thaw stamps {:.1} ms; checkpoint {} -> {}; history rows {} before, {} after",
                b.point,
                b.hooks
                    .iter()
                    .map(|(n, p, ms)| format!("{} {p} {ms:.1} ms", n.split(' ').next().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(", "),
                b.freeze_ms,
                b.stamps_ms,
                b.ckpt_before,
                b.ckpt_after,
                b.before,
                b.after
            );
            made.push(b);
        }
        if let Some(mut c) = bench.take() {
            stop_child(&mut c, nix::sys::signal::Signal::SIGINT);
        }
        let progress = std::fs::read_to_string(&bench_log).unwrap_or_default();
        for l in progress.lines().filter(|l| l.starts_with("progress:")) {
            println!("      pgbench {l}");
        }
        let total = count_history(&sock)?;
        println!("    pgbench committed {total} transactions in all");
        pg("pg_ctl", &["-D", &pgdata, "-m", "fast", "-w", "stop"])?;
        server_up = false;
        dev::run("umount", &[mnt.to_str().unwrap()])?;

        let mut prev_history = 0;
        for b in &made {
            let out = run_env(
                "blksnapctl",
                &[
                    "--json",
                    "restore",
                    "--point",
                    &b.point.to_string(),
                    dir.to_str().unwrap(),
                    &td,
                    "--device",
                    &name,
                ],
                &[],
                false,
            );
            if out.code != 0 {
                fail!("restore point {}: {}", b.point, out.stderr.trim());
            }
            let restore_s = out.secs;
            dev::run("mount", &[&td, rmnt.to_str().unwrap()])?;
            let r = (|| -> Result<String, String> {
                let cd = pg("pg_controldata", &["-D", &rpgdata])?;
                let state = control_field(&cd, "Database cluster state")?;
                let latest = control_field(&cd, "Latest checkpoint location")?;
                if lsn(&latest)? != lsn(&b.ckpt_after)? {
                    fail!(
                        "point {}: its latest checkpoint is at {latest}, not the one the pre-freeze hook made ({}; before the backup {})",
                        b.point,
                        b.ckpt_after,
                        b.ckpt_before
                    );
                }
                let _ = std::fs::remove_file(&rlog);
                let start = Instant::now();
                pg(
                    "pg_ctl",
                    &[
                        "-D",
                        &rpgdata,
                        "-l",
                        rlog.to_str().unwrap(),
                        "-w",
                        "-t",
                        "300",
                        "start",
                    ],
                )?;
                let started_s = start.elapsed().as_secs_f64();
                let r = (|| -> Result<String, String> {
                    let slog = std::fs::read_to_string(&rlog).unwrap_or_default();
                    let redo = |what: &str| {
                        slog.lines()
                            .find_map(|l| l.split(what).nth(1))
                            .and_then(|r| r.split_whitespace().next())
                            .map(|s| s.trim_end_matches(',').to_string())
                    };
                    let replayed = match (redo("redo starts at "), redo("redo done at ")) {
                        (Some(a), Some(z)) => format!(
                            "{} KiB of WAL replayed",
                            (lsn(&z)?.saturating_sub(lsn(&a)?)) >> 10
                        ),
                        _ => "no WAL to replay".to_string(),
                    };
                    if !slog.contains("database system was not properly shut down; automatic recovery in progress")
                        && !slog.contains("database system was interrupted")
                    {
                        fail!("point {}: the server did not say it recovered from a crash: {slog}", b.point);
                    }
                    let am = run_env(
                        &format!("{}/pg_amcheck", pg_bin()?),
                        &[
                            "-h",
                            sock.to_str().unwrap(),
                            "-U",
                            PG_USER,
                            "-d",
                            "postgres",
                            "--heapallindexed",
                            "--progress",
                        ],
                        &[],
                        true,
                    );
                    if am.code != 0 || !am.stdout.trim().is_empty() {
                        fail!(
                            "point {}: pg_amcheck --heapallindexed: exit {}: {}{}",
                            b.point,
                            am.code,
                            am.stdout,
                            am.stderr
                        );
                    }
                    let checked = am
                        .stderr
                        .rsplit(['\r', '\n'])
                        .find(|l| l.contains("relations"))
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    let sums = sql(
                        &sock,
                        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches), \
                         (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), \
                         (SELECT count(*) FROM pgbench_history)",
                    )?;
                    let v: Vec<i64> = sums
                        .split('|')
                        .map(|x| x.parse().map_err(|e| format!("sums {sums:?}: {e}")))
                        .collect::<Result<_, String>>()?;
                    if v.len() != 5 || v[0] != v[1] || v[1] != v[2] || v[2] != v[3] {
                        fail!("point {}: pgbench's balances differ: accounts|branches|tellers|history|rows = {sums}", b.point);
                    }
                    let rows = v[4] as u64;
                    if rows < b.before || rows > b.after {
                        fail!(
                            "point {}: {rows} transactions, but {} were committed before the backup started and {} when it ended",
                            b.point,
                            b.before,
                            b.after
                        );
                    }
                    if rows <= prev_history {
                        fail!("point {}: {rows} transactions, no more than the point before ({prev_history})", b.point);
                    }
                    prev_history = rows;
                    Ok(format!(
                        "cluster state in the image \"{state}\", latest checkpoint {latest} = the hook's; started in {started_s:.1} s ({replayed}); \
                         pg_amcheck --heapallindexed: no corruption ({checked}); balance {} = {} = {} = {} (accounts, branches, tellers, history) over {rows} transactions \
                         (committed: {} before the backup, {} after)",
                        v[0], v[1], v[2], v[3], b.before, b.after
                    ))
                })();
                let stopped = pg("pg_ctl", &["-D", &rpgdata, "-m", "fast", "-w", "stop"]);
                let mut line = r?;
                stopped?;
                let ck = pg("pg_checksums", &["--check", "-D", &rpgdata])?;
                let bad = control_field(&ck, "Bad checksums")?;
                let blocks = control_field(&ck, "Blocks scanned")?;
                if bad != "0" {
                    fail!("point {}: pg_checksums: {bad} bad checksums: {ck}", b.point);
                }
                line.push_str(&format!(
                    "; pg_checksums --check: {blocks} blocks, {bad} bad"
                ));
                Ok(line)
            })();
            let _ = dev::run("umount", &[rmnt.to_str().unwrap()]);
            let line = r?;
            println!(
                "    point {} ({}): restored in {restore_s:.1} s; {line}",
                b.point, b.kind
            );
        }
        println!(
            "    freeze windows with the hooks: {} ms",
            made.iter()
                .map(|b| format!("{:.1}", b.freeze_ms))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    })();
    if let Some(mut c) = bench.take() {
        stop_child(&mut c, nix::sys::signal::Signal::SIGINT);
    }
    if server_up {
        let _ = pg("pg_ctl", &["-D", &pgdata, "-m", "immediate", "-w", "stop"]);
    }
    // What each checkpoint of the origin cost (the hook's CHECKPOINT).
    for l in std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("checkpoint complete"))
    {
        println!("    server: {l}");
    }
    if r.is_err() {
        for f in [&log, &rlog] {
            let s = std::fs::read_to_string(f).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            println!("    {} (last lines):", f.display());
            for l in &lines[lines.len().saturating_sub(30)..] {
                println!("      | {l}");
            }
        }
    }
    let _ = dev::run("umount", &[mnt.to_str().unwrap()]);
    drop(tracked);
    let _ = std::fs::remove_dir_all(&dir);
    println!("    ({:.1} s in all)", t0.elapsed().as_secs_f64());
    r
}

/// No snapshot exists.
fn no_snapshot() -> TestResult {
    let ids = blksnap::Control::open()
        .map_err(crate::snap::e)?
        .snapshot_collect()
        .map_err(crate::snap::e)?;
    if !ids.is_empty() {
        fail!("snapshots left: {ids:?}");
    }
    Ok(())
}

/// `blksnapctl ARGS` must exit `code` with `want` (each) in its stderr.
fn ctl_expect(
    args: &[&str],
    env: &[(&str, &str)],
    code: i32,
    want: &[&str],
) -> Result<Out, String> {
    let out = run_env("blksnapctl", args, env, false);
    if out.code != code {
        fail!(
            "blksnapctl {}: exit {}, want {code}",
            args.join(" "),
            out.code
        );
    }
    for w in want {
        if !out.stderr.contains(w) {
            fail!("blksnapctl {}: no {w:?} in its stderr", args.join(" "));
        }
    }
    Ok(out)
}

fn failing_or_hanging_hooks() -> TestResult {
    let src = disk("blksnap-c")?;
    let sd = src.to_str().unwrap().to_string();
    let scratch = dev::scratch();
    let dir = scratch.join("app-fail-points");
    let hooks_dir = scratch.join("app-fail-hooks.d");
    let log = scratch.join("app-fail-log");
    let pids = scratch.join("app-fail-pids");
    for d in [&dir, &hooks_dir] {
        fresh_dir(d)?;
    }
    let _ = std::fs::remove_file(&log);
    let lg = log.display().to_string();
    let hook = |name: &str, body: &str| -> TestResult {
        let p = hooks_dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())
    };
    // A directory hook that records its phases; a second one fails its
    // pre-freeze with some output.
    hook(
        "10-record",
        &format!("echo \"10-record $1 ${{BLKSNAP_TAKE_RESULT:-}}\" >>{lg}"),
    )?;
    let store = scratch.to_str().unwrap().to_string();
    let hd = hooks_dir.to_str().unwrap().to_string();
    let env = [("BLKSNAP_HOOKS_DIR", hd.as_str())];
    if let Ok(t) = blksnap::Tracker::open(&src) {
        let _ = t.detach();
    }
    let _t = Tracked::new(&src)?;
    dev::write_direct(&src, 0, 2048, 7)?;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let backup_args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "backup",
            "full",
            &sd,
            "--store",
            &store,
            "--limit",
            "64M",
            "--to",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    fn argv(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    // 1. A failing pre-freeze command: no take, the posts ran, its output
    // and exit status in the message.
    let a = backup_args(&[
        "--pre-freeze",
        "echo cannot flush the tables; echo disk full >&2; exit 3",
        "--post-thaw",
        &format!("echo \"post-cmd $BLKSNAP_TAKE_RESULT\" >>{lg}"),
    ]);
    ctl_expect(
        &argv(&a),
        &env,
        1,
        &[
            "the snapshot is not taken: hook --pre-freeze 'echo cannot flush the tables; echo disk full >&2; exit 3' pre-freeze: exit status 3 in ",
            "    | cannot flush the tables\n",
            "    | disk full",
        ],
    )?;
    check_eq!(
        read_log(),
        "10-record pre-freeze \npost-cmd aborted\n10-record post-thaw aborted\n".to_string(),
        "the hooks that ran around the aborted take"
    );
    no_snapshot()?;
    let chain = blksnap::points::chain_dir(&dir, &src);
    check_eq!(
        blksnap::points::scan(&chain)?.len(),
        0,
        "restore points (even in progress) after the aborted backup"
    );

    // 2. A directory hook that hangs with a process it started: killed
    // with it at the timeout.
    let _ = std::fs::remove_file(&log);
    hook(
        "20-hang",
        &format!(
            "[ \"$1\" = post-thaw ] && {{ echo \"20-hang post-thaw $BLKSNAP_TAKE_RESULT\" >>{lg}; exit 0; }}\nsleep 600 & echo $! >{p}; echo $$ >>{p}; echo waiting for the lock; sleep 600",
            p = pids.display()
        ),
    )?;
    let a = backup_args(&["--hook-timeout", "2"]);
    let start = Instant::now();
    ctl_expect(
        &argv(&a),
        &env,
        1,
        &[
            "the snapshot is not taken: hook 20-hang pre-freeze: timed out, killed with its process group in ",
            "    | waiting for the lock",
        ],
    )?;
    let took = start.elapsed();
    if took > Duration::from_secs(30) {
        fail!("the hanging hook took {took:?} to be given up (timeout 2 s)");
    }
    check_eq!(
        read_log(),
        "10-record pre-freeze \n20-hang post-thaw aborted\n10-record post-thaw aborted\n"
            .to_string(),
        "the hooks around the timed out one"
    );
    for p in std::fs::read_to_string(&pids)
        .map_err(|e| e.to_string())?
        .split_whitespace()
    {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        if !stat.is_empty() && !stat.contains(") Z ") {
            fail!("process {p} of the hung hook is still there: {stat}");
        }
    }
    println!(
        "    the hung hook was given up after {:.1} s (timeout 2 s)",
        took.as_secs_f64()
    );
    no_snapshot()?;
    std::fs::remove_file(hooks_dir.join("20-hang")).map_err(|e| e.to_string())?;

    // 3. A failing post-thaw hook: exit 4, the backup is complete.
    let _ = std::fs::remove_file(&log);
    let a = backup_args(&["--post-thaw", "echo cannot unlock; exit 5"]);
    let out = ctl_expect(
        &argv(&a),
        &env,
        4,
        &[
            "1 post-thaw hook failed (the snapshot itself is valid):",
            "hook --post-thaw 'echo cannot unlock; exit 5' post-thaw: exit status 5 in ",
            "    | cannot unlock",
        ],
    )?;
    let _ = out;
    check_eq!(
        read_log(),
        "10-record pre-freeze \n10-record post-thaw taken\n".to_string(),
        "the hooks around a take with a failing post-thaw hook"
    );
    let latest = blksnap::points::latest(&chain)?
        .ok_or("no complete point after the backup with a failing post-thaw hook")?;
    check_eq!(latest.number, 1, "the point made");
    no_snapshot()?;

    // 4. snapshot take: the hooks with --device; a failing pre-freeze
    // hook leaves the snapshot untaken.
    let _ = std::fs::remove_file(&log);
    let ctl = blksnap::Control::open().map_err(crate::snap::e)?;
    let id = ctl
        .snapshot_create(&scratch, 64 << 11)
        .map_err(crate::snap::e)?;
    let tracker = blksnap::Tracker::open(&src).map_err(crate::snap::e)?;
    tracker.snapshot_add(&id).map_err(crate::snap::e)?;
    let ids = id.to_string();
    let r = (|| -> TestResult {
        ctl_expect(
            &[
                "snapshot",
                "take",
                &ids,
                "--device",
                &sd,
                "--pre-freeze",
                "exit 1",
            ],
            &env,
            1,
            &[
                "the snapshot is not taken",
                &format!("snapshot {ids} is still there, not taken"),
            ],
        )?;
        check_eq!(
            tracker.snapshot_info().map_err(crate::snap::e)?.image,
            "",
            "the image of the untaken snapshot"
        );
        let out = ctl_expect(
            &[
                "--json",
                "snapshot",
                "take",
                &ids,
                "--device",
                &sd,
                "--pre-freeze",
                &format!("echo \"cmd $BLKSNAP_SNAPSHOT_ID $BLKSNAP_DEVICES $BLKSNAP_HOOK_TIMEOUT\" >>{lg}"),
            ],
            &env,
            0,
            &["freeze window "],
        )?;
        let v: Value =
            serde_json::from_str(&out.stdout).map_err(|e| format!("snapshot take --json: {e}"))?;
        if v["hooks"]["freeze_ms"].as_f64().is_none()
            || v["hooks"]["hooks"].as_array().map(Vec::len) != Some(3)
        {
            fail!("snapshot take --json: {v}");
        }
        if tracker
            .snapshot_info()
            .map_err(crate::snap::e)?
            .image
            .is_empty()
        {
            fail!("snapshot take with hooks: no image");
        }
        check_eq!(
            read_log(),
            format!(
                "10-record pre-freeze \n10-record post-thaw aborted\n10-record pre-freeze \ncmd {ids} {sd} 60\n10-record post-thaw taken\n"
            ),
            "the hooks of snapshot take"
        );
        Ok(())
    })();
    let _ = ctl.snapshot_destroy(&id);
    r?;

    // 4b. Ctrl-C (SIGINT) while a pre-freeze hook runs: the take and the
    // post-thaw hooks still run, then exit 130 saying so.
    let _ = std::fs::remove_file(&log);
    let id = ctl
        .snapshot_create(&scratch, 64 << 11)
        .map_err(crate::snap::e)?;
    tracker.snapshot_add(&id).map_err(crate::snap::e)?;
    let ids = id.to_string();
    let r = (|| -> TestResult {
        let child = Command::new("blksnapctl")
            .args([
                "snapshot",
                "take",
                &ids,
                "--device",
                &sd,
                "--pre-freeze",
                &format!("echo pre >>{lg}; sleep 3"),
                "--post-thaw",
                &format!("echo \"post $BLKSNAP_TAKE_RESULT\" >>{lg}"),
            ])
            .env("BLKSNAP_HOOKS_DIR", &hd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("blksnapctl: {e}"))?;
        let t = Instant::now();
        while !read_log().contains("pre\n") {
            if t.elapsed() > Duration::from_secs(60) {
                fail!("the --pre-freeze command did not start: {:?}", read_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .map_err(|e| e.to_string())?;
        let o = child.wait_with_output().map_err(|e| e.to_string())?;
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        println!(
            "    SIGINT during the pre-freeze hook: {:?}; {}",
            o.status,
            stderr.trim()
        );
        check_eq!(
            read_log(),
            "10-record pre-freeze \npre\npost taken\n10-record post-thaw taken\n".to_string(),
            "the hooks around a take interrupted during its pre-freeze hook"
        );
        check_eq!(o.status.code(), Some(130), "the exit status after SIGINT");
        if !stderr.contains(&format!(
            "interrupted; snapshot {ids} is taken and the post-thaw hooks ran"
        )) {
            fail!("no word of the interruption: {stderr}");
        }
        if tracker
            .snapshot_info()
            .map_err(crate::snap::e)?
            .image
            .is_empty()
        {
            fail!("the interrupted take: no image");
        }
        Ok(())
    })();
    let _ = ctl.snapshot_destroy(&id);
    r?;

    // 5. verify --source takes a snapshot: the hooks run; one that fails
    // aborts it before it reads anything.
    let _ = std::fs::remove_file(&log);
    ctl_expect(
        &[
            "verify",
            "--source",
            &sd,
            dir.to_str().unwrap(),
            "--store",
            &store,
            "--pre-freeze",
            &format!("echo \"verify $BLKSNAP_DEVICES\" >>{lg}; exit 2"),
        ],
        &env,
        1,
        &["the snapshot is not taken: hook --pre-freeze 'echo \"verify $BLKSNAP_DEVICES\""],
    )?;
    check_eq!(
        read_log(),
        format!("10-record pre-freeze \nverify {sd}\n10-record post-thaw aborted\n"),
        "the hooks of verify --source"
    );
    no_snapshot()?;
    // A hooks directory others may write: refused, nothing runs.
    let _ = std::fs::remove_file(&log);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hooks_dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| e.to_string())?;
    let a = backup_args(&[]);
    ctl_expect(
        &argv(&a),
        &env,
        1,
        &[&format!("refusing the hooks: directory {hd}: it is writable by its group and others (mode 0777)")],
    )?;
    check_eq!(
        read_log(),
        String::new(),
        "what ran with a refused directory"
    );
    no_snapshot()?;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&hooks_dir);
    Ok(())
}
