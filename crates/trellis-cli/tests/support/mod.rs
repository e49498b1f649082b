//! Shared by the CLI's integration tests: the `trellis` binary as a child process.

#![allow(dead_code)]

use std::process::Command;

pub use trellis_testkit::Program as Trellis;

/// `trellis ARGS` with `RUST_LOG=info`.
pub fn spawn(args: &[&str]) -> Trellis {
    spawn_with_log(args, Some("info"))
}

/// Like `spawn`; `rust_log: None` leaves RUST_LOG unset so that the
/// config's `log.level` governs. `serve` without `--admin-listen` gets a
/// free admin port (its default, the main port + 1000, may be taken).
pub fn spawn_with_log(args: &[&str], rust_log: Option<&str>) -> Trellis {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trellis"));
    command.args(args);
    if args.first() == Some(&"serve") && !args.contains(&"--admin-listen") {
        command.args(["--admin-listen", "127.0.0.1:0"]);
    }
    command.env_remove("RUST_LOG");
    if let Some(level) = rust_log {
        command.env("RUST_LOG", level);
    }
    Trellis::spawn(command).expect("the trellis binary starts")
}
