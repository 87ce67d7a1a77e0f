// SPDX-License-Identifier: GPL-2.0

//! A 32-bit agent on the 64-bit kernel: `tests/compat32/client.c`, built
//! with `gcc -m32 -static`, goes through attach, CBT reads and marks, and a
//! snapshot's create, collect, add, take and destroy; what it prints must
//! match what the 64-bit library sees.

use crate::dev;
use crate::snap::{disk, e};
use crate::{check_eq, fail, TestResult};
use blksnap::Tracker;
use std::collections::HashMap;
use std::path::PathBuf;

type Test = (&'static str, fn() -> TestResult);

/// The tests, in the order they run.
pub const ALL: &[Test] = &[("compat_32bit_client", client32)];

/// The 32-bit client, built by the Makefile next to the module.
fn client_path() -> Result<PathBuf, String> {
    let ko = dev::module_path()?;
    let repo = ko
        .parent()
        .and_then(|p| p.parent())
        .ok_or("module path has no repository")?;
    Ok(repo.join("target/compat32/client32"))
}

fn client32() -> TestResult {
    let a = disk("blksnap-a")?;
    let client = client_path()?;
    let store = dev::scratch();
    let out = std::process::Command::new(&client)
        .args([a.to_str().unwrap(), store.to_str().unwrap()])
        .output()
        .map_err(|err| format!("{}: {err}", client.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    for l in stdout.lines() {
        println!("    32-bit: {l}");
    }
    let kv: HashMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once(' ')).collect();
    if let Some(err) = kv.get("error") {
        fail!("the 32-bit client failed: {err}");
    }
    if !out.status.success() || !stdout.lines().any(|l| l == "done") {
        fail!("the 32-bit client exited with {}: {stdout}", out.status);
    }
    // Built for i386: the structures with a __u64 after a __u32 are smaller.
    check_eq!(kv.get("sizeof_attach"), Some(&"44"), "32-bit struct size");
    check_eq!(kv.get("sizeof_collect"), Some(&"12"), "32-bit struct size");
    // The device is detached again; its CBT as a fresh 64-bit attach sees it
    // must have the same geometry.
    let t = Tracker::open(&a).map_err(e)?;
    t.attach().map_err(e)?;
    let info = t.cbt_info().map_err(e);
    let _ = t.detach();
    let info = info?;
    check_eq!(
        kv.get("capacity").map(|v| v.to_string()),
        Some(info.device_capacity.to_string()),
        "capacity seen by the 32-bit client"
    );
    check_eq!(
        kv.get("block_size").map(|v| v.to_string()),
        Some(info.block_size.to_string()),
        "block size seen by the 32-bit client"
    );
    check_eq!(
        kv.get("block_count").map(|v| v.to_string()),
        Some(info.block_count.to_string()),
        "block count seen by the 32-bit client"
    );
    check_eq!(
        kv.get("active_block0"),
        Some(&"1"),
        "block 0 after CBTDIRTY of sectors 0..127"
    );
    check_eq!(kv.get("collect_count"), Some(&"1"), "snapshots collected");
    check_eq!(
        kv.get("collected"),
        kv.get("snapshot"),
        "the collected id is the created one"
    );
    check_eq!(kv.get("error_code"), Some(&"0"), "snapshot error");
    if !kv
        .get("image")
        .is_some_and(|i| i.starts_with("blk-snap-image"))
    {
        fail!("no image name: {:?}", kv.get("image"));
    }
    check_eq!(
        kv.get("changes_number_after"),
        Some(&"1"),
        "changes number after the take"
    );
    check_eq!(
        kv.get("snapshot_block0"),
        Some(&"1"),
        "block 0 in the snapshot's map"
    );
    Ok(())
}
