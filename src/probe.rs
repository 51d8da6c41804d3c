//! `sni-router probe`: a plain TLS handshake that reports the chain a server
//! presents and, optionally, saves it: how one node copies the public chain
//! another node serves, and how an operator checks what clients see.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

use crate::certs::disk::{CertInfo, describe, provider};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading CA file {0}: {1}")]
    CaFile(String, String),
    #[error("no trust roots available (use --ca FILE)")]
    NoRoots,
    #[error("{0:?} is not a valid server name")]
    BadName(String),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS handshake with {0}: {1}")]
    Handshake(SocketAddr, std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("writing {0}: {1}")]
    Write(String, std::io::Error),
}

/// What the server presented.
#[derive(Debug)]
pub struct Report {
    pub chain: Vec<CertificateDer<'static>>,
    pub infos: Vec<Result<CertInfo, String>>,
    /// Whether the chain verifies for the name against the roots used.
    pub verified: Result<(), String>,
    pub version: String,
    pub alpn: Option<String>,
}

/// Connects to `target`, handshakes for `sni`, and reports the chain.
pub async fn probe(
    target: SocketAddr,
    sni: &str,
    ca: Option<&Path>,
    timeout: Duration,
) -> Result<Report, ProbeError> {
    let roots = roots(ca)?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider()))
        .build()
        .map_err(|_| ProbeError::NoRoots)?;
    let recorder = Arc::new(Recorder {
        inner,
        seen: Mutex::new((Vec::new(), Err("no certificate presented".into()))),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ProbeError::Handshake(target, std::io::Error::other(e)))?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name =
        ServerName::try_from(sni.to_string()).map_err(|_| ProbeError::BadName(sni.into()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let work = async {
        let tcp = TcpStream::connect(target)
            .await
            .map_err(|e| ProbeError::Connect(target, e))?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| ProbeError::Handshake(target, e))
    };
    let tls = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))??;
    let (_, conn) = tls.get_ref();
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let (chain, verified) = recorder
        .seen
        .lock()
        .map(|seen| seen.clone())
        .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
    let infos = chain.iter().map(describe).collect();
    Ok(Report {
        chain,
        infos,
        verified,
        version,
        alpn,
    })
}

fn roots(ca: Option<&Path>) -> Result<RootCertStore, ProbeError> {
    if let Some(path) = ca {
        return crate::certs::disk::roots_from_file(path)
            .map_err(|e| ProbeError::CaFile(path.display().to_string(), e));
    }
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return Err(ProbeError::NoRoots);
    }
    Ok(roots)
}

/// Human-readable report, one block per certificate.
pub fn render(report: &Report, now: SystemTime) -> String {
    let mut out = format!(
        "{} {}, ALPN {}\n",
        report.version,
        match &report.verified {
            Ok(()) => "chain verifies".to_string(),
            Err(e) => format!("chain does NOT verify: {e}"),
        },
        report.alpn.as_deref().unwrap_or("none")
    );
    for (i, info) in report.infos.iter().enumerate() {
        match info {
            Ok(info) => out.push_str(&format!(
                "[{i}] subject: {}\n    SANs: {}\n    issuer: {}\n    not before: {}\n    not after: {} ({} days left)\n",
                info.subject,
                info.dns_names.join(", "),
                info.issuer,
                humantime::format_rfc3339_seconds(info.not_before),
                humantime::format_rfc3339_seconds(info.not_after),
                info.days_left(now),
            )),
            Err(e) => out.push_str(&format!("[{i}] unparsable certificate: {e}\n")),
        }
    }
    out
}

/// The chain as PEM, leaf first, as presented.
pub fn chain_pem(chain: &[CertificateDer<'_>]) -> String {
    chain
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.as_ref().to_vec())))
        .collect()
}

/// Writes `DIR/chain.pem`; returns its path.
pub fn write_chain(
    dir: &Path,
    chain: &[CertificateDer<'_>],
) -> Result<std::path::PathBuf, ProbeError> {
    let path = dir.join("chain.pem");
    let shown = path.display().to_string();
    std::fs::create_dir_all(dir).map_err(|e| ProbeError::Write(shown.clone(), e))?;
    std::fs::write(&path, chain_pem(chain)).map_err(|e| ProbeError::Write(shown, e))?;
    Ok(path)
}

/// Records the presented chain and the verdict, then lets the handshake
/// proceed either way so an invalid chain can still be inspected.
#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Seen>,
}

type Seen = (Vec<CertificateDer<'static>>, Result<(), String>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        if let Ok(mut seen) = self.seen.lock() {
            *seen = (chain, verdict);
        }
        Ok(ServerCertVerified::assertion())
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
