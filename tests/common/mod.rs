//! Helpers of the black-box tests: run the built `volshadow` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Bytes that differ from one offset to the next and with `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 12) as u8)
        .collect()
}

/// Bytes from the tests' one generator (splitmix64), different for each
/// seed: data whose chunks never repeat by accident.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    volshadow_block::conformance::Rng::new(seed).fill(&mut out);
    out
}

/// Writes `data` at `offset` into `img` (through `volshadow write`) and
/// into the model.
pub fn put(dir: &Path, img: &str, model: &mut [u8], offset: usize, data: &[u8]) {
    let f = write_file(dir, "piece.bin", data);
    vs(
        dir,
        &[
            "write",
            "--for",
            img,
            "--offset",
            &offset.to_string(),
            "--input",
            f.to_str().unwrap(),
        ],
    );
    model[offset..offset + data.len()].copy_from_slice(data);
}

/// Runs `volshadow ARGS`, which must fail with exit `code` and one line on
/// stderr (never a panic); returns that line.
pub fn refused(dir: &Path, args: &[&str], code: i32) -> String {
    let out = vs_raw(dir, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    err
}

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
    vs_env(dir, &[], args)
}

/// [`vs_raw`] with `env` added to the environment.
pub fn vs_env(dir: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    spawn(
        Command::new(bin())
            .args(args)
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap()
    .wait_with_output()
    .unwrap()
}

/// `cmd.spawn()`, tried again when Wine reports ERROR_INTERNAL_ERROR
/// (1359): Wine's CreateProcess returns it when the new process dies in
/// Wine's own start-up, before the program's first instruction, now and
/// then on a loaded machine. Nothing of the program ran, so a second try
/// is the same test. Any other error, or 1359 on the fourth try, returns.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let mut tries = 1;
    loop {
        match cmd.spawn() {
            Err(e) if cfg!(windows) && e.raw_os_error() == Some(1359) && tries < 4 => {
                eprintln!("{:?}: {e}; spawning again", cmd.get_program());
                tries += 1;
                std::thread::sleep(Duration::from_millis(200 * tries));
            }
            spawned => return spawned,
        }
    }
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
    add_storage(dir.path(), "disk.img", "disk.diff", "64M", &[]);
    dir
}

/// `add shadowstorage --for IMG --on DIFF --maxsize MAX` and `extra`.
/// Returns what it printed.
pub fn add_storage(dir: &Path, img: &str, diff: &str, max: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "add",
        "shadowstorage",
        "--for",
        img,
        "--on",
        diff,
        "--maxsize",
        max,
    ];
    args.extend_from_slice(extra);
    vs(dir, &args)
}

/// `create shadow --for IMG` (persistent, the default); returns its id.
pub fn create_shadow(dir: &Path, img: &str) -> String {
    let v = json(dir, &["create", "shadow", "--for", img, "--json"]);
    v["shadow"]["id"].as_str().unwrap().to_string()
}

