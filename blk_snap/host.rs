// SPDX-License-Identifier: GPL-2.0

//! Host build of the kernel module's pure logic.
//!
//! The kernel module (`blksnap.rs`) includes the same files; here they are
//! compiled as a normal library so that `cargo test` covers them.

#![no_std]

#[path = "logic/cbt.rs"]
pub mod cbt;

#[path = "uapi.rs"]
pub mod uapi;

#[path = "logic/chunk.rs"]
pub mod chunk;

#[path = "logic/store.rs"]
pub mod store;

#[path = "logic/fine.rs"]
pub mod fine;

#[path = "logic/persist.rs"]
pub mod persist;

#[path = "logic/fingerprint.rs"]
pub mod fingerprint;
