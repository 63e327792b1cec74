//! `[tls]`: the member's credentials for the mutual-TLS control channel, and the checks of
//! what each file holds.

use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError};

/// `[tls]`: the member's credentials for the mutual-TLS control channel.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file with the cluster CA certificate(s).
    pub ca: std::path::PathBuf,
    /// PEM file with this member's certificate (its SAN is the member's cluster address).
    pub cert: std::path::PathBuf,
    /// PEM file with this member's private key.
    pub key: std::path::PathBuf,
}

/// What each `[tls]` file must hold, said in the operator's terms before rustls's terser errors:
/// a key given as `cert` (or the reverse), a CA file that carries the CA's own key, and a
/// private key that every user of the host can read.
fn check_pem_files(t: &TlsSection, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<(), ConfigError> {
    use cluster_proto::mesh::tls::{is_private_key, pem_sections, SectionKind};
    let holds = |bytes: &[u8]| {
        let kinds = pem_sections(bytes);
        (kinds.contains(&SectionKind::Certificate), kinds.iter().any(|&k| is_private_key(k)))
    };
    for (name, path, bytes) in [("ca", &t.ca, ca), ("cert", &t.cert, cert)] {
        let why = match holds(bytes) {
            (true, true) if name == "ca" => {
                "holds a private key besides the CA certificate: the CA's key (ca.key) must stay off the members"
            }
            (true, _) => continue,
            (false, true) => "holds a private key, not a certificate: are cert and key (or ca and ca.key) swapped?",
            (false, false) => "holds no PEM certificate (a -----BEGIN CERTIFICATE----- block)",
        };
        return Err(invalid(format!("tls.{name}"), format!("{} {why}", path.display())));
    }
    match holds(key) {
        (_, true) => {}
        (true, false) => {
            return Err(invalid(
                "tls.key",
                format!("{} holds a certificate, not a private key: are cert and key swapped?", t.key.display()),
            ))
        }
        (false, false) => {
            return Err(invalid(
                "tls.key",
                format!("{} holds no PEM private key (a -----BEGIN PRIVATE KEY----- block)", t.key.display()),
            ))
        }
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&t.key)
        .map_err(|e| invalid("tls.key", format!("cannot read {}: {e}", t.key.display())))?
        .permissions()
        .mode();
    if mode & 0o006 != 0 {
        return Err(invalid(
            "tls.key",
            format!(
                "{} is open to every user of this host (mode {:04o}): chmod 600 it (or 640 with a group lb runs in)",
                t.key.display(),
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

impl Config {
    /// Reads the [tls] files into the mesh's TLS settings (`None` for plaintext).
    pub fn tls_settings(&self) -> Result<Option<std::sync::Arc<cluster_proto::mesh::tls::TlsSettings>>, ConfigError> {
        let Some(t) = &self.tls else { return Ok(None) };
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| invalid(format!("tls.{key}"), format!("cannot read {}: {e}", p.display())))
        };
        let (ca, cert, key) = (read("ca", &t.ca)?, read("cert", &t.cert)?, read("key", &t.key)?);
        check_pem_files(t, &ca, &cert, &key)?;
        if !cluster_proto::mesh::tls::pem_names(&cert, self.node.address) {
            return Err(invalid(
                "tls.cert",
                format!(
                    "{} does not name this member's address {} in its subject alternative names: peers would refuse it",
                    t.cert.display(),
                    self.node.address
                ),
            ));
        }
        let s = cluster_proto::mesh::tls::TlsSettings::from_pem(&ca, &cert, &key)
            .map_err(|e| invalid("tls", e.to_string()))?;
        Ok(Some(std::sync::Arc::new(s)))
    }
}
