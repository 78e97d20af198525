//! `volshadow serve` over the network as a new user would run it: TLS with
//! certificates made here (a test CA), real clients (nbdinfo, nbdcopy,
//! qemu-img), plaintext and foreign-certificate clients refused, the
//! non-loopback guard, `--read-only` and `--export`.
#![allow(clippy::unwrap_used)]
// Unix only: Linux TLS clients (nbdinfo, qemu) and Unix-socket exports.
#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use volshadow_nbd::test_certs::TestCa;

/// `volshadow serve --for disk.img ARGS`, killed on drop; `addr` is what
/// it says it listens on (`127.0.0.1:PORT` or the socket's URI).
struct Serve {
    child: Child,
    addr: String,
}

impl Serve {
    fn start(dir: &Path, args: &[&str]) -> Result<Serve, String> {
        let mut child = Command::new(bin())
            .args(["serve", "--for", "disk.img"])
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads the banner, then keeps draining the log.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut said = String::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
            if let Some(rest) = line
                .split("://")
                .nth(1)
                .filter(|_| line.starts_with("Serving"))
            {
                let addr = rest.split('/').next().unwrap().to_string();
                return Ok(Serve { child, addr });
            }
            said.push_str(&line);
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(said)
    }

    fn uri(&self, export: &str, certs: &Path) -> String {
        format!(
            "nbds://{}/{export}?tls-certificates={}",
            self.addr,
            certs.display()
        )
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fails(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{cmd} {args:?} should have failed");
    out
}

/// A 16 MiB volume holding a pattern, one shadow copy of it, then the
/// first MiB of live overwritten. Returns the directory, the shadow copy's
/// id and its expected bytes.
fn volume_with_copy() -> (tempfile::TempDir, String, Vec<u8>) {
    let dir = volume("16M");
    let d = dir.path();
    let data = pattern(16 << 20, 7);
    write_file(d, "data.bin", &data);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "data.bin",
        ],
    );
    let snap = json(d, &["create", "shadow", "--for", "disk.img", "--json"])["shadow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    write_file(d, "ones.bin", &vec![1u8; 1 << 20]);
    vs(
        d,
        &[
            "write", "--for", "disk.img", "--offset", "0", "--input", "ones.bin",
        ],
    );
    (dir, snap, data)
}

/// Credentials: `server/` (test CA), `client/` (a client of the test CA),
/// `stranger/` (trusts the test CA, but its certificate is another CA's).
fn credentials(d: &Path) {
    let ca = TestCa::new("volshadow test CA").unwrap();
    let other = TestCa::new("another CA").unwrap();
    ca.write_server_dir(&d.join("server")).unwrap();
    ca.write_client_dir(&d.join("client"), &ca).unwrap();
    other.write_client_dir(&d.join("stranger"), &ca).unwrap();
}

#[test]
fn tls_with_nbdinfo_nbdcopy_and_qemu_img() {
    if !tools(&["nbdinfo", "nbdcopy", "qemu-img"]) {
        return;
    }
    let (dir, snap, expected) = volume_with_copy();
    let d = dir.path();
    credentials(d);
    let server = Serve::start(d, &["--listen", "127.0.0.1:0", "--tls-creds", "server"]).unwrap();
    let client = d.join("client");

    let list = run("nbdinfo", &["--list", &server.uri("", &client)]);
    let list = String::from_utf8(list.stdout).unwrap();
    assert!(
        list.contains("export=\"live\"") && list.contains(&snap),
        "{list}"
    );

    // The shadow copy through nbdcopy, byte for byte.
    let out = d.join("copy.raw");
    run(
        "nbdcopy",
        &[&server.uri(&snap, &client), out.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "nbdcopy over TLS: wrong bytes"
    );

    // And through qemu-img with qemu's own TLS client.
    let out = d.join("qemu.raw");
    let port = server.addr.rsplit(':').next().unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                client.display()
            ),
            "--image-opts",
            &format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},\
                 export={snap},tls-creds=tls0"
            ),
            "-O",
            "raw",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "qemu-img over TLS: wrong bytes"
    );

    // Writes over TLS land on the live volume.
    let twos = write_file(d, "twos.raw", &vec![2u8; 16 << 20]);
    run(
        "nbdcopy",
        &[twos.to_str().unwrap(), &server.uri("live", &client)],
    );
    assert_eq!(read_live(d, 5 << 20, 4096), vec![2u8; 4096]);

    // A plaintext client gets nowhere...
    fails("nbdinfo", &[&format!("nbd://{}/live", server.addr)]);
    // ...and on the wire that is NBD_REP_ERR_TLS_REQD.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&3u32.to_be_bytes()); // NBD_OPT_LIST
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[12..16], &0x8000_0005u32.to_be_bytes());
}

