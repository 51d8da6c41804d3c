//! The internal CA: a root of the router's own in `state_dir/ca/` (or an
//! operator's CA named by `[internal_ca]`), and short-lived leaves for the
//! held sites whose names no public CA signs. Leaves are kept in
//! `state_dir/internal/<site>/` and put in the live store like any other
//! certificate. Copying `state_dir/ca/` to another node shares the root;
//! each node still makes its own leaf keys.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::disk::{self, Loaded};
use super::store::{CertStore, Entry, Source};
use crate::config::{Config, InternalCa};

/// A failed step, with the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
    #[error("{0} exists without {1}; not overwritten: restore or remove it")]
    HalfThere(PathBuf, PathBuf),
    #[error("issuing for {0}: {1}")]
    Issue(String, String),
}

/// A CA that can sign leaves.
pub struct Ca {
    cert_pem: String,
    cert_der: Vec<u8>,
    cert_path: PathBuf,
    issuer: rcgen::Issuer<'static, KeyPair>,
    /// SHA-256 of the root's DER, as `openssl x509 -fingerprint -sha256` shows it.
    pub fingerprint: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_path", &self.cert_path)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Where the router's own CA lives under `state_dir`: (certificate, key).
pub fn own_ca_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = state_dir.join("ca");
    (dir.join("root.pem"), dir.join("root.key"))
}

impl Ca {
    /// Opens the operator's CA, or the router's own, creating that one if
    /// neither of its files exists. An existing file is never overwritten.
    pub fn open(settings: &InternalCa, state_dir: &Path) -> Result<Ca, CaError> {
        if let Some(files) = &settings.files {
            return Ca::load(&files.cert, &files.key);
        }
        let (cert, key) = own_ca_paths(state_dir);
        match (cert.exists(), key.exists()) {
            (true, true) => Ca::load(&cert, &key),
            (false, false) => match Ca::create(&cert, &key) {
                // Another process (an upgrade's successor, say) made it first.
                Err(CaError::Io(_, e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Ca::load(&cert, &key)
                }
                other => other,
            },
            (true, false) => Err(CaError::HalfThere(cert, key)),
            (false, true) => Err(CaError::HalfThere(key, cert)),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| CaError::Io(p.into(), e));
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&read(key_path)?)
            .map_err(|e| CaError::Invalid(key_path.into(), e.to_string()))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| CaError::Invalid(cert_path.into(), e.to_string()))?;
        let der =
            pem::parse(&cert_pem).map_err(|e| CaError::Invalid(cert_path.into(), e.to_string()))?;
        Ok(Ca {
            fingerprint: fingerprint(der.contents()),
            cert_der: der.contents().to_vec(),
            cert_pem,
            cert_path: cert_path.into(),
            issuer,
        })
    }

    /// A new root: ECDSA P-256, ten years, allowed to sign leaves only.
    fn create(cert_path: &Path, key_path: &Path) -> Result<Ca, CaError> {
        let invalid = |e: rcgen::Error| CaError::Invalid(cert_path.into(), e.to_string());
        let key = KeyPair::generate().map_err(invalid)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
        let host = hostname();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("sni-router internal CA {}", host.trim()),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let root = params.self_signed(&key).map_err(invalid)?;
        // The key first, so a crash leaves at most a key without a root:
        // reported, never overwritten.
        write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(cert_path, root.pem().as_bytes(), 0o644)?;
        tracing::info!(root = %cert_path.display(), "internal CA created");
        Ca::load(cert_path, key_path)
    }

    /// A leaf for `names` valid for `lifetime`, with the CA's certificate
    /// after it: (chain PEM, key PEM).
    pub fn issue(&self, names: &[String], lifetime: Duration) -> Result<(String, String), CaError> {
        let label = names.first().cloned().unwrap_or_default();
        let failed = |e: rcgen::Error| CaError::Issue(label.clone(), e.to_string());
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(failed)?;
        params.distinguished_name.push(DnType::CommonName, &label);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        // Back a little (a minute, at most a tenth of the lifetime), for
        // clients whose clocks run behind.
        let lifetime = time::Duration::try_from(lifetime).unwrap_or(time::Duration::DAY);
        params.not_before = now - (lifetime / 10_i32).min(time::Duration::minutes(1));
        params.not_after = now + lifetime;
        let leaf = params.signed_by(&key, &self.issuer).map_err(failed)?;
        Ok((
            format!("{}{}", leaf.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }

    /// Whether a leaf's chain ends with this CA's certificate.
    fn signed(&self, loaded: &Loaded) -> bool {
        loaded
            .key
            .cert
            .last()
            .is_some_and(|c| c.as_ref() == self.cert_der.as_slice())
    }
}

/// This host's name, for the root's subject (gethostname: the unit's
/// `ProcSubset=pid` hides /proc/sys).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(buf.get(..end).unwrap_or_default()).into_owned()
    } else {
        String::new()
    }
}

fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// Creates `path` (and its directory); fails if it exists.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |e| CaError::Io(path.into(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Keeps a leaf from the internal CA in the store for every internal site
/// this node holds, renewing each with a third of its lifetime left.
#[derive(Debug, Default)]
pub struct Leaves {
    /// The open CA, and the state dir and CA files it came from.
    ca: Option<(CaSource, Ca)>,
}

type CaSource = (PathBuf, Option<crate::config::CertFiles>);

/// How long to wait after a failure before trying again.
const RETRY: Duration = Duration::from_secs(30);

impl Leaves {
    /// Issues or loads what is missing or due; returns when to call again.
    pub fn sync(&mut self, config: &Config, store: &CertStore) -> Option<SystemTime> {
        let sites = config.internal_sites();
        let labels: Vec<&str> = sites
            .iter()
            .map(|s| config.site(*s).label.as_str())
            .collect();
        store.retain(|site, e| e.source != Source::Internal || labels.contains(&site));
        let state_dir = config.state_dir.as_deref().filter(|_| !sites.is_empty())?;
        let ca = match self.ca(&config.internal_ca, state_dir) {
            Ok(ca) => ca,
            Err(e) => {
                tracing::warn!(error = %e, "internal CA unusable; its sites splice to other holders");
                return Some(SystemTime::now() + RETRY);
            }
        };
        let mut next: Option<SystemTime> = None;
        for site in sites {
            let site = config.site(site);
            let names: Vec<String> = site.names.iter().map(ToString::to_string).collect();
            let due = match leaf(ca, state_dir, &site.label, &names, config, store) {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(site = %site.label, error = %e, "internal CA: no leaf");
                    SystemTime::now() + RETRY
                }
            };
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        next
    }

    fn ca(&mut self, settings: &InternalCa, state_dir: &Path) -> Result<&Ca, CaError> {
        let wanted = (state_dir.to_path_buf(), settings.files.clone());
        let open = match self.ca.take() {
            Some((from, ca)) if from == wanted => (from, ca),
            _ => {
                let ca = Ca::open(settings, state_dir)?;
                tracing::info!(
                    root = %ca.cert_path.display(),
                    sha256 = %ca.fingerprint,
                    "internal CA: clients that trust this root accept its leaves"
                );
                (wanted, ca)
            }
        };
        Ok(&self.ca.insert(open).1)
    }
}

/// Puts a current leaf for one site in the store: the one there, the one on
/// disk, or a new one. Returns when it falls due.
fn leaf(
    ca: &Ca,
    state_dir: &Path,
    label: &str,
    names: &[String],
    config: &Config,
    store: &CertStore,
) -> Result<SystemTime, CaError> {
    let now = SystemTime::now();
    let usable = |loaded: &Loaded| {
        ca.signed(loaded)
            && names
                .iter()
                .all(|n| loaded.info.covers(&n.replace("*.", "x.")))
            && now < due(loaded)
    };
    let dir = state_dir.join("internal").join(label);
    let (chain_path, key_path) = (dir.join("chain.pem"), dir.join("key.pem"));
    if let Some(entry) = store
        .get(label)
        .filter(|e| e.source == Source::Internal && usable(&e.loaded))
    {
        return Ok(due(&entry.loaded));
    }
    let stored = std::fs::read_to_string(&chain_path)
        .ok()
        .zip(std::fs::read_to_string(&key_path).ok())
        .and_then(|(chain, key)| {
            let loaded = disk::from_pem(chain.as_bytes(), key.as_bytes(), label).ok()?;
            usable(&loaded).then_some(loaded)
        });
    let loaded = match stored {
        Some(loaded) => loaded,
        None => {
            let (chain, key) = ca.issue(names, config.internal_ca.lifetime)?;
            let write = |path: &Path, bytes: &str, mode| {
                disk::write_atomic(path, bytes.as_bytes(), mode)
                    .map_err(|e| CaError::Io(path.into(), e))
            };
            write(&key_path, &key, 0o600)?;
            write(&chain_path, &chain, 0o644)?;
            let loaded = disk::from_pem(chain.as_bytes(), key.as_bytes(), label)
                .map_err(|e| CaError::Issue(label.into(), e.to_string()))?;
            tracing::info!(
                site = label,
                not_after = %humantime::format_rfc3339_seconds(loaded.info.not_after),
                "internal CA: leaf issued"
            );
            loaded
        }
    };
    let at = due(&loaded);
    store.set(
        label,
        Entry {
            loaded,
            source: Source::Internal,
        },
    );
    Ok(at)
}

/// With a third of its lifetime left.
fn due(loaded: &Loaded) -> SystemTime {
    let info = &loaded.info;
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    info.not_after - lifetime / 3
}
