// SPDX-License-Identifier: GPL-2.0

//! The tracker: the `blksnap` block device filter, one per attached device.
//!
//! It sees every bio submitted to its device and records the blocks that
//! writes, discards and write-zeroes touch in the device's CBT map. User space
//! reads and edits the map with `BLKFILTER_CTL` commands.

use crate::{
    cbt_map::{CbtMap, Map},
    params,
    uapi::{self, ctl},
};
use core::mem::size_of;
use kernel::{
    alloc::{flags::GFP_KERNEL, KVec},
    block::{
        bdev::{BlockDevice, DevT},
        bio::InFlightBio,
        filter::Filter,
    },
    c_str,
    error::code::*,
    prelude::*,
    str::CStr,
    sync::Arc,
    types::{AsBytes, FromBytes},
    uaccess::UserSlice,
};

// SAFETY: These structures consist of integers; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapCbtmap {}
// SAFETY: As above; the padding after `count` is never interpreted.
unsafe impl FromBytes for uapi::BlksnapCbtdirty {}
// SAFETY: As above.
unsafe impl FromBytes for uapi::BlksnapSectors {}
// SAFETY: As above.
unsafe impl FromBytes for uapi::BlksnapSnapshotadd {}
// SAFETY: An i32 followed by bytes: no padding, any bit pattern is valid.
unsafe impl AsBytes for uapi::BlksnapSnapshotinfo {}

/// A tracked block device.
#[pin_data]
pub(crate) struct Tracker {
    dev: DevT,
    #[pin]
    cbt: CbtMap,
}

impl Tracker {
    fn new(bdev: &BlockDevice) -> Result<Arc<Self>> {
        let cbt = CbtMap::new(bdev.nr_sectors(), &params::cbt_params())?;
        let tracker = Arc::pin_init(
            try_pin_init!(Self {
                dev: bdev.dev(),
                cbt <- cbt,
            }),
            GFP_KERNEL,
        )?;
        let g = tracker.cbt.geometry();
        pr_info!(
            "tracking {} [{}]: {} sectors, {} blocks of {} bytes\n",
            bdev,
            tracker.dev,
            g.capacity_sectors,
            g.block_count,
            g.block_size()
        );
        Ok(tracker)
    }

    /// Returns the device number of the tracked device.
    pub(crate) fn dev(&self) -> DevT {
        self.dev
    }

    fn cbtinfo(&self, opt: UserSlice, optlen: &mut u32) -> Result<i32> {
        let size = size_of::<uapi::BlksnapCbtinfo>();
        check_len(*optlen, size, "CBTINFO")?;
        let info = self.cbt.info();
        let out = uapi::BlksnapCbtinfo {
            device_capacity: info.geometry.capacity_bytes(),
            block_size: info.geometry.block_size(),
            block_count: info.geometry.block_count,
            generation_id: uapi::BlksnapUuid {
                b: info.state.generation,
            },
            changes_number: info.state.previous,
        };
        opt.writer().write_slice(&out.to_ne_bytes())?;
        *optlen = size as u32;
        Ok(0)
    }

    fn cbtmap(&self, which: Map, opt: UserSlice, optlen: u32) -> Result<i32> {
        check_len(optlen, size_of::<uapi::BlksnapCbtmap>(), "CBTMAP")?;
        let arg: uapi::BlksnapCbtmap = opt.reader().read()?;
        let blocks = self
            .cbt
            .geometry()
            .check_map_read(arg.offset, arg.length)
            .map_err(|_| {
                pr_err!(
                    "{}: CBTMAP of {} bytes at {} is outside the map of {} blocks\n",
                    self.dev,
                    arg.length,
                    arg.offset,
                    self.cbt.geometry().block_count
                );
                ENODATA
            })?;
        let mut out = UserSlice::new(arg.buffer as usize, arg.length as usize).writer();
        self.cbt.read_to_user(which, blocks, &mut out)?;
        Ok(arg.length as i32)
    }

