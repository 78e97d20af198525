//! The `volshadow` command line: verbs shaped like `vssadmin` and
//! `diskshadow`, over the copy-on-write engine and the NBD server.
#![forbid(unsafe_code)]

mod args;
mod bench;
mod channel;
mod control;
mod control_server;
mod dispatch;
mod exports;
#[cfg(target_os = "linux")]
mod fuse;
mod guard;
mod identity;
mod member;
mod ops;
mod output;
mod quickstart;
mod report;
mod session;
mod storage;
mod verbs;
mod vss;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};
pub use ops::{Reply, Request, SetOutcome, ShadowRow, Which};
pub use session::on_volume;
pub use storage::{parse_positive_size, parse_size};

/// An error and its causes on one line, each clause once. Errors shaped
/// `"{context}: {source}"` (thiserror's, the block layer wrapping the
/// engine) repeat their source's text, and the chain then prints it again;
/// so each message is cut to its own part (without the source's text at
/// its end), and a part is left out when the text so far already says it
/// or the next part starts with it (`"snapshot X: snapshot X: chunk ..."`).
pub fn one_line(e: &anyhow::Error) -> String {
    let texts: Vec<String> = e
        .chain()
        .map(|c| c.to_string().replace('\n', " ").trim().to_string())
        .collect();
    let own: Vec<&str> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| match texts.get(i + 1) {
            Some(next)
                if !next.is_empty() && t.len() > next.len() && t.ends_with(next.as_str()) =>
            {
                t[..t.len() - next.len()]
                    .trim_end()
                    .trim_end_matches(':')
                    .trim_end()
            }
            _ => t.as_str(),
        })
        .collect();
    let mut out = String::new();
    for (i, part) in own.iter().enumerate() {
        if part.is_empty() || out.contains(part) {
            continue;
        }
        if own[i + 1..]
            .iter()
            .find(|n| !n.is_empty())
            .is_some_and(|next| next.starts_with(part))
        {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(part);
    }
    out
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version: printed as clap formats them.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            #[cfg(not(target_os = "linux"))]
            if let Some(why) = std::env::args().nth(1).and_then(|v| args::linux_only(&v)) {
                eprintln!("volshadow: {why}");
                return ExitCode::from(2);
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("volshadow: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    // A server has no one to tell but its log: warnings (such as shadow
    // copies deleted to make room) are shown without -v.
    let quiet_level = runs_as_server(&cli.command).then_some("warn");
    init_logging(cli.verbose, quiet_level);
    match dispatch::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volshadow: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Verbs that keep running and serve others, with only their log to tell.
fn runs_as_server(cmd: &Command) -> bool {
    match cmd {
        Command::Serve { .. } => true,
        #[cfg(target_os = "linux")]
        Command::Mount { .. } => true,
        _ => false,
    }
}

fn init_logging(verbose: u8, quiet_level: Option<&str>) {
    let level = match (verbose, quiet_level) {
        (0, None) => return,
        (0, Some(level)) => level,
        (1, _) => "info",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let block = volshadow_block::Error::Path {
            path: "x.img".into(),
            op: volshadow_block::Op::Open,
            source: io,
        };
        let e = anyhow::Error::from(block).context("opening x.img");
        let line = one_line(&e);
        assert_eq!(line.matches(&text).count(), 1, "{line}");
        assert!(
            line.starts_with("opening x.img: cannot open x.img"),
            "{line}"
        );
    }

    #[test]
    fn a_prefix_the_source_repeats_is_printed_once() {
        #[derive(Debug)]
        struct Damaged;
        impl std::fmt::Display for Damaged {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("snapshot 3f2a: chunk 3 at offset 49152 is damaged")
            }
        }
        impl std::error::Error for Damaged {}
        let layer = volshadow_block::Error::Layer {
            device: "snapshot 3f2a".into(),
            kind: std::io::ErrorKind::InvalidData,
            source: Box::new(Damaged),
        };
        let e = anyhow::Error::from(layer).context("reading into out.raw");
        assert_eq!(
            one_line(&e),
            "reading into out.raw: snapshot 3f2a: chunk 3 at offset 49152 is damaged"
        );
    }
}
