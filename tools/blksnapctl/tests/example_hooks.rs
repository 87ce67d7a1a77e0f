// SPDX-License-Identifier: GPL-2.0

//! The example hooks of dist/hooks.d, run as blksnapctl runs them (the
//! phase as argument, stdin from /dev/null): 50-sqlite checkpoints a WAL
//! database that a live connection keeps open, so that the database file
//! alone holds every row; 50-postgresql's settings (environment over
//! configuration file, a refused configuration file) and its answers when
//! no server answers. A real PostgreSQL under load is the guest test
//! `app_postgresql_points_under_pgbench`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn hook(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../dist/hooks.d")
        .join(name)
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blksnap-example-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Runs hook `name` with `phase` and the environment `env` (nothing else of
/// ours: no configuration file unless given); returns the exit code and
/// stdout + stderr.
fn run(name: &str, phase: &str, env: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new(hook(name));
    c.arg(phase)
        .stdin(Stdio::null())
        .env_remove("BLKSNAP_PG")
        .env_remove("BLKSNAP_PG_CONNINFO")
        .env_remove("BLKSNAP_PG_OSUSER")
        .env_remove("BLKSNAP_PG_BINDIR")
        .env_remove("BLKSNAP_SQLITE_DBS")
        .env("BLKSNAP_HOOKS_CONF", "/nonexistent/hooks.conf");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3 (scripts/deps.sh installs it)");
    assert!(out.status.success(), "sqlite3 {sql}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The rows the database file holds by itself (a copy without its log).
fn rows_in_main_file(db: &Path) -> String {
    let copy = db.with_extension("copy");
    let _ = fs::remove_file(&copy);
    fs::copy(db, &copy).unwrap();
    let n = sqlite(&copy, "SELECT count(*) FROM t");
    fs::remove_file(&copy).unwrap();
    n
}

#[test]
fn sqlite_hook_checkpoints_the_log_into_the_database_file() {
    let d = tempdir("sqlite");
    let db = d.join("app.db");
    assert_eq!(
        sqlite(&db, "PRAGMA journal_mode=WAL; CREATE TABLE t(x);"),
        "wal"
    );
    // An application's connection: 1000 rows committed into the log (no
    // automatic checkpoint), the connection kept open.
    let mut app = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(printf 'PRAGMA wal_autocheckpoint=0;\\nBEGIN;\\nWITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<1000) INSERT INTO t SELECT i FROM c;\\nCOMMIT;\\nSELECT \"committed\";\\n'; sleep 30) | sqlite3 {}",
            db.display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let wal = db.with_extension("db-wal");
    let mut waited = 0;
    while sqlite(&db, "SELECT count(*) FROM t") != "1000" {
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
        assert!(waited < 200, "the rows never came");
    }
    assert!(fs::metadata(&wal).unwrap().len() > 0);
    assert_eq!(rows_in_main_file(&db), "0", "the rows are in the log only");
    let dbs = format!("{} ", db.display());
    let (code, out) = run("50-sqlite", "pre-freeze", &[("BLKSNAP_SQLITE_DBS", &dbs)]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        format!("{}: checkpointed, log emptied (0|0|0)", db.display())
    );
    assert_eq!(fs::metadata(&wal).unwrap().len(), 0, "the log is emptied");
    assert_eq!(rows_in_main_file(&db), "1000", "the database file alone");
    // A listed database that is missing fails the hook (the take is
    // aborted), after the others were checkpointed.
    let missing = d.join("gone.db");
    let both = format!("{}\n{}", db.display(), missing.display());
    let (code, out) = run("50-sqlite", "pre-freeze", &[("BLKSNAP_SQLITE_DBS", &both)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{}: no such database", missing.display())),
        "{out}"
    );
    assert!(!missing.exists(), "sqlite3 must not create it");
    // Rollback journal mode: nothing to do.
    let plain = d.join("plain.db");
    sqlite(&plain, "CREATE TABLE t(x); INSERT INTO t VALUES (1);");
    let p = plain.display().to_string();
    let (code, out) = run("50-sqlite", "pre-freeze", &[("BLKSNAP_SQLITE_DBS", &p)]);
    assert_eq!(
        (code, out.trim()),
        (
            0,
            format!("{p}: not in WAL mode: nothing to checkpoint").as_str()
        )
    );
    // Nothing listed, post-thaw, another phase.
    let (code, out) = run("50-sqlite", "pre-freeze", &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "no databases listed (BLKSNAP_SQLITE_DBS): nothing to do")
    );
    let (code, out) = run(
        "50-sqlite",
        "post-thaw",
        &[("BLKSNAP_TAKE_RESULT", "taken")],
    );
    assert_eq!(
        (code, out.trim()),
        (0, "post-thaw: nothing to undo (take: taken)")
    );
    let _ = app.kill();
    let _ = app.wait();
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn postgresql_hook_settings_and_no_server() {
    let d = tempdir("pg");
    let bindir = "/usr/lib/postgresql/15/bin";
    assert!(
        Path::new(bindir).join("pg_isready").exists(),
        "PostgreSQL 15 (scripts/deps.sh installs it)"
    );
    // A socket directory where no server listens.
    let nothing = format!("host={} port=5999", d.display());
    let env = |pg: &'static str| {
        vec![
            ("BLKSNAP_PG", pg),
            ("BLKSNAP_PG_BINDIR", bindir),
            (
                "BLKSNAP_PG_CONNINFO",
                Box::leak(nothing.clone().into_boxed_str()) as &str,
            ),
        ]
    };
    let (code, out) = run("50-postgresql", "pre-freeze", &env("auto"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        format!("no PostgreSQL server answers ({nothing}): nothing to do")
    );
    let (code, out) = run("50-postgresql", "pre-freeze", &env("yes"));
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        format!("no PostgreSQL server answers ({nothing})")
    );
    let (code, out) = run("50-postgresql", "pre-freeze", &env("no"));
    assert_eq!((code, out.trim()), (0, "BLKSNAP_PG=no: nothing to do"));
    let (code, out) = run("50-postgresql", "pre-freeze", &env("maybe"));
    assert_eq!((code, out.trim()), (1, "BLKSNAP_PG=maybe: auto, yes or no"));
    // No client where BLKSNAP_PG_BINDIR says.
    let (code, out) = run(
        "50-postgresql",
        "pre-freeze",
        &[
            ("BLKSNAP_PG_BINDIR", "/nonexistent"),
            ("BLKSNAP_PG", "auto"),
        ],
    );
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "no /nonexistent/psql: PostgreSQL is not installed here; nothing to do"
        )
    );

    // The configuration file: read when the environment does not say;
    // the environment wins.
    let conf = d.join("hooks.conf");
    fs::write(
        &conf,
        format!("BLKSNAP_PG=yes\nBLKSNAP_PG_BINDIR={bindir}\nBLKSNAP_PG_CONNINFO='{nothing};port=5998 host={}'\n", d.display()),
    )
    .unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();
    let c = conf.display().to_string();
    let (code, out) = run("50-postgresql", "pre-freeze", &[("BLKSNAP_HOOKS_CONF", &c)]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("no PostgreSQL server answers ({nothing})"),
            format!(
                "no PostgreSQL server answers (port=5998 host={})",
                d.display()
            ),
        ]
    );
    let (code, out) = run(
        "50-postgresql",
        "pre-freeze",
        &[("BLKSNAP_HOOKS_CONF", &c), ("BLKSNAP_PG", "auto")],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
    // A configuration file others may write is not read: the hook fails.
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out) = run(
        "50-postgresql",
        "pre-freeze",
        &[("BLKSNAP_HOOKS_CONF", &c), ("BLKSNAP_PG", "auto")],
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        format!("{c}: owned by another user or writable by group or others: not read (the hooks run as root)")
    );
    let (code, out) = run(
        "50-postgresql",
        "post-thaw",
        &[("BLKSNAP_TAKE_RESULT", "aborted")],
    );
    assert_eq!(
        (code, out.trim()),
        (0, "post-thaw: nothing to undo (take: aborted)")
    );
    fs::remove_dir_all(&d).unwrap();
}
