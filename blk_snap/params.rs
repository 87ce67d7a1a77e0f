// SPDX-License-Identifier: GPL-2.0

//! Module parameters, with the upstream blksnap names and defaults.

use crate::cbt::CbtParams;

kernel::module_param_u32!(
    "blksnap",
    tracking_block_minimum_shift,
    16,
    0o644,
    "The power of 2 for minimum tracking block size"
);
kernel::module_param_u32!(
    "blksnap",
    tracking_block_maximum_count,
    2097152,
    0o644,
    "The maximum number of tracking blocks"
);
kernel::module_param_u32!(
    "blksnap",
    tracking_block_maximum_shift,
    26,
    0o644,
    "The power of 2 for maximum tracking block size"
);

/// The CBT parameters as currently set.
pub(crate) fn cbt_params() -> CbtParams {
    CbtParams {
        block_minimum_shift: tracking_block_minimum_shift.get(),
        block_maximum_count: tracking_block_maximum_count.get(),
        block_maximum_shift: tracking_block_maximum_shift.get(),
    }
}

kernel::module_param_u32!(
    "blksnap",
    chunk_minimum_shift,
    18,
    0o644,
    "The power of 2 for minimum chunk size"
);
kernel::module_param_u32!(
    "blksnap",
    chunk_maximum_count_shift,
    40,
    0o644,
    "The power of 2 for maximum number of chunks"
);
kernel::module_param_u32!(
    "blksnap",
    chunk_maximum_shift,
    26,
    0o644,
    "The power of 2 for maximum chunk size"
);
kernel::module_param_u32!(
    "blksnap",
    chunk_maximum_in_queue,
    256,
    0o644,
    "The maximum number of chunks in the copy queue before writers wait"
);
kernel::module_param_u32!(
    "blksnap",
    cow_stall_timeout,
    10,
    0o644,
    "Seconds without a finished chunk copy while writes wait for copies, after which a snapshot gives way to its origin (0: never)"
);
kernel::module_param_u32!(
    "blksnap",
    diff_storage_minimum,
    2097152,
    0o644,
    "The step, in sectors, by which a difference storage file grows"
);

/// The chunk parameters as currently set.
pub(crate) fn chunk_params() -> crate::chunk::ChunkParams {
    crate::chunk::ChunkParams {
        minimum_shift: chunk_minimum_shift.get(),
        maximum_count_shift: chunk_maximum_count_shift.get(),
        maximum_shift: chunk_maximum_shift.get(),
    }
}
kernel::module_param_u32!(
    "blksnap",
    fine_map_limit_kib,
    8192,
    0o644,
    "Our extension: KiB the 4 KiB change map of one device may take; past it, a region is tracked by the coarse map only"
);

/// Bytes the fine change map of one device may take.
pub(crate) fn fine_map_limit() -> usize {
    (fine_map_limit_kib.get() as usize).saturating_mul(1024)
}
