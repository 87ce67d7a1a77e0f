// SPDX-License-Identifier: GPL-2.0

//! The CBT state device within one boot: bad input, and the seal that a
//! save puts on the devices (the first write or detach after it marks the
//! saved state not clean before it goes on). Restoring across boots is in
//! reboot.rs (`run.sh reboot`).

use crate::dev::{self, AlignedBuf, SECTOR};
use crate::snap::{disk, e};
use crate::tests::raw_ctl;
use crate::{check_eq, fail, TestResult};
use blk_snap_logic::uapi::{self, ctl};
use blksnap::{Control, Restore, Tracker};
use nix::errno::Errno;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The tests, in the order they run.
pub const ALL: &[Test] = &[
    ("cbt_persist_bad_input", bad_input),
    ("cbt_persist_save_seals_until_a_write", seal),
];

const MIB: u64 = 1 << 20;

/// The clean flag of the state header (bytes 12..16, bit 0), and its magic,
/// read from the device without the page cache.
fn header_clean(state: &Path) -> Result<bool, String> {
    let b = dev::read_direct(state, 0, 8)?;
    if &b[..8] != b"BLKSNAPS" {
        fail!("no state header on {}: {:?}", state.display(), &b[..8]);
    }
    Ok(u32::from_le_bytes(b[12..16].try_into().unwrap()) & 1 != 0)
}

/// The state device of these tests: a 16 MiB loop device on tmpfs. It stays
/// open in the module until the module unloads, so the tests end with a
/// reload, and then it is detached.
fn with_state_device(f: impl FnOnce(&Path) -> TestResult) -> TestResult {
    let lo = dev::LoopDev::new("cbt-state", 16 * MIB)?;
    let r = f(&lo.path);
    let reload = crate::removal::unload_and_reload();
    drop(lo);
    r.and(reload)
}

fn bad_input() -> TestResult {
    // A fresh module: no state device yet.
    crate::removal::unload_and_reload()?;
    let c = disk("blksnap-c")?;
    let d = disk("blksnap-d")?;
    let tc = Tracker::open(&c).map_err(e)?;
    tc.attach().map_err(e)?;
    let r = tc.persist("blksnap-c").map(|_| ()).map_err(|e| e.errno);
    tc.detach().map_err(e)?;
    check_eq!(r, Err(Errno::ENXIO), "CBTPERSIST without a state device");
    with_state_device(|state| {
        let ctl_dev = Control::open().map_err(e)?;
        let tc = Tracker::open(&c).map_err(e)?;
        tc.attach().map_err(e)?;
        let r = bad_input_on(state, &ctl_dev, &tc, &c, &d);
        let _ = tc.detach();
        r
    })
}

fn bad_input_on(state: &Path, ctl_dev: &Control, tc: &Tracker, c: &Path, d: &Path) -> TestResult {
    {
        // Never formatted: refused, nothing written.
        check_eq!(
            ctl_dev
                .cbt_state_device(state, false)
                .map(|_| ())
                .map_err(|e| e.errno),
            Err(Errno::ENODATA),
            "an unformatted state device"
        );
        check_eq!(
            dev::read_direct(state, 0, 8)?,
            vec![0u8; 4096],
            "the first block of the refused device"
        );
        // Bad flags and reserved bits.
        let cf = std::fs::File::open("/dev/blksnap-control").map_err(|e| e.to_string())?;
        for (flags, reserved) in [(2u32, 0u32), (1, 1)] {
            let path = std::ffi::CString::new(state.to_str().unwrap()).unwrap();
            let mut arg = uapi::BlksnapCbtStateDevice {
                bdev_path: path.as_ptr() as u64,
                flags,
                reserved,
                ..Default::default()
            };
            // SAFETY: `arg` and the path it points to are valid.
            let r = unsafe { blksnap::raw::blksnap_cbt_state_device(cf.as_raw_fd(), &mut arg) };
            check_eq!(
                r.map(|_| ()),
                Err(Errno::EINVAL),
                "state device flags {flags:#x} reserved {reserved}"
            );
        }
        // A bad path address.
        let mut arg = uapi::BlksnapCbtStateDevice {
            bdev_path: 8,
            ..Default::default()
        };
        // SAFETY: the kernel checks the bad address.
        let r = unsafe { blksnap::raw::blksnap_cbt_state_device(cf.as_raw_fd(), &mut arg) };
        check_eq!(
            r.map(|_| ()),
            Err(Errno::EFAULT),
            "state device path at address 8"
        );
        // Formatted: empty, not clean; the same again answers the same.
        let s = ctl_dev.cbt_state_device(state, true).map_err(e)?;
        check_eq!((s.records, s.clean), (0, false), "a formatted state device");
        check_eq!(
            header_clean(state)?,
            false,
            "the header of a formatted device"
        );
        let s = ctl_dev.cbt_state_device(state, false).map_err(e)?;
        check_eq!(
            (s.records, s.clean),
            (0, false),
            "the same state device again"
        );
        // Another one while it is open.
        check_eq!(
            ctl_dev
                .cbt_state_device(d, true)
                .map(|_| ())
                .map_err(|e| e.errno),
            Err(Errno::EBUSY),
            "a second state device"
        );
        // Names: the library checks them, so the kernel's checks are met
        // with raw commands: no NUL in 64 bytes, an empty one, flags.
        for (id, flags, what) in [
            ([b'x'; 64], 0u32, "a name of 64 bytes without NUL"),
            ([0u8; 64], 0, "an empty name"),
            (name64("ok"), 1, "flags 1"),
        ] {
            let mut arg = uapi::BlksnapCbtpersist {
                id,
                flags,
                ..Default::default()
            };
            let len = std::mem::size_of::<uapi::BlksnapCbtpersist>() as u32;
            check_eq!(
                raw_ctl(
                    c,
                    "blksnap",
                    ctl::CBTPERSIST,
                    &mut arg as *mut _ as u64,
                    len
                ),
                Err(Errno::EINVAL),
                "CBTPERSIST with {what}"
            );
        }
        check_eq!(
            raw_ctl(c, "blksnap", ctl::CBTPERSIST, 8, 88),
            Err(Errno::EFAULT),
            "CBTPERSIST at address 8"
        );
        let mut arg = uapi::BlksnapCbtpersist {
            id: name64("short"),
            ..Default::default()
        };
        check_eq!(
            raw_ctl(c, "blksnap", ctl::CBTPERSIST, &mut arg as *mut _ as u64, 80),
            Err(Errno::EINVAL),
            "CBTPERSIST with 80 bytes"
        );
        // Registered; a repeat answers the same; another device may not
        // take the name.
        let p = tc.persist("blksnap-c").map_err(e)?;
        check_eq!(p.restored, Restore::NoneSaved, "the first CBTPERSIST");
        let p = tc.persist("blksnap-c").map_err(e)?;
        check_eq!(p.restored, Restore::NoneSaved, "a repeated CBTPERSIST");
        let td = Tracker::open(d).map_err(e)?;
        td.attach().map_err(e)?;
        check_eq!(
            td.persist("blksnap-c").map(|_| ()).map_err(|e| e.errno),
            Err(Errno::EEXIST),
            "CBTPERSIST of d under c's name"
        );
        // The state device itself may not be registered.
        let ts = Tracker::open(state).map_err(e)?;
        ts.attach().map_err(e)?;
        let r = ts.persist("state").map(|_| ()).map_err(|e| e.errno);
        ts.detach().map_err(e)?;
        td.detach().map_err(e)?;
        check_eq!(r, Err(Errno::EBUSY), "CBTPERSIST of the state device");
        Ok(())
    }
}

