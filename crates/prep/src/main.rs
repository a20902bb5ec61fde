//! The `prep` binary; all logic lives in the `cpmv_prep` library.
fn main() -> std::process::ExitCode {
    cpmv_prep::cli::main()
}
