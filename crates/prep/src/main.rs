//! The `prep` binary; all logic lives in the `cpmv_prep` library.

#[global_allocator]
static GLOBAL: cpmv_prep::alloc::MiMalloc = cpmv_prep::alloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cpmv_prep::alloc::keep_freed_memory();
    cpmv_prep::cli::main()
}