fn name64(s: &str) -> [u8; 64] {
    let mut a = [0u8; 64];
    a[..s.len()].copy_from_slice(s.as_bytes());
    a
}

fn seal() -> TestResult {
    crate::removal::unload_and_reload()?;
    let c = disk("blksnap-c")?;
    with_state_device(|state| {
        let ctl_dev = Control::open().map_err(e)?;
        let t = Tracker::open(&c).map_err(e)?;
        t.attach().map_err(e)?;
        let r = seal_on(state, &ctl_dev, &t, &c);
        let _ = t.detach();
        r
    })
}

fn seal_on(state: &Path, ctl_dev: &Control, t: &Tracker, c: &Path) -> TestResult {
    {
        ctl_dev.cbt_state_device(state, true).map_err(e)?;
        t.persist("blksnap-c").map_err(e)?;
        dev::write_direct(c, 0, 8, 0x11)?;
        let s = ctl_dev.cbt_save().map_err(e)?;
        check_eq!(s.devices, 1, "devices saved");
        println!("    saved {} bytes", s.bytes);
        check_eq!(header_clean(state)?, true, "the header after the save");
        // Reads pass a seal.
        dev::read_direct(c, 0, 8)?;
        check_eq!(header_clean(state)?, true, "the header after a read");
        // The first write waits for the header to be marked not clean.
        let f = dev::open_direct(c, true)?;
        let buf = AlignedBuf::new(4096, 0x5a);
        let start = Instant::now();
        f.write_all_at(buf.as_slice(), 32 * MIB)
            .map_err(|err| format!("a write after the save: {err}"))?;
        let took = start.elapsed();
        println!("    the first write after the save took {took:?}");
        if took > Duration::from_secs(10) {
            fail!("the first write after the save took {took:?}");
        }
        check_eq!(
            header_clean(state)?,
            false,
            "the header after a write to a sealed device"
        );
        check_eq!(
            dev::read_direct(c, 32 * MIB / SECTOR, 8)?,
            vec![0x5a; 4096],
            "the data of the write held by the seal"
        );
        // Later writes are not held; saving again seals again; a detach
        // breaks that seal too.
        dev::write_direct(c, 8, 8, 0x22)?;
        ctl_dev.cbt_save().map_err(e)?;
        check_eq!(
            header_clean(state)?,
            true,
            "the header after the second save"
        );
        t.detach().map_err(e)?;
        check_eq!(
            header_clean(state)?,
            false,
            "the header after the detach of a saved device"
        );
        // Nothing registered: a save writes an empty clean state.
        let s = ctl_dev.cbt_save().map_err(e)?;
        check_eq!(s.devices, 0, "devices saved after the detach");
        Ok(())
    }
}
