//! Certificates on disk: PEM chain + key in, parsed facts out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A usable certificate: the key rustls serves and what we know of it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// Facts read from an end-entity certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// DNS names from the subjectAltName extension, lowercased.
    pub dns_names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Whether the certificate covers `name` the way a TLS client checks it:
    /// an exact SAN, or a `*.` SAN for exactly one more label.
    pub fn covers(&self, name: &str) -> bool {
        self.dns_names
            .iter()
            .any(|san| match san.strip_prefix("*.") {
                Some(suffix) => crate::names::wildcard_covers(suffix, name),
                None => san == name,
            })
    }

    /// Whole days until expiry (negative once expired).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(left) => (left.as_secs() / 86_400) as i64,
            Err(past) => -((past.duration().as_secs() / 86_400) as i64) - 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("reading {0}: {1}")]
    ReadKey(PathBuf, std::io::Error),
    #[error("{0}: no PEM certificate found")]
    NoCertificate(String),
    #[error("{0}: no usable PEM private key found ({1})")]
    NoKey(String, String),
    #[error("{0}: the key does not match the certificate")]
    KeyMismatch(String),
    #[error("{0}: {1}")]
    Rejected(String, rustls::Error),
    #[error("{0}: cannot parse certificate: {1}")]
    Parse(String, String),
}

impl CertError {
    /// Whether the key file is what to mend (unreadable, or no key in it);
    /// a bad chain, or a key that does not match it, is the certificate's.
    pub fn in_key_file(&self) -> bool {
        matches!(self, Self::ReadKey(..) | Self::NoKey(..))
    }
}

/// Reads a PEM chain (leaf first) and its key: RSA, ECDSA or Ed25519.
pub fn load_files(cert_file: &Path, key_file: &Path) -> Result<Loaded, CertError> {
    let chain = std::fs::read(cert_file).map_err(|e| CertError::Read(cert_file.into(), e))?;
    let key = std::fs::read(key_file).map_err(|e| CertError::ReadKey(key_file.into(), e))?;
    let (cert_file, key_file) = (
        cert_file.display().to_string(),
        key_file.display().to_string(),
    );
    parse_pem(&chain, &key, &cert_file, &key_file)
}

/// Parses a PEM chain and key; `source` names them in errors.
pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], source: &str) -> Result<Loaded, CertError> {
    parse_pem(chain_pem, key_pem, source, source)
}

/// `source` names the chain in errors, `key_source` the key.
fn parse_pem(
    chain_pem: &[u8],
    key_pem: &[u8],
    source: &str,
    key_source: &str,
) -> Result<Loaded, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Parse(source.into(), e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate(source.into()));
    };
    let info = describe(leaf).map_err(|e| CertError::Parse(source.into(), e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| CertError::NoKey(key_source.into(), e.to_string()))?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            CertError::KeyMismatch(source.into())
        }
        e => CertError::Rejected(source.into(), e),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        info,
    })
}

/// The crypto provider for every TLS context we build (see README: aws-lc-rs).
/// Trust roots from a PEM file (every certificate in it), for clients that
/// talk to servers on a private PKI: `probe --ca`, `acme.ca_file`.
pub fn roots_from_file(path: &Path) -> Result<rustls::RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err("no usable certificate in it".into());
    }
    Ok(roots)
}

pub fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// Reads subject, issuer, SANs and validity from a DER certificate.
pub fn describe(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let dns_names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        Some(dns.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        dns_names,
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
    })
}

/// Temp file in the same directory, fsync, rename over, fsync the
/// directory: a crash leaves the old file or the new one, never half.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// What `check` finds wrong with the certificate files of the sites this
/// node holds: unreadable, not PEM, a key that does not match, names not
/// covered, expired. Each names the field and the file.
pub fn check_files(config: &crate::config::Config, now: SystemTime) -> Vec<crate::config::Problem> {
    use crate::config::Problem;
    let mut problems = Vec::new();
    for (site, files) in config.held_with_files() {
        let field = |name: &str| format!("sites[{}].{name}", site.index);
        let loaded = match load_files(&files.cert, &files.key) {
            Ok(loaded) => loaded,
            Err(e) => {
                let which = if e.in_key_file() {
                    "key_file"
                } else {
                    "cert_file"
                };
                problems.push(Problem {
                    field: field(which),
                    message: e.to_string(),
                });
                continue;
            }
        };
        let mut problem = |message: String| {
            problems.push(Problem {
                field: field("cert_file"),
                message,
            })
        };
        let shown = files.cert.display();
        for name in &site.names {
            let probe = name.to_string().replace("*.", "x.");
            if !loaded.info.covers(&probe) {
                problem(format!("{shown} does not cover {name}"));
            }
        }
        if loaded.info.not_after <= now {
            problem(format!(
                "{shown} expired at {}",
                humantime::format_rfc3339_seconds(loaded.info.not_after)
            ));
        }
    }
    problems
}
