//! A pcap file backend for tests and offline analysis: raw IP packets (LINKTYPE_RAW, 101),
//! microsecond timestamps, the classic libpcap format that tcpdump and Wireshark read.

use std::io::{self, Read, Write};
use std::time::Duration;

const MAGIC: u32 = 0xa1b2_c3d4;
const LINKTYPE_RAW: u32 = 101;
const SNAPLEN: u32 = 65_535;

/// Writes packets to a pcap stream.
pub struct PcapWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the file header.
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&SNAPLEN.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_RAW.to_le_bytes());
        out.write_all(&h)?;
        Ok(PcapWriter { out })
    }

    /// Appends one packet seen at `at` (since the capture's epoch).
    pub fn write(&mut self, at: Duration, packet: &[u8]) -> io::Result<()> {
        let len = u32::try_from(packet.len()).map_err(|_| io::Error::other("packet too long for pcap"))?;
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&(at.as_secs() as u32).to_le_bytes());
        h.extend_from_slice(&at.subsec_micros().to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(packet)
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Reads raw-IP packets from a pcap stream (either byte order).
pub struct PcapReader<R: Read> {
    input: R,
    swapped: bool,
}

impl<R: Read> PcapReader<R> {
    /// Reads and checks the file header.
    pub fn new(mut input: R) -> io::Result<Self> {
        let mut h = [0u8; 24];
        input.read_exact(&mut h)?;
        let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let swapped = match magic {
            MAGIC => false,
            m if m.swap_bytes() == MAGIC => true,
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "not a microsecond pcap file")),
        };
        let rd = |b: &[u8]| {
            let v = u32::from_le_bytes(b.try_into().expect("4 bytes"));
            if swapped {
                v.swap_bytes()
            } else {
                v
            }
        };
        if rd(&h[20..24]) != LINKTYPE_RAW {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "pcap link type is not raw IP (101)"));
        }
        Ok(PcapReader { input, swapped })
    }

    /// The next packet and its timestamp, or `None` at the end.
    pub fn next_packet(&mut self) -> io::Result<Option<(Duration, Vec<u8>)>> {
        let mut h = [0u8; 16];
        match self.input.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let rd = |b: &[u8]| {
            let v = u32::from_le_bytes(b.try_into().expect("4 bytes"));
            if self.swapped {
                v.swap_bytes()
            } else {
                v
            }
        };
        let (secs, micros, caplen) = (rd(&h[0..4]), rd(&h[4..8]), rd(&h[8..12]));
        if caplen > SNAPLEN {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "pcap record longer than 65535 bytes"));
        }
        let mut p = vec![0u8; caplen as usize];
        self.input.read_exact(&mut p)?;
        Ok(Some((Duration::new(secs as u64, micros.min(999_999) * 1000), p)))
    }
}
