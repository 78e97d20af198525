//! The `volshadow` command; all of it lives in `volshadow-cli`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    volshadow_cli::main()
}