/// Skips (with a printed reason) unless all tools are present. CI installs
/// them, so a skip there would show in the log.
pub fn tools(names: &[&str]) -> bool {
    for t in names {
        if !have(t) {
            eprintln!("SKIP: {t} is not installed");
            return false;
        }
    }
    true
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

/// A raw connection to a running server's control channel: a Unix
/// socket, or on Windows the named pipe.
#[cfg(unix)]
pub type Control = std::os::unix::net::UnixStream;
#[cfg(windows)]
pub type Control = volshadow_block::PipeStream;

/// Connects to the control channel of the server holding `img` in `dir`.
#[cfg(unix)]
pub fn control(dir: &Path, img: &str) -> std::io::Result<Control> {
    Control::connect(dir.join(format!("{img}.vshadow.sock")))
}

#[cfg(windows)]
pub fn control(dir: &Path, img: &str) -> std::io::Result<Control> {
    Control::connect(&pipe_name(dir, img), Duration::from_secs(10))
}

/// The control pipe's name as docs/ARCHITECTURE.md gives it: the volume
/// id from `IMG.vshadow`, and a tag from the image's full path.
#[cfg(windows)]
fn pipe_name(dir: &Path, img: &str) -> String {
    let binding: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{img}.vshadow"))).unwrap())
            .unwrap();
    let id: uuid::Uuid = binding["volume_id"].as_str().unwrap().parse().unwrap();
    let full = std::fs::canonicalize(dir.join(img)).unwrap();
    let key = full.to_string_lossy().to_lowercase();
    let tag = uuid::Uuid::new_v5(&id, key.as_bytes()).simple().to_string();
    format!(r"\\.\pipe\volshadow-{id}-{}", &tag[..12])
}

/// `volshadow serve` on a Unix socket, killed on drop.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, img: &str) -> Server {
        Self::start_with(dir, img, "nbd.sock", Stdio::null())
    }

    /// Like `start`, with an NBD socket of its own (`IMG.nbd.sock`), so
    /// several servers can run in one directory.
    pub fn start_own(dir: &Path, img: &str) -> Server {
        Self::start_with(dir, img, &format!("{img}.nbd.sock"), Stdio::null())
    }

    /// Like `start`, with the server's stderr (its log) going to `log`.
    pub fn start_logged(dir: &Path, img: &str, log: &Path) -> Server {
        Self::start_with(
            dir,
            img,
            "nbd.sock",
            std::fs::File::create(log).unwrap().into(),
        )
    }

    fn start_with(dir: &Path, img: &str, socket: &str, stderr: Stdio) -> Server {
        let socket = dir.join(socket);
        let child = spawn(
            Command::new(bin())
                .args(["serve", "--for", img, "--socket"])
                .arg(&socket)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(socket.exists() && dir.join(format!("{img}.vshadow.sock")).exists()) {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, socket }
    }

    /// Starts `serve` with its stderr in `log`, for a volume that may have
    /// been served before: stale socket files (a killed server leaves them)
    /// are removed, and it counts as started only once both sockets accept
    /// connections. `Err` with what it printed if it exits or does not
    /// listen within `timeout`.
    #[cfg(unix)]
    pub fn try_start(
        dir: &Path,
        img: &str,
        log: &Path,
        timeout: Duration,
    ) -> Result<Server, String> {
        use std::os::unix::net::UnixStream;
        let socket = dir.join("nbd.sock");
        let control = dir.join(format!("{img}.vshadow.sock"));
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&control);
        let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(bin())
            .args(["serve", "--for", img, "--socket"])
            .arg(&socket)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin()))?;
        let printed = || {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("serve exited ({status}): {}", printed()));
            }
            if UnixStream::connect(&socket).is_ok() && UnixStream::connect(&control).is_ok() {
                return Ok(Server { child, socket });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "serve did not listen within {timeout:?}: {}",
                    printed()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `serve` for its control channel: on Unix as `start`; on Windows
    /// NBD on a TCP port the system picks. Started once the control
    /// channel answers.
    pub fn start_control(dir: &Path, img: &str) -> Server {
        Self::control_with(dir, img, None)
    }

    /// Like `start_control`, with the server's stderr (its log) in `log`.
    pub fn start_control_logged(dir: &Path, img: &str, log: &Path) -> Server {
        Self::control_with(dir, img, Some(log))
    }

    fn control_with(dir: &Path, img: &str, log: Option<&Path>) -> Server {
        #[cfg(unix)]
        return match log {
            Some(log) => Server::start_logged(dir, img, log),
            None => Server::start(dir, img),
        };
        #[cfg(windows)]
        {
            let stderr = log.map_or_else(Stdio::null, |l| std::fs::File::create(l).unwrap().into());
            let mut child = spawn(
                Command::new(bin())
                    .args(["serve", "--for", img, "--listen", "127.0.0.1:0"])
                    .current_dir(dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(stderr),
            )
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while control(dir, img).is_err() {
                assert!(child.try_wait().unwrap().is_none(), "serve exited");
                assert!(Instant::now() < deadline, "serve did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            Server {
                child,
                socket: PathBuf::new(),
            }
        }
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

/// NBD commands and flags the raw client sends.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_FLAG_FUA: u16 = 1;

/// A minimal NBD client over a Unix socket, speaking the protocol byte by
/// byte: for hostile input (`tests/nbd.rs`) and for the soak test's
/// writers and readers (`tests/soak/`). One request at a time, simple
/// replies.
#[cfg(unix)]
#[derive(Debug)]
pub struct Raw(pub std::os::unix::net::UnixStream);

#[cfg(unix)]
impl Raw {
    /// Connects and reads the greeting; reads and writes time out after
    /// `timeout`.
    pub fn try_connect(path: &Path, timeout: Duration) -> std::io::Result<Raw> {
        use std::io::Read;
        let s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut r = Raw(s);
        let mut greeting = [0u8; 18];
        r.0.read_exact(&mut greeting)?;
        if &greeting[..8] != b"NBDMAGIC" {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no NBDMAGIC greeting",
            ));
        }
        Ok(r)
    }

    pub fn connect(path: &Path) -> Raw {
        Raw::try_connect(path, Duration::from_secs(5)).unwrap()
    }

    pub fn try_opt(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b)
    }

    pub fn opt(&mut self, opt: u32, data: &[u8]) {
        self.try_opt(opt, data).unwrap();
    }

    pub fn try_opt_reply(&mut self) -> std::io::Result<(u32, Vec<u8>)> {
        use std::io::Read;
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h)?;
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d)?;
        Ok((kind, d))
    }

    pub fn opt_reply(&mut self) -> (u32, Vec<u8>) {
        self.try_opt_reply().unwrap()
    }

    /// Handshake to the transmission phase on `export` (simple replies).
    pub fn try_go(path: &Path, export: &str, timeout: Duration) -> std::io::Result<Raw> {
        use std::io::Write;
        let mut r = Raw::try_connect(path, timeout)?;
        r.0.write_all(&3u32.to_be_bytes())?;
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        r.try_opt(7, &d)?;
        loop {
            match r.try_opt_reply()?.0 {
                1 => return Ok(r),
                3 => {}
                kind => {
                    return Err(std::io::Error::other(format!(
                        "GO {export:?} failed with reply type {kind:#x}"
                    )));
                }
            }
        }
    }

    pub fn go(path: &Path, export: &str) -> Raw {
        Raw::try_go(path, export, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends one request and waits for its reply: the NBD error (0 = ok),
    /// the data of a successful READ in `data`.
    pub fn cmd(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        data: &mut Vec<u8>,
    ) -> std::io::Result<u32> {
        use std::io::{Read, Write};
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&42u64.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&b)?;
        if !payload.is_empty() {
            self.0.write_all(payload)?;
        }
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h)?;
        if u32::from_be_bytes(h[..4].try_into().unwrap()) != 0x6744_6698
            || u64::from_be_bytes(h[8..16].try_into().unwrap()) != 42
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad simple reply header {h:02x?}"),
            ));
        }
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        data.clear();
        if kind == NBD_CMD_READ && err == 0 {
            data.resize(len as usize, 0);
            self.0.read_exact(data)?;
        }
        Ok(err)
    }

    /// `cmd` without flags; panics if the connection fails.
    pub fn request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        self.cmd(kind, 0, offset, len, payload, &mut Vec::new())
            .unwrap()
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

/// A loop device over a file, detached when dropped.
#[cfg(target_os = "linux")]
pub struct Loop(String);

#[cfg(target_os = "linux")]
impl Loop {
    pub fn attach(file: &Path, read_only: bool) -> Loop {
        let mut args = vec!["--find", "--show", "--direct-io=off"];
        if read_only {
            args.push("--read-only");
        }
        args.push(file.to_str().unwrap());
        let out = run("losetup", &args);
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }

    pub fn dev(&self) -> &str {
        &self.0
    }
}

#[cfg(target_os = "linux")]
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}
