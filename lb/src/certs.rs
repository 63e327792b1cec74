//! `lb gen-certs`: a cluster CA and one certificate per member (subject alternative name =
//! the member's cluster address), for the mutual-TLS control channel. Operators with their
//! own PKI issue equivalent certificates instead (docs/security.md).

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// PEM texts of a CA and its members' certificates and keys.
pub struct ClusterCerts {
    /// The CA certificate (give it to every member).
    pub ca_cert: String,
    /// The CA private key (keep it offline).
    pub ca_key: String,
    /// Per member: address, certificate, private key.
    pub members: Vec<(IpAddr, String, String)>,
}

/// Generates a CA named `name` and a certificate for each member address.
pub fn generate(name: &str, members: &[IpAddr]) -> anyhow::Result<ClusterCerts> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{name} cluster CA"));
    ca.distinguished_name = dn;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);
    let mut out = Vec::new();
    for &addr in members {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = vec![SanType::IpAddress(addr)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} member {addr}"));
        p.distinguished_name = dn;
        let cert = p.signed_by(&key, &issuer)?;
        out.push((addr, cert.pem(), key.serialize_pem()));
    }
    Ok(ClusterCerts { ca_cert: ca_cert.pem(), ca_key: ca_key.serialize_pem(), members: out })
}

/// Writes `ca.pem`, `ca.key` and `ADDRESS.pem` / `ADDRESS.key` per member into `dir` (keys
/// readable by the owner only).
pub fn write(dir: &Path, certs: &ClusterCerts) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let put = |file: String, text: &str, secret: bool| -> anyhow::Result<()> {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if secret {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    };
    put("ca.pem".into(), &certs.ca_cert, false)?;
    put("ca.key".into(), &certs.ca_key, true)?;
    for (addr, cert, key) in &certs.members {
        put(format!("{addr}.pem"), cert, false)?;
        put(format!("{addr}.key"), key, true)?;
    }
    Ok(())
}
