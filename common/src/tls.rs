//! The fleet's certificate authority and the TLS configurations built on it.
//!
//! Invariants:
//! - Every connection is mutual TLS. The server accepts only client certificates that chain to
//!   the fleet CA, are inside their validity window, and are not revoked.
//! - A host's id is the Common Name of its verified client certificate ([`host_id_of`]); no
//!   message can claim another host's id.
//! - Revocation is by host id and time: a host revoked at time `t` is refused with every
//!   certificate issued (`notBefore`) at or before `t`. Issuing a fresh certificate re-admits it.
//! - Sessions are never resumed, so every connection's certificate is verified (and checked
//!   against revocations) afresh.
//! - Private keys are written with mode 0600, certificates 0644, and neither is overwritten by
//!   accident.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use time::{Duration, OffsetDateTime};

use crate::ids::HostId;

/// File names inside a CA directory.
pub mod files {
    /// The CA certificate, given to every agent and the aggregator.
    pub const CA_CERT: &str = "ca.pem";
    /// The CA private key: keep it off agent hosts.
    pub const CA_KEY: &str = "ca.key";
    /// The aggregator's server certificate.
    pub const SERVER_CERT: &str = "server.pem";
    /// The aggregator's server key.
    pub const SERVER_KEY: &str = "server.key";
}

/// The name the aggregator's certificate always carries, and the agent's default server name.
pub const DEFAULT_SERVER_NAME: &str = "flotilla-aggregator";

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS reason.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS reason.
        #[source]
        source: std::io::Error,
    },
    /// A file to be created already exists.
    #[error("{path} already exists; move it away (or pass --force) to replace it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: no {what} found in PEM")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
    /// Certificate generation failed.
    #[error("generating certificate for {subject}")]
    Generate {
        /// Whose certificate.
        subject: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the material.
    #[error("building TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("building client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// A certificate has no usable host id.
    #[error("certificate subject has no valid host id: {reason}")]
    HostId {
        /// What was wrong.
        reason: String,
    },
}

/// A freshly made certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key (PKCS#8), PEM.
    pub key_pem: String,
}

/// A CA loaded in memory, able to sign host certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

// === impl Ca ===

impl Ca {
    /// Makes a new self-signed CA valid for `valid_days`.
    pub fn generate(name: &str, valid_days: u32) -> Result<(Self, CertPair), TlsError> {
        let gen_err = |source| TlsError::Generate { subject: name.to_owned(), source };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationName, "Flotilla fleet");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(i64::from(valid_days));
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let pair = CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        let ca = Self::from_pem(&pair.cert_pem, &pair.key_pem).map_err(|e| match e {
            TlsError::Generate { source, .. } => gen_err(source),
            other => other,
        })?;
        Ok((ca, pair))
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let gen_err = |source| TlsError::Generate { subject: "CA".to_owned(), source };
        let key = KeyPair::from_pem(key_pem).map_err(gen_err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(gen_err)?;
        Ok(Self { cert_pem: cert_pem.to_owned(), issuer })
    }

    /// Loads `ca.pem` and `ca.key` from a CA directory.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert = read_to_string(&dir.join(files::CA_CERT))?;
        let key = read_to_string(&dir.join(files::CA_KEY))?;
        Self::from_pem(&cert, &key)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues the aggregator's server certificate for `names` (DNS names or IP addresses);
    /// [`DEFAULT_SERVER_NAME`], `localhost` and `127.0.0.1` are always included.
    pub fn issue_server(&self, names: &[String], valid_days: u32) -> Result<CertPair, TlsError> {
        let mut all: Vec<String> =
            vec![DEFAULT_SERVER_NAME.into(), "localhost".into(), "127.0.0.1".into()];
        for n in names {
            if !all.contains(n) {
                all.push(n.clone());
            }
        }
        let now = OffsetDateTime::now_utc();
        self.issue(
            DEFAULT_SERVER_NAME,
            &all,
            ExtendedKeyUsagePurpose::ServerAuth,
            now - Duration::minutes(5),
            now + Duration::days(i64::from(valid_days)),
        )
    }

    /// Issues a host's client certificate, valid from now for `valid_days`.
    pub fn issue_host(&self, host: &HostId, valid_days: u32) -> Result<CertPair, TlsError> {
        let now = OffsetDateTime::now_utc();
        self.issue_host_between(host, now, now + Duration::days(i64::from(valid_days)))
    }

