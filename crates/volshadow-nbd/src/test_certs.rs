//! Test support: a certificate authority made on the spot and credential
//! directories in the layout qemu-nbd, qemu and libnbd read
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`).

use std::io;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

fn other(e: rcgen::Error) -> io::Error {
    io::Error::other(e)
}

/// A CA that signs server and client certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    pub fn new(name: &str) -> io::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::new()).map_err(other)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(other)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(other)?;
        Ok(TestCa { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate and key (PEM) for `localhost` and 127.0.0.1, for a
    /// server or a client. Key usages as qemu's checks want them.
    fn leaf(&self, name: &str, server: bool) -> io::Result<(String, String)> {
        let mut params =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).map_err(other)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().map_err(other)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(other)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Server credentials in `dir`: `ca-cert.pem` (this CA),
    /// `server-cert.pem`, `server-key.pem`.
    pub fn write_server_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = self.leaf("volshadow test server", true)?;
        std::fs::write(dir.join("ca-cert.pem"), self.cert_pem())?;
        std::fs::write(dir.join("server-cert.pem"), cert)?;
        std::fs::write(dir.join("server-key.pem"), key)
    }

    /// Client credentials in `dir`: `ca-cert.pem` is `trusted` (the CA
    /// the server's certificate must chain to), `client-cert.pem` and
    /// `client-key.pem` are signed by this CA.
    pub fn write_client_dir(&self, dir: &Path, trusted: &TestCa) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = self.leaf("volshadow test client", false)?;
        std::fs::write(dir.join("ca-cert.pem"), trusted.cert_pem())?;
        std::fs::write(dir.join("client-cert.pem"), cert)?;
        std::fs::write(dir.join("client-key.pem"), key)
    }
}
