//! The state file (`cluster.state_file`): this member's own connections, saved while it runs
//! and when it stops, and registered again when it starts, so that a restarted member sends
//! them in its table sync and its peers' stale entries (graceful restart) are reclaimed.
//!
//! ```text
//! "LBSTATE" 0x01                      8 bytes: magic and format version
//! INSTALL_CONNECTION ...              the control protocol's own frames (protocol.md),
//!                                     16 bytes (IPv4) or 40 bytes (IPv6) each, with the action
//! "END" 0x00 count (u64, big endian)  12 bytes: how many frames precede it
//! ```
//!
//! A file is written to `PATH.tmp`, synced and renamed over `PATH`, so a crash in the middle
//! leaves the previous file whole. A file that does not end with the trailer, or whose count
//! or frames do not match, is refused whole with the reason: nothing of it is registered.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cluster_proto::wire::Message;
use cluster_proto::{Action, Connection};

const MAGIC: &[u8; 8] = b"LBSTATE\x01";
const END: &[u8; 4] = b"END\0";
const TRAILER_LEN: usize = 12;

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Its bytes are not a state file of this format.
    #[error("{path} is not a usable state file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The bytes of a state file holding `entries`.
pub fn encode(entries: &[(Connection, Action)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + entries.len() * 16 + TRAILER_LEN);
    out.extend_from_slice(MAGIC);
    for &(connection, action) in entries {
        Message::InstallConnection { action, connection }.encode(&mut out);
    }
    out.extend_from_slice(END);
    out.extend_from_slice(&(entries.len() as u64).to_be_bytes());
    out
}

/// The entries of a state file's bytes; `path` names it in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Vec<(Connection, Action)>, StateError> {
    let bad = |reason: String| StateError::Format { path: path.to_path_buf(), reason };
    if bytes.len() < MAGIC.len() + TRAILER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("it does not start with the LBSTATE version-1 header".into()));
    }
    let (body, trailer) = bytes[MAGIC.len()..].split_at(bytes.len() - MAGIC.len() - TRAILER_LEN);
    if &trailer[..4] != END {
        return Err(bad("it does not end with the trailer (cut short while written?)".into()));
    }
    let count = u64::from_be_bytes(trailer[4..].try_into().expect("8 bytes"));
    let mut entries = Vec::new();
    let mut at = 0;
    while at < body.len() {
        match Message::decode(&body[at..]) {
            Ok(Some((Message::InstallConnection { action, connection }, n))) => {
                entries.push((connection, action));
                at += n;
            }
            Ok(Some((other, _))) => return Err(bad(format!("byte {}: {other:?} where only INSTALLs belong", at + 8))),
            Ok(None) => return Err(bad(format!("byte {}: a connection cut short", at + 8))),
            Err(e) => return Err(bad(format!("byte {}: {e}", at + 8))),
        }
    }
    if entries.len() as u64 != count {
        return Err(bad(format!("the trailer counts {count} connections, the file holds {}", entries.len())));
    }
    Ok(entries)
}

/// Reads the state file at `path`: no file is an empty state (a first start).
pub fn load(path: &Path) -> Result<Vec<(Connection, Action)>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(StateError::Read { path: path.to_path_buf(), source }),
    }
}

/// Writes `entries` to `path` atomically (a temporary file, synced, then renamed).
pub fn save(path: &Path, entries: &[(Connection, Action)]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // Connection 5-tuples: readable by this user only.
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&encode(entries))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename itself must survive a power loss.
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_proto::Protocol;

    fn entries() -> Vec<(Connection, Action)> {
        vec![
            (
                Connection::new(Protocol::Tcp, "192.0.2.1:40000".parse().unwrap(), "198.51.100.7:80".parse().unwrap())
                    .unwrap(),
                Action::Forward,
            ),
            (
                Connection::new(
                    Protocol::Udp,
                    "[2001:db8::1]:53".parse().unwrap(),
                    "[2001:db8::2]:5353".parse().unwrap(),
                )
                .unwrap(),
                Action::Bypass,
            ),
        ]
    }

    #[test]
    fn the_layout_is_the_documented_one_and_round_trips() {
        let bytes = encode(&entries());
        assert_eq!(&bytes[..8], b"LBSTATE\x01");
        // The control protocol's INSTALL_CONNECTION frames, byte for byte.
        assert_eq!(&bytes[8..12], &[1, 1, 6, 1]);
        assert_eq!(&bytes[24..28], &[1, 2, 17, 2]);
        assert_eq!(bytes.len(), 8 + 16 + 40 + 12);
        assert_eq!(&bytes[64..], &[b'E', b'N', b'D', 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(decode(Path::new("f"), &bytes).unwrap(), entries());
        assert_eq!(decode(Path::new("f"), &encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn damaged_files_are_refused_whole_with_the_reason() {
        let good = encode(&entries());
        let p = Path::new("/var/lib/lb/connections.state");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "header"),
            (b"garbage garbage garbage".to_vec(), "header"),
            (good[..good.len() - 3].to_vec(), "trailer"),
            (good[..30].iter().chain(&good[good.len() - 12..]).copied().collect(), "cut short"),
            (
                {
                    let mut b = good.clone();
                    let n = b.len();
                    b[n - 1] = 3;
                    b
                },
                "counts 3",
            ),
            (
                {
                    let mut b = good.clone();
                    b[8] = 9;
                    b
                },
                "byte 8",
            ),
            (
                {
                    let mut b = good[..8].to_vec();
                    b.extend_from_slice(&[3, 2, 0, 0]);
                    b.extend_from_slice(&good[good.len() - 12..]);
                    b
                },
                "only INSTALLs",
            ),
        ];
        for (bytes, want) in cases {
            let e = decode(p, &bytes).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("connections.state"), "{want}: {e}");
        }
    }

    #[test]
    fn save_replaces_the_file_whole_and_a_missing_file_is_empty() {
        let dir = std::env::temp_dir().join(format!("lb-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("connections.state");
        assert!(load(&path).unwrap().is_empty(), "no file: a first start");
        save(&path, &entries()).unwrap();
        assert_eq!(load(&path).unwrap(), entries());
        save(&path, &entries()[..1]).unwrap();
        assert_eq!(load(&path).unwrap(), entries()[..1].to_vec());
        assert!(!dir.join("connections.state.tmp").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
