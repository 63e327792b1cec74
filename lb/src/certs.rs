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

/// Years a member certificate is valid (from January 1 of the current year).
pub const MEMBER_YEARS: i32 = 3;
/// Years the CA certificate is valid.
pub const CA_YEARS: i32 = 10;

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

/// Generates a CA named `name` and a certificate for each member address.
pub fn generate(name: &str, members: &[IpAddr]) -> anyhow::Result<ClusterCerts> {
    let year = this_year();
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{name} cluster CA"));
    ca.distinguished_name = dn;
    ca.not_before = rcgen::date_time_ymd(year, 1, 1);
    ca.not_after = rcgen::date_time_ymd(year + CA_YEARS, 1, 1);
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
        p.not_before = rcgen::date_time_ymd(year, 1, 1);
        p.not_after = rcgen::date_time_ymd(year + MEMBER_YEARS, 1, 1);
        let cert = p.signed_by(&key, &issuer)?;
        out.push((addr, cert.pem(), key.serialize_pem()));
    }
    Ok(ClusterCerts { ca_cert: ca_cert.pem(), ca_key: ca_key.serialize_pem(), members: out })
}

/// Writes `ca.pem`, `ca.key` and `ADDRESS.pem` / `ADDRESS.key` per member into `dir`. Keys
/// are created readable by the owner only; an existing CA key is never overwritten (a new
/// CA would silently invalidate every member's certificate).
pub fn write(dir: &Path, certs: &ClusterCerts) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if dir.join("ca.key").exists() {
        anyhow::bail!("{} already holds a CA key: choose another --out directory", dir.display());
    }
    let put = |file: String, text: &str, secret: bool| -> anyhow::Result<()> {
        let path = dir.join(file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
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
