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
    (
        "cbt_persist_dirty_take_and_image_write_after_a_save_break_its_seal",
        changes_break_the_seal,
    ),
    ("cbt_save_waits_for_the_writes_in_flight", save_drains),
    (
        "cbt_state_mirror_is_marked_when_the_state_device_fails",
        mirror,
    ),
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

/// Whether the `i`th saved record on `state` may still be restored, read
/// without the page cache: the header says clean and (format 2) the
/// record's broken bit (byte 128 + i / 8, bit i % 8) is clear. Format 1 had
/// one clean flag for all records.
pub(crate) fn record_usable(state: &Path, i: u32) -> Result<bool, String> {
    let b = dev::read_direct(state, 0, 8)?;
    let clean = header_clean(state)?;
    match u32::from_le_bytes(b[8..12].try_into().unwrap()) {
        1 => Ok(clean),
        2 => Ok(clean && b[128 + i as usize / 8] & (1 << (i % 8)) == 0),
        v => fail!("state header version {v} on {}", state.display()),
    }
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
        for (flags, reserved) in [(4u32, 0u32), (1, 1)] {
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
        // Names, identities, flags: the library checks them, so the
        // kernel's checks are met with raw commands, of the first version
        // of the structure (88 bytes) and of the whole.
        let full = |id, flags, identity, reserved| uapi::BlksnapCbtpersistFull {
            v1: uapi::BlksnapCbtpersist {
                id,
                flags,
                ..Default::default()
            },
            ext: uapi::BlksnapCbtpersistExt {
                identity,
                reserved,
                ..Default::default()
            },
        };
        let v1 = std::mem::size_of::<uapi::BlksnapCbtpersist>() as u32;
        let whole = std::mem::size_of::<uapi::BlksnapCbtpersistFull>() as u32;
        for (mut arg, len, what) in [
            (
                full([b'x'; 64], 0, [0; 128], 0),
                v1,
                "a name of 64 bytes without NUL",
            ),
            (full([0u8; 64], 0, [0; 128], 0), v1, "an empty name"),
            (full(name64("ok"), 2, [0; 128], 0), v1, "flags 2"),
            (
                full(name64("ok"), 0, [b'i'; 128], 0),
                whole,
                "an identity of 128 bytes without NUL",
            ),
            (full(name64("ok"), 0, [0; 128], 1), whole, "reserved 1"),
        ] {
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
            record_usable(state, 0)?,
            false,
            "the saved record after a write to a sealed device"
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
            record_usable(state, 0)?,
            false,
            "the saved record after the detach of a saved device"
        );
        // Nothing registered: a save writes an empty clean state.
        let s = ctl_dev.cbt_save().map_err(e)?;
        check_eq!(s.devices, 0, "devices saved after the detach");
        Ok(())
    }
}

/// Whether the tests run against a module without the CBTPERSIST flags and
/// mirrors (`BLKSNAP_TEST_OLD_MODULE=1`), to show what it gets wrong: no
/// flags are given then.
pub(crate) fn old_module() -> bool {
    std::env::var("BLKSNAP_TEST_OLD_MODULE").is_ok_and(|v| v == "1")
}

/// A state device as a device-mapper linear device over a loop device on
/// tmpfs, so that a test can swap its table for `error`.
struct DmState {
    name: String,
    path: std::path::PathBuf,
}

impl DmState {
    fn new(name: &str, lower: &Path, sectors: u64) -> Result<Self, String> {
        let table = format!("0 {sectors} linear {} 0", lower.display());
        dev::run("dmsetup", &["create", name, "--table", &table])?;
        dev::udev_settle();
        Ok(Self {
            name: name.into(),
            path: Path::new("/dev/mapper").join(name),
        })
    }

    /// Every I/O to it fails from now on.
    fn fail_io(&self, sectors: u64) -> TestResult {
        let table = format!("0 {sectors} error");
        dev::run("dmsetup", &["suspend", &self.name])?;
        dev::run("dmsetup", &["load", &self.name, "--table", &table])?;
        dev::run("dmsetup", &["resume", &self.name])?;
        Ok(())
    }
}

impl Drop for DmState {
    fn drop(&mut self) {
        let _ = dev::run("dmsetup", &["remove", "--retry", &self.name]);
    }
}

