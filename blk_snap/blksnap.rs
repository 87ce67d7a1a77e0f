// SPDX-License-Identifier: GPL-2.0

//! blksnap: change block tracking and snapshots for any block device.
//!
//! The module registers the `blksnap` block device filter and the
//! `/dev/blksnap-control` device. Attaching the filter to a disk or partition
//! starts tracking which of its blocks change; user space reads that map to
//! back up only what changed.

use kernel::{
    alloc::{flags::GFP_KERNEL, KBox},
    block::filter,
    c_str,
    miscdevice::{MiscDeviceOptions, MiscDeviceRegistration},
    prelude::*,
};

// Shared with the host tests (blk_snap/host.rs): some items serve only the
// tests or later features, and `pub` is their interface there.
#[allow(dead_code, unreachable_pub)]
#[path = "logic/cbt.rs"]
mod cbt;
mod cbt_map;
#[allow(dead_code, unreachable_pub)]
#[path = "logic/chunk.rs"]
mod chunk;
mod ctl;
mod diff_area;
mod diff_storage;
mod event_queue;
#[allow(dead_code, unreachable_pub)]
#[path = "logic/fine.rs"]
mod fine;
mod fine_map;
#[allow(dead_code, unreachable_pub)]
#[path = "logic/fingerprint.rs"]
mod fingerprint;
mod io;
mod params;
mod persist;
#[allow(dead_code, unreachable_pub)]
#[path = "logic/persist.rs"]
mod persist_format;
mod snapimage;
mod snapshot;
#[allow(dead_code, unreachable_pub)]
#[path = "logic/store.rs"]
mod store;
mod tracker;
#[allow(dead_code, unreachable_pub)]
mod uapi;

module! {
    type: BlkSnap,
    name: "blksnap",
    author: "blk-snap developers",
    description: "Change block tracking and snapshots for block devices",
    license: "GPL",
}

struct BlkSnap {
    control: Option<Pin<KBox<MiscDeviceRegistration<ctl::Control>>>>,
    filter: Option<Pin<KBox<filter::Registration<tracker::TrackerFilter>>>>,
    /// The module-wide state. The module owns it; the entry points reach it
    /// through `snapshot::globals`, only while they hold the module.
    globals: Option<kernel::sync::Arc<snapshot::Globals>>,
}

impl kernel::Module for BlkSnap {
    fn init(module: &'static ThisModule) -> Result<Self> {
        let v = uapi::VERSION;
        pr_info!(
            "blksnap {}.{}.{}.{} loading\n",
            v.major,
            v.minor,
            v.revision,
            v.build
        );
        let globals = snapshot::init_globals(module)?;
        let control = KBox::pin_init(
            MiscDeviceRegistration::register(
                MiscDeviceOptions {
                    name: c_str!("blksnap-control"),
                    mode: 0o600,
                },
                module,
            ),
            GFP_KERNEL,
        );
        let control = match control {
            Ok(c) => c,
            Err(e) => {
                snapshot::exit_globals(globals);
                return Err(e);
            }
        };
        // Registered last: once registered, the filter can be attached.
        let filter = match KBox::pin_init(filter::Registration::new(module), GFP_KERNEL) {
            Ok(f) => f,
            Err(e) => {
                drop(control);
                snapshot::exit_globals(globals);
                return Err(e);
            }
        };
        Ok(Self {
            control: Some(control),
            filter: Some(filter),
            globals: Some(globals),
        })
    }
}

impl Drop for BlkSnap {
    fn drop(&mut self) {
        pr_info!("blksnap unloading\n");
        // No control file is open and no filter is attached (both pin the
        // module): stop both entry points, then tear down the snapshots.
        drop(self.control.take());
        drop(self.filter.take());
        if let Some(g) = self.globals.take() {
            snapshot::exit_globals(g);
        }
    }
}