    /// Issues a host's client certificate with an explicit validity window (tests use this to
    /// make expired certificates).
    pub fn issue_host_between(
        &self,
        host: &HostId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertPair, TlsError> {
        self.issue(host.as_str(), &[], ExtendedKeyUsagePurpose::ClientAuth, not_before, not_after)
    }

    fn issue(
        &self,
        common_name: &str,
        names: &[String],
        usage: ExtendedKeyUsagePurpose,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertPair, TlsError> {
        let gen_err = |source| TlsError::Generate { subject: common_name.to_owned(), source };
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().map_err(gen_err)?),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Creates a CA directory: `ca.pem`, `ca.key`, `server.pem`, `server.key`.
///
/// Refuses to overwrite an existing CA unless `force`.
pub fn init_ca_dir(
    dir: &Path,
    server_names: &[String],
    valid_days: u32,
    force: bool,
) -> Result<(), TlsError> {
    let ca_cert = dir.join(files::CA_CERT);
    if ca_cert.exists() && !force {
        return Err(TlsError::Exists { path: ca_cert });
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.into(), source })?;
    let (ca, pair) = Ca::generate("Flotilla fleet CA", valid_days)?;
    let server = ca.issue_server(server_names, valid_days)?;
    write_private(&dir.join(files::CA_KEY), &pair.key_pem)?;
    write_public(&ca_cert, &pair.cert_pem)?;
    write_private(&dir.join(files::SERVER_KEY), &server.key_pem)?;
    write_public(&dir.join(files::SERVER_CERT), &server.cert_pem)?;
    Ok(())
}

/// Issues `HOST.pem` and `HOST.key` into `out_dir` with the CA in `ca_dir`; returns their paths.
pub fn issue_host_files(
    ca_dir: &Path,
    host: &HostId,
    out_dir: &Path,
    valid_days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let ca = Ca::load(ca_dir)?;
    let cert_path = out_dir.join(format!("{host}.pem"));
    let key_path = out_dir.join(format!("{host}.key"));
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(TlsError::Exists { path: p.clone() });
            }
        }
    }
    fs::create_dir_all(out_dir)
        .map_err(|source| TlsError::Write { path: out_dir.into(), source })?;
    let pair = ca.issue_host(host, valid_days)?;
    write_private(&key_path, &pair.key_pem)?;
    write_public(&cert_path, &pair.cert_pem)?;
    Ok((cert_path, key_path))
}

/// Writes a private key: a new file with mode 0600 (replacing any old file).
pub fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    write_with_mode(path, contents, 0o600)
}

/// Writes a certificate: a new file with mode 0644, readable by the service users.
pub fn write_public(path: &Path, contents: &str) -> Result<(), TlsError> {
    write_with_mode(path, contents, 0o644)
}

fn write_with_mode(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    let write_err = |source| TlsError::Write { path: path.into(), source };
    if path.exists() {
        fs::remove_file(path).map_err(write_err)?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    // The umask may have narrowed the mode at creation; set it exactly.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(write_err)?;
    file.write_all(contents.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// Revoked hosts, shared between the admin API (writes) and the TLS verifier (reads).
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    // host -> revoked at, Unix seconds.
    inner: Arc<RwLock<HashMap<HostId, i64>>>,
}

impl Revocations {
    /// Marks `host` revoked at `unix_secs`.
    pub fn revoke(&self, host: HostId, unix_secs: i64) {
        self.write().insert(host, unix_secs);
    }

    /// Removes a revocation; returns whether there was one.
    pub fn unrevoke(&self, host: &HostId) -> bool {
        self.write().remove(host).is_some()
    }

    /// When `host` was revoked, if it was.
    pub fn revoked_at(&self, host: &HostId) -> Option<i64> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(host).copied()
    }

    /// Whether a certificate for `host` issued at `not_before_secs` is revoked.
    pub fn is_revoked(&self, host: &HostId, not_before_secs: i64) -> bool {
        self.revoked_at(host).is_some_and(|at| not_before_secs <= at)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<HostId, i64>> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The host id and issue time read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// Common Name as a host id.
    pub host: HostId,
    /// `notBefore`, Unix seconds.
    pub not_before_secs: i64,
    /// `notAfter`, Unix seconds.
    pub not_after_secs: i64,
}

/// Reads the host id (Common Name) and validity of a DER certificate.
pub fn host_id_of(der: &[u8]) -> Result<CertIdentity, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::HostId { reason: format!("unparsable certificate: {e}") })?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| TlsError::HostId { reason: "no Common Name".into() })?
        .as_str()
        .map_err(|e| TlsError::HostId { reason: format!("Common Name is not text: {e}") })?;
    let host = HostId::new(cn).map_err(|e| TlsError::HostId { reason: e.to_string() })?;
    Ok(CertIdentity {
        host,
        not_before_secs: cert.validity().not_before.timestamp(),
        not_after_secs: cert.validity().not_after.timestamp(),
    })
}