    fn cbtdirty(&self, opt: UserSlice, optlen: u32) -> Result<i32> {
        check_len(optlen, size_of::<uapi::BlksnapCbtdirty>(), "CBTDIRTY")?;
        let arg: uapi::BlksnapCbtdirty = opt.reader().read()?;
        if arg.count == 0 || arg.count > uapi::CBTDIRTY_MAX_COUNT {
            pr_err!(
                "{}: CBTDIRTY count {} is not in 1..={}\n",
                self.dev,
                arg.count,
                uapi::CBTDIRTY_MAX_COUNT
            );
            return Err(if arg.count == 0 { EINVAL } else { E2BIG });
        }
        let len = arg.count as usize * size_of::<uapi::BlksnapSectors>();
        let mut reader = UserSlice::new(arg.dirty_sectors as usize, len).reader();
        let mut ranges = KVec::with_capacity(arg.count as usize, GFP_KERNEL)?;
        for _ in 0..arg.count {
            let r: uapi::BlksnapSectors = reader.read()?;
            let blocks = self.cbt.check_range(r.offset, r.count).map_err(|_| {
                pr_err!(
                    "{}: CBTDIRTY range of {} sectors at {} is empty or outside the device\n",
                    self.dev,
                    r.count,
                    r.offset
                );
                EINVAL
            })?;
            ranges.push(blocks, GFP_KERNEL)?;
        }
        self.cbt.mark_dirty(&ranges);
        Ok(0)
    }

    fn snapshotadd(&self, opt: UserSlice, optlen: u32) -> Result<i32> {
        check_len(optlen, size_of::<uapi::BlksnapSnapshotadd>(), "SNAPSHOTADD")?;
        let arg: uapi::BlksnapSnapshotadd = opt.reader().read()?;
        // No snapshot can exist yet: snapshot creation is not implemented.
        pr_err!(
            "{}: SNAPSHOTADD: no snapshot {}\n",
            self.dev,
            kernel::uuid::Uuid(arg.id.b)
        );
        Err(ESRCH)
    }

    fn snapshotinfo(&self, opt: UserSlice, optlen: &mut u32) -> Result<i32> {
        let size = size_of::<uapi::BlksnapSnapshotinfo>();
        check_len(*optlen, size, "SNAPSHOTINFO")?;
        // The device belongs to no snapshot: no error and no image.
        let info = uapi::BlksnapSnapshotinfo {
            error_code: 0,
            image: [0; uapi::IMAGE_DISK_NAME_LEN],
        };
        opt.writer().write(&info)?;
        *optlen = size as u32;
        Ok(0)
    }
}

fn check_len(optlen: u32, needed: usize, what: &str) -> Result {
    if (optlen as usize) < needed {
        pr_err!("{}: option buffer of {} bytes, {} needed\n", what, optlen, needed);
        return Err(EINVAL);
    }
    Ok(())
}

/// The `blksnap` block device filter.
pub(crate) struct TrackerFilter;

#[vtable]
impl Filter for TrackerFilter {
    const NAME: &'static CStr = c_str!("blksnap");
    type Data = Arc<Tracker>;

    fn attach(bdev: &BlockDevice, _opt: UserSlice) -> Result<Arc<Tracker>> {
        Tracker::new(bdev)
    }

    fn detach(tracker: &Arc<Tracker>, bdev: &BlockDevice) {
        pr_info!("stopped tracking {} [{}]\n", bdev, tracker.dev());
    }

    fn ctl(
        tracker: &Arc<Tracker>,
        _bdev: &BlockDevice,
        cmd: u32,
        opt: UserSlice,
        optlen: &mut u32,
    ) -> Result<i32> {
        match cmd {
            ctl::CBTINFO => tracker.cbtinfo(opt, optlen),
            ctl::CBTMAP => tracker.cbtmap(Map::Read, opt, *optlen),
            ctl::CBTMAP_ACTIVE => tracker.cbtmap(Map::Active, opt, *optlen),
            ctl::CBTDIRTY => tracker.cbtdirty(opt, *optlen),
            ctl::SNAPSHOTADD => tracker.snapshotadd(opt, *optlen),
            ctl::SNAPSHOTINFO => tracker.snapshotinfo(opt, optlen),
            _ => {
                pr_err!("{}: unknown filter command {}\n", tracker.dev(), cmd);
                Err(ENOTTY)
            }
        }
    }

    fn submit_bio(tracker: &Arc<Tracker>, sector: u64, bio: InFlightBio) -> Option<InFlightBio> {
        if bio.is_write() {
            tracker.cbt.mark_write(sector, u64::from(bio.sectors()));
        }
        Some(bio)
    }
}