/// Item 4 of issue 21: anything that changes a saved device's CBT after the
/// save marks its record broken before it returns: a `CBTDIRTY`, a take, a
/// write to its snapshot image; the other device's record stays usable.
fn changes_break_the_seal() -> TestResult {
    crate::removal::unload_and_reload()?;
    let c = disk("blksnap-c")?;
    let d = disk("blksnap-d")?;
    with_state_device(|state| {
        let ctl_dev = Control::open().map_err(e)?;
        let tc = Tracker::open(&c).map_err(e)?;
        let td = Tracker::open(&d).map_err(e)?;
        tc.attach().map_err(e)?;
        td.attach().map_err(e)?;
        let r = changes_break_the_seal_on(state, &ctl_dev, &tc, &td);
        // Whatever failed, no snapshot stays: the module reloads after.
        for id in ctl_dev.snapshot_collect().unwrap_or_default() {
            let _ = ctl_dev.snapshot_destroy(&id);
        }
        let _ = tc.detach();
        let _ = td.detach();
        r
    })
}

fn changes_break_the_seal_on(
    state: &Path,
    ctl_dev: &Control,
    tc: &Tracker,
    td: &Tracker,
) -> TestResult {
    ctl_dev.cbt_state_device(state, true).map_err(e)?;
    // Records in the order of registration: c is 0, d is 1.
    tc.persist_as("blksnap-c", "c", !old_module()).map_err(e)?;
    td.persist_as("blksnap-d", "d", !old_module()).map_err(e)?;
    let usable = || -> Result<(bool, bool), String> {
        Ok((record_usable(state, 0)?, record_usable(state, 1)?))
    };
    ctl_dev.cbt_save().map_err(e)?;
    check_eq!(usable()?, (true, true), "records after the save");
    // CBTDIRTY of c.
    tc.mark_dirty(&[blksnap::SectorRange {
        offset: 0,
        count: 8,
    }])
    .map_err(e)?;
    check_eq!(
        usable()?,
        (false, true),
        "records (c, d) once CBTDIRTY of c returned"
    );
    // A take of d.
    ctl_dev.cbt_save().map_err(e)?;
    check_eq!(usable()?, (true, true), "records after the second save");
    let store = dev::scratch().join("persist-store");
    std::fs::create_dir_all(&store).map_err(|err| err.to_string())?;
    let id = ctl_dev
        .snapshot_create(&store, 64 * MIB / SECTOR)
        .map_err(e)?;
    td.snapshot_add(&id).map_err(e)?;
    ctl_dev.snapshot_take(&id).map_err(e)?;
    check_eq!(
        usable()?,
        (true, false),
        "records (c, d) once the take of a snapshot of d returned"
    );
    ctl_dev.snapshot_destroy(&id).map_err(e)?;
    // A write to c's snapshot image, taken before the save.
    let id = ctl_dev
        .snapshot_create(&store, 64 * MIB / SECTOR)
        .map_err(e)?;
    tc.snapshot_add(&id).map_err(e)?;
    ctl_dev.snapshot_take(&id).map_err(e)?;
    ctl_dev.cbt_save().map_err(e)?;
    check_eq!(usable()?, (true, true), "records after the third save");
    let image = Path::new("/dev").join(tc.snapshot_info().map_err(e)?.image);
    dev::write_direct(&image, 64, 8, 0x3c)?;
    check_eq!(
        usable()?,
        (false, true),
        "records (c, d) once a write to c's snapshot image returned"
    );
    ctl_dev.snapshot_destroy(&id).map_err(e)?;
    Ok(())
}

