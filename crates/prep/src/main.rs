//! The `prep` binary; all logic lives in the `cpmv_prep` library.

// Tokenizing and slicing allocate many short-lived buffers from several threads; mimalloc
// serves them markedly faster than glibc's allocator (measured in benches/prep_stats.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cpmv_prep::cli::main()
}
