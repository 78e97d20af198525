//! Helpers of the black-box tests: run the built `volshadow` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_volshadow")
}

/// Runs `volshadow ARGS` in `dir`; panics with its stderr if it fails.
pub fn vs(dir: &Path, args: &[&str]) -> String {
    let out = vs_raw(dir, args);
    assert!(
        out.status.success(),
        "volshadow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn vs_raw(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&vs(dir, args)).unwrap()
}

/// Ids of the shadow copies of `img`, oldest first.
pub fn shadow_ids(dir: &Path, img: &str) -> Vec<String> {
    json(dir, &["list", "shadows", "--for", img, "--json"])["shadows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A volume with 64 MiB of shadow storage in a fresh directory.
pub fn volume(size: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    vs(dir.path(), &["image", "create", "disk.img", "--size", size]);
    vs(
        dir.path(),
        &[
            "add",
            "shadowstorage",
            "--for",
            "disk.img",
            "--on",
            "disk.diff",
            "--maxsize",
            "64M",
        ],
    );
    dir
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// `volshadow serve` on a Unix socket, killed on drop.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, img: &str) -> Server {
        Self::start_with(dir, img, Stdio::null())
    }

    /// Like `start`, with the server's stderr (its log) going to `log`.
    pub fn start_logged(dir: &Path, img: &str, log: &Path) -> Server {
        Self::start_with(dir, img, std::fs::File::create(log).unwrap().into())
    }

    fn start_with(dir: &Path, img: &str, stderr: Stdio) -> Server {
        let socket = dir.join("nbd.sock");
        let child = Command::new(bin())
            .args(["serve", "--for", img, "--socket"])
            .arg(&socket)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(socket.exists() && dir.join(format!("{img}.vshadow.sock")).exists()) {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
