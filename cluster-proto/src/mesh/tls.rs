//! Mutual TLS for control channels: every member holds a certificate from the cluster's CA
//! whose subject alternative name is its cluster address. The listener requires a client
//! certificate from the CA *and* checks that it names the address the connection comes
//! from; the dialer checks that the server's certificate names the address it dialed. A
//! process without valid credentials never gets to send PEER_JOIN.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// Why TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input held no certificate or key, or could not be parsed.
    #[error("{what}: {why}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The member's TLS configuration, both directions.
pub struct TlsSettings {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSettings { .. }")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsSettings {
    /// Builds the settings from PEM: the cluster CA certificate(s), this member's certificate
    /// chain and its private key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<TlsSettings, TlsError> {
        let pem = |what, why: String| TlsError::Pem { what, why };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|e| pem("CA certificate", e.to_string()))?;
            roots.add(c).map_err(|e| pem("CA certificate", e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(pem("CA certificate", "no certificate found".into()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| pem("member certificate", e.to_string()))?;
        if chain.is_empty() {
            return Err(pem("member certificate", "no certificate found".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| pem("member key", e.to_string()))?;
        let roots = Arc::new(roots);
        let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(cfg)?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(cfg)?;
        Ok(TlsSettings {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// Server side: the handshake, then the client's certificate must name `remote`.
    pub(super) async fn accept(
        &self,
        stream: TcpStream,
        remote: IpAddr,
        timeout: Duration,
    ) -> Result<server::TlsStream<TcpStream>, &'static str> {
        let tls = tokio::time::timeout(timeout, self.acceptor.accept(stream))
            .await
            .map_err(|_| "tls_timeout")?
            .map_err(|e| {
                // The reason (unknown CA, expired, no certificate...) is what an operator needs.
                tracing::warn!(%remote, error = %e, "TLS handshake with a connecting peer failed");
                "tls_handshake"
            })?;
        let named = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).is_some_and(|c| names(c, remote));
        if !named {
            return Err("tls_identity");
        }
        Ok(tls)
    }

    /// Client side: the handshake, verifying that the server's certificate names `peer`.
    pub(super) async fn connect(
        &self,
        stream: TcpStream,
        peer: IpAddr,
        timeout: Duration,
    ) -> Result<client::TlsStream<TcpStream>, &'static str> {
        tokio::time::timeout(timeout, self.connector.connect(ServerName::IpAddress(peer.into()), stream))
            .await
            .map_err(|_| "tls_timeout")?
            .map_err(|e| {
                tracing::warn!(%peer, error = %e, "TLS handshake with a dialed peer failed");
                "tls_handshake"
            })
    }
}

pub use rustls_pki_types::pem::SectionKind;

/// The kinds of the PEM sections in `pem`, in order, up to the first malformed one (to tell
/// an operator that a certificate file holds a key, or the reverse, before rustls's terser
/// "no certificate found").
pub fn pem_sections(pem: &[u8]) -> Vec<SectionKind> {
    let mut rest = pem;
    let mut kinds = Vec::new();
    while let Ok(Some((kind, _))) = rustls_pki_types::pem::from_buf(&mut rest) {
        kinds.push(kind);
    }
    kinds
}

/// True for the PEM sections that hold a private key (PKCS#8, PKCS#1 or SEC1).
pub fn is_private_key(kind: SectionKind) -> bool {
    matches!(kind, SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey)
}

/// True when the first certificate of a PEM chain names `ip` in its subject alternative
/// names (to check a member's own certificate against its address at start-up).
pub fn pem_names(cert_pem: &[u8], ip: IpAddr) -> bool {
    CertificateDer::pem_slice_iter(cert_pem).next().and_then(|c| c.ok()).is_some_and(|c| names(&c, ip))
}

/// True when the certificate's subject alternative names include `ip`.
fn names(cert: &CertificateDer<'_>, ip: IpAddr) -> bool {
    webpki::EndEntityCert::try_from(cert)
        .map(|c| c.verify_is_valid_for_subject_name(&ServerName::IpAddress(ip.into())).is_ok())
        .unwrap_or(false)
}