/// Server-side TLS: the aggregator's certificate, client certificates required from the fleet
/// CA, revoked hosts refused, ALPN `flotilla/1`.
pub fn server_config(
    ca_cert: &Path,
    cert: &Path,
    key: &Path,
    revocations: Revocations,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(root_store(ca_cert)?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let verifier = Arc::new(FleetClientVerifier { inner, revocations });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![crate::proto::ALPN.to_vec()];
    // No session resumption: a resumed TLS 1.3 session skips client certificate verification,
    // which would let a revoked host back in on its cached ticket. Every connection is a full
    // handshake through the verifier above.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client-side TLS: trust only the fleet CA, present the host's certificate, ALPN `flotilla/1`.
pub fn client_config(
    ca_cert: &Path,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_from(root_store(ca_cert)?, load_certs(cert)?, load_key(key)?)
}

/// Client-side TLS from in-memory PEM (benches and tests that make many identities).
pub fn client_config_pem(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, TlsError> {
    let path = PathBuf::from("<memory>");
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(&path, ca_pem.as_bytes())? {
        roots.add(c).map_err(TlsError::Rustls)?;
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| TlsError::Pem { path: path.clone(), what: "private key" })?;
    client_config_from(roots, certs_from_pem(&path, cert_pem.as_bytes())?, key)
}

fn client_config_from(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![crate::proto::ALPN.to_vec()];
    Ok(config)
}

fn root_store(ca_cert: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca_cert)? {
        roots.add(c).map_err(TlsError::Rustls)?;
    }
    Ok(roots)
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    certs_from_pem(path, &pem)
}

fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.into(), what: "certificate" });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| TlsError::Pem { path: path.into(), what: "private key" })
}

fn read_to_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.into(), source })
}

/// WebPKI client verification plus the fleet's own rules: a host id in the Common Name and no
/// revocation.
#[derive(Debug)]
struct FleetClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

impl ClientCertVerifier for FleetClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let identity = host_id_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if self.revocations.is_revoked(&identity.host, identity.not_before_secs) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_dir_issue_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        init_ca_dir(dir.path(), &["agg.example".into()], 30, false).unwrap();
        let err = init_ca_dir(dir.path(), &[], 30, false).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        let host = HostId::new("gpu-07").unwrap();
        let (cert, key) = issue_host_files(dir.path(), &host, dir.path(), 10, false).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(mode(&dir.path().join(files::CA_KEY)), 0o600);
        let der = load_certs(&cert).unwrap().remove(0);
        let id = host_id_of(&der).unwrap();
        assert_eq!(id.host, host);
        assert!(id.not_after_secs - id.not_before_secs >= 10 * 86_400 - 1);
        // Both configs build from the files.
        server_config(
            &dir.path().join(files::CA_CERT),
            &dir.path().join(files::SERVER_CERT),
            &dir.path().join(files::SERVER_KEY),
            Revocations::default(),
        )
        .unwrap();
        client_config(&dir.path().join(files::CA_CERT), &cert, &key).unwrap();
    }

    #[test]
    fn revocation_covers_certificates_issued_before_it() {
        let r = Revocations::default();
        let h = HostId::new("h1").unwrap();
        assert!(!r.is_revoked(&h, 100));
        r.revoke(h.clone(), 200);
        assert!(r.is_revoked(&h, 100));
        assert!(r.is_revoked(&h, 200));
        assert!(!r.is_revoked(&h, 201), "a certificate issued later re-admits the host");
        assert!(r.unrevoke(&h));
        assert!(!r.is_revoked(&h, 100));
    }
}
