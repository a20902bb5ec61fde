//! The memory allocator `prep` runs with, shared with the benchmarks that measure against it
//! (`benches/decode_floor.rs`), so that both allocate the same way.
//!
//! Tokenizing and slicing allocate many short-lived buffers from several threads; mimalloc
//! serves them markedly faster than glibc's allocator (measured in benches/prep_stats.sh). A
//! binary installs it with `#[global_allocator] static A: MiMalloc = MiMalloc;` and calls
//! [`keep_freed_memory`] first thing.

use std::os::raw::{c_int, c_long};

pub use mimalloc::MiMalloc;

extern "C" {
    // mimalloc's own option setter (linked from libmimalloc-sys's static library).
    fn mi_option_set(option: c_int, value: c_long);
}

/// `mi_option_purge_delay` in mimalloc v3's `enum mi_option_e` (c_src/mimalloc/v3/include/
/// mimalloc.h of libmimalloc-sys 0.1.49, the version Cargo.lock pins; recheck on upgrade).
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// Keeps memory freed by the process instead of handing it back to the OS.
///
/// Every sample allocates and frees tens of MB (decoded images, resampled slices). By default
/// mimalloc hands freed memory back to the OS after 10 ms, and the kernel then zeroes every
/// page again when it is reused: on the benchmark set that was ~160k page faults and a fifth of
/// the build's time in the kernel's page clearing. Keeping freed memory costs nothing here: the
/// samples in flight bound it. Only has an effect where [`MiMalloc`] is the global allocator.
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; valid at any time, before or after
    // allocations.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