#[test]
fn verify_peer_wants_a_certificate_of_the_ca() {
    if !tools(&["nbdinfo"]) {
        return;
    }
    let (dir, _, _) = volume_with_copy();
    let d = dir.path();
    credentials(d);
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--tls-creds",
        "server",
        "--tls-verify-peer",
    ];
    let server = Serve::start(d, &args).unwrap();
    run("nbdinfo", &[&server.uri("live", &d.join("client"))]);
    fails("nbdinfo", &[&server.uri("live", &d.join("stranger"))]);
    // No client certificate at all.
    let bare = d.join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(d.join("client/ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    fails("nbdinfo", &[&server.uri("live", &bare)]);
    // The server is still there for the right client.
    run("nbdinfo", &[&server.uri("live", &d.join("client"))]);
}

#[test]
fn tls_allow_serves_both_kinds_of_client() {
    if !tools(&["nbdinfo"]) {
        return;
    }
    let (dir, _, _) = volume_with_copy();
    let d = dir.path();
    credentials(d);
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--tls-creds",
        "server",
        "--tls",
        "allow",
    ];
    let server = Serve::start(d, &args).unwrap();
    run("nbdinfo", &[&server.uri("live", &d.join("client"))]);
    run("nbdinfo", &[&format!("nbd://{}/live", server.addr)]);
    // Without --tls-verify-peer any client certificate will do (so the
    // refusal above is the check's, not a broken directory's).
    run("nbdinfo", &[&server.uri("live", &d.join("stranger"))]);
}

#[test]
fn non_loopback_needs_tls_or_insecure() {
    let (dir, _, _) = volume_with_copy();
    let d = dir.path();
    credentials(d);
    let err = Serve::start(d, &["--listen", "0.0.0.0:0"]).err().unwrap();
    assert!(
        err.contains("--insecure") && err.contains("--tls-creds"),
        "{err}"
    );
    // TLS allowed but not required still lets plaintext in.
    let allow = [
        "--listen",
        "0.0.0.0:0",
        "--tls-creds",
        "server",
        "--tls",
        "allow",
    ];
    assert!(Serve::start(d, &allow).is_err());
    drop(Serve::start(d, &["--listen", "0.0.0.0:0", "--tls-creds", "server"]).unwrap());
    drop(Serve::start(d, &["--listen", "0.0.0.0:0", "--insecure"]).unwrap());
    // Bad credentials are named.
    let err = Serve::start(d, &["--listen", "127.0.0.1:0", "--tls-creds", "client"])
        .err()
        .unwrap();
    assert!(err.contains("server-cert.pem"), "{err}");
}

#[test]
fn read_only_and_chosen_exports() {
    if !tools(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let (dir, snap, expected) = volume_with_copy();
    let d = dir.path();
    let sock = d.join("nbd.sock");
    let sock = sock.to_str().unwrap();
    let prefix = &snap[..8];
    let server = Serve::start(d, &["--socket", sock, "--read-only", "--export", prefix]).unwrap();
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={sock}");
    let list = String::from_utf8(run("nbdinfo", &["--list", &uri("")]).stdout).unwrap();
    assert!(
        list.contains(&snap) && !list.contains("export=\"live\""),
        "{list}"
    );
    fails("nbdinfo", &[&uri("live")]);
    // The default export is the first one offered.
    let out = d.join("default.raw");
    run("nbdcopy", &[&uri(""), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == expected);
    drop(server);

    // --read-only: live is listed read-only and refuses writes.
    let server = Serve::start(d, &["--socket", sock, "--read-only"]).unwrap();
    let info = String::from_utf8(run("nbdinfo", &[&uri("live")]).stdout).unwrap();
    assert!(info.contains("is_read_only: true"), "{info}");
    let src = write_file(d, "w.raw", &vec![9u8; 16 << 20]);
    fails("nbdcopy", &[src.to_str().unwrap(), &uri("live")]);
    drop(server);
    assert_eq!(
        read_live(d, 0, 4096),
        vec![1u8; 4096],
        "a write went through"
    );
}

fn read_live(d: &Path, offset: u64, len: u64) -> Vec<u8> {
    let (offset, len) = (offset.to_string(), len.to_string());
    let out = vs_raw(
        d,
        &[
            "read", "--for", "disk.img", "--offset", &offset, "--length", &len,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
