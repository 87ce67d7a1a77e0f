// SPDX-License-Identifier: GPL-2.0

//! Host tests of the persistent CBT commands: what they do without the
//! module, with no configuration, and with a broken one.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blksnapctl"))
}

fn tmp_file(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("blksnapctl-cbt-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn boot_without_a_config_is_quiet() {
    let none = std::env::temp_dir().join("blksnapctl-cbt-no-such.conf");
    for extra in [&[][..], &["--device", "/dev/null"], &["--json"]] {
        let o = bin()
            .args(["cbt", "boot", "--config"])
            .arg(&none)
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(o.stdout.is_empty() && o.stderr.is_empty());
    }
}

#[test]
fn boot_with_a_bad_config_names_the_line() {
    let p = tmp_file(
        "bad.conf",
        "# cbt\nstate /dev/disk/by-id/x\ntrak /dev/vdb\n",
    );
    let o = run(&["cbt", "boot", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("line 3: unknown keyword `trak` (expected `state` or `track`)"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    std::fs::remove_file(p).ok();
}

#[test]
fn boot_for_a_device_not_in_the_config_is_quiet() {
    // Entries that do not exist are skipped; /dev/null is none of them, so
    // nothing is done, not even opening the control device.
    let p = tmp_file(
        "other.conf",
        "state /dev/disk/by-id/blksnapctl-test-none\ntrack /dev/disk/by-id/blksnapctl-test-none-2\n",
    );
    let o = run(&[
        "cbt",
        "boot",
        "--config",
        p.to_str().unwrap(),
        "--device",
        "/dev/null",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
    std::fs::remove_file(p).ok();
}

#[test]
fn boot_without_the_state_device_fails() {
    let p = tmp_file(
        "nostate.conf",
        "state /dev/disk/by-id/blksnapctl-test-none\ntrack /dev/disk/by-id/blksnapctl-test-none-2\n",
    );
    let o = run(&["cbt", "boot", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("the state device /dev/disk/by-id/blksnapctl-test-none is not there"),
        "{e}"
    );
    std::fs::remove_file(p).ok();
}

#[test]
fn persist_checks_the_id_first() {
    for id in ["", &"x".repeat(64)] {
        let o = run(&["cbt", "persist", "/dev/blksnapctl-test-none", "--id", id]);
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert!(e.contains("1 to 63 bytes"), "{e}");
        assert!(e.contains("EINVAL"), "{e}");
    }
}

#[test]
fn usage_and_missing_module() {
    for args in [
        &["cbt", "state-device"][..],
        &["cbt", "persist", "/dev/x"],
        &["cbt", "save", "/dev/x"],
        &["cbt", "boot", "--device"],
    ] {
        assert_eq!(run(args).status.code(), Some(2), "{args:?}");
    }
    if std::path::Path::new("/dev/blksnap-control").exists() {
        return;
    }
    for args in [&["cbt", "save"][..], &["cbt", "state-device", "/dev/null"]] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("/dev/blksnap-control"), "{e}");
    }
}

fn repo() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_example_config_parses() {
    let p = repo().join("dist/blksnap/cbt.conf.example");
    let c = blksnap::boot::load(&p)
        .unwrap()
        .expect("the example exists");
    assert!(c.state.is_some());
    assert!(c.track.len() >= 2);
    // The long by-id name needs (and has) an explicit id.
    assert!(c.track.iter().any(|t| t.id == "root"));
}

#[test]
fn the_shutdown_hook_is_executable_and_quiet_without_the_module() {
    use std::os::unix::fs::PermissionsExt;
    let hook = repo().join("dist/systemd/blksnap-cbt.shutdown");
    let mode = std::fs::metadata(&hook).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "mode {mode:o}");
    let o = Command::new("sh").arg("-n").arg(&hook).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    if std::path::Path::new("/dev/blksnap-control").exists() {
        return;
    }
    let o = Command::new(&hook).arg("reboot").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
}