/// Item 5 of issue 21: a save drains the writes in flight, as a take does:
/// with a write kept in flight for seconds by QEMU's throttle (disk
/// `blksnap-g`, 64 KiB/s), the save returns after the write completed.
fn save_drains() -> TestResult {
    crate::removal::unload_and_reload()?;
    let g = disk("blksnap-g")?;
    with_state_device(|state| {
        let ctl_dev = Control::open().map_err(e)?;
        let t = Tracker::open(&g).map_err(e)?;
        t.attach().map_err(e)?;
        let r = (|| -> TestResult {
            ctl_dev.cbt_state_device(state, true).map_err(e)?;
            t.persist_as("blksnap-g", "g", !old_module()).map_err(e)?;
            // The throttle lets the first write pass at once and fills its
            // bucket: the next one as large waits for it to drain.
            {
                let f = dev::open_direct(&g, true)?;
                let buf = AlignedBuf::new(256 << 10, 0x01);
                f.write_all_at(buf.as_slice(), 0)
                    .map_err(|err| format!("the sacrificial write: {err}"))?;
            }
            let gg = g.clone();
            let writer = std::thread::spawn(move || -> Result<Instant, String> {
                // 256 KiB: four seconds at 64 KiB/s.
                let f = dev::open_direct(&gg, true)?;
                let buf = AlignedBuf::new(256 << 10, 0x6d);
                f.write_all_at(buf.as_slice(), 8 * MIB)
                    .map_err(|err| format!("the write in flight: {err}"))?;
                Ok(Instant::now())
            });
            std::thread::sleep(Duration::from_millis(700));
            let start = Instant::now();
            ctl_dev.cbt_save().map_err(e)?;
            let saved = Instant::now();
            let written = writer
                .join()
                .map_err(|_| "the writer panicked".to_string())??;
            println!(
                "    the save took {} ms; the write in flight completed {} ms after the save began",
                (saved - start).as_millis(),
                written.saturating_duration_since(start).as_millis()
            );
            if written < start + Duration::from_millis(500) {
                fail!("the write was not in flight when the save began (the throttle let it pass)");
            }
            if saved + Duration::from_millis(50) < written {
                fail!(
                    "the save returned {} ms before the write in flight completed: it did not drain it",
                    (written - saved).as_millis()
                );
            }
            check_eq!(record_usable(state, 0)?, true, "the record after the save");
            Ok(())
        })();
        let _ = t.detach();
        r
    })
}

/// Item 6 of issue 21: with a mirror, a state device whose writes fail
/// cannot hide a broken seal: the write after the save goes on (at once),
/// and its record is marked broken on the mirror, so the copies disagree.
fn mirror() -> TestResult {
    crate::removal::unload_and_reload()?;
    let c = disk("blksnap-c")?;
    let lo_a = dev::LoopDev::new("cbt-state-a", 16 * MIB)?;
    let lo_b = dev::LoopDev::new("cbt-state-b", 16 * MIB)?;
    let r = (|| -> TestResult {
        let dm = DmState::new("cbtstate-test", &lo_a.path, 16 * MIB / SECTOR)?;
        let ctl_dev = Control::open().map_err(e)?;
        let t = Tracker::open(&c).map_err(e)?;
        t.attach().map_err(e)?;
        let r = (|| -> TestResult {
            ctl_dev.cbt_state_device(&dm.path, true).map_err(e)?;
            check_eq!(
                ctl_dev
                    .cbt_state_device_as(&lo_a.path, false, true)
                    .map(|_| ())
                    .map_err(|e| e.errno),
                Err(Errno::EBUSY),
                "the state device's own loop device as its mirror"
            );
            ctl_dev
                .cbt_state_device_as(&lo_b.path, true, true)
                .map_err(e)?;
            t.persist_as("blksnap-c", "c", true).map_err(e)?;
            ctl_dev.cbt_save().map_err(e)?;
            check_eq!(
                (record_usable(&dm.path, 0)?, record_usable(&lo_b.path, 0)?),
                (true, true),
                "the record on (state, mirror) after the save"
            );
            dm.fail_io(16 * MIB / SECTOR)?;
            let start = Instant::now();
            dev::write_direct(&c, 0, 8, 0x44)?;
            println!(
                "    the first write after the save, the state device failing, took {} ms",
                start.elapsed().as_millis()
            );
            check_eq!(
                record_usable(&lo_b.path, 0)?,
                false,
                "the record on the mirror after the write"
            );
            check_eq!(
                record_usable(&lo_a.path, 0)?,
                true,
                "the record on the failed state device (below dm) after the write"
            );
            Ok(())
        })();
        let _ = t.detach();
        r
    })();
    let reload = crate::removal::unload_and_reload();
    drop((lo_a, lo_b));
    r.and(reload)
}
