//! A small packet builder for test runs: Ethernet + IPv4/IPv6 (options, extension headers,
//! fragments) + TCP/UDP/SCTP/ICMP, optionally truncated. Checksums are left zero: the
//! programs do not verify them.

use std::net::IpAddr;

/// The L4 part of a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    /// TCP with the given flags byte (SYN = 0x02, ACK = 0x10, FIN = 0x01, RST = 0x04).
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Flags byte.
        flags: u8,
    },
    /// UDP.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// SCTP (common header only).
    Sctp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMPv4 or ICMPv6 (by the address family) with type, code and echo identifier.
    Icmp {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
        /// Echo identifier.
        id: u16,
    },
    /// Any protocol with a raw payload.
    Raw {
        /// IP protocol number.
        protocol: u8,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// An IPv6 extension header to insert before the L4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtHeader {
    /// Hop-by-hop options (8 bytes, PadN).
    HopByHop,
    /// Routing header (8 bytes, type 0, no segments left).
    Routing,
    /// Destination options (8 bytes).
    DestOpts,
}

/// Fragmentation of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Offset in 8-byte units (0 = first fragment).
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    /// IP identification.
    pub id: u32,
}

/// A packet to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketSpec {
    /// Source address (family decides IPv4 vs IPv6; both must match).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// L4 header.
    pub l4: L4,
    /// IPv4 options (padded to 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers.
    pub ipv6_ext: Vec<ExtHeader>,
    /// Fragment information; for non-first fragments the L4 header is replaced by payload.
    pub fragment: Option<Fragment>,
    /// Cut the frame to this many bytes.
    pub truncate_to: Option<usize>,
    /// Override the Ethernet type.
    pub ethertype: Option<u16>,
}

impl PacketSpec {
    /// A packet with defaults for everything but the addresses and L4.
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            ipv4_options: Vec::new(),
            ipv6_ext: Vec::new(),
            fragment: None,
            truncate_to: None,
            ethertype: None,
        }
    }

    /// A TCP packet.
    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    /// A UDP packet.
    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    /// An ICMP packet.
    pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8, id: u16) -> Self {
        Self::new(src, dst, L4::Icmp { ty, code: 0, id })
    }

    fn l4_bytes(&self, v6: bool) -> (u8, Vec<u8>) {
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = *flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                (6, h)
            }
            L4::Udp { sport, dport } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&8u16.to_be_bytes());
                (17, h)
            }
            L4::Sctp { sport, dport } => {
                let mut h = vec![0u8; 12];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                (132, h)
            }
            L4::Icmp { ty, code, id } => {
                let mut h = vec![0u8; 8];
                h[0] = *ty;
                h[1] = *code;
                h[4..6].copy_from_slice(&id.to_be_bytes());
                (if v6 { 58 } else { 1 }, h)
            }
            L4::Raw { protocol, payload } => (*protocol, payload.clone()),
        }
    }

    /// The Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let v6 = self.src.is_ipv6();
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
        let et = self.ethertype.unwrap_or(if v6 { 0x86dd } else { 0x0800 });
        out.extend_from_slice(&et.to_be_bytes());
        let (proto, mut l4) = self.l4_bytes(v6);
        if self.fragment.is_some_and(|f| f.offset != 0) {
            l4 = vec![0xab; 16];
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut opts = self.ipv4_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                let opts_len = opts.len().min(40);
                let ihl = (20 + opts_len) / 4;
                let total = (20 + opts_len + l4.len()) as u16;
                let mut h = vec![0u8; 20];
                h[0] = 0x40 | ihl as u8;
                h[2..4].copy_from_slice(&total.to_be_bytes());
                if let Some(f) = self.fragment {
                    h[4..6].copy_from_slice(&(f.id as u16).to_be_bytes());
                    let fo = (f.offset & 0x1fff) | if f.more { 0x2000 } else { 0 };
                    h[6..8].copy_from_slice(&fo.to_be_bytes());
                }
                h[8] = 64;
                h[9] = proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                out.extend_from_slice(&h);
                out.extend_from_slice(opts.get(..opts_len).unwrap_or(&[]));
            }
            (s, d) => {
                let to16 = |a: IpAddr| match a {
                    IpAddr::V6(a) => a.octets(),
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                };
                let mut exts: Vec<(u8, Vec<u8>)> = self
                    .ipv6_ext
                    .iter()
                    .map(|e| match e {
                        ExtHeader::HopByHop => (0u8, vec![0, 0, 1, 4, 0, 0, 0, 0]),
                        ExtHeader::Routing => (43u8, vec![0, 0, 0, 0, 0, 0, 0, 0]),
                        ExtHeader::DestOpts => (60u8, vec![0, 0, 1, 4, 0, 0, 0, 0]),
                    })
                    .collect();
                if let Some(f) = self.fragment {
                    let mut fh = vec![0u8; 8];
                    let fo = (f.offset << 3) | u16::from(f.more);
                    fh[2..4].copy_from_slice(&fo.to_be_bytes());
                    fh[4..8].copy_from_slice(&f.id.to_be_bytes());
                    exts.push((44, fh));
                }
                // Chain next-header fields.
                let first = exts.first().map(|e| e.0).unwrap_or(proto);
                let n = exts.len();
                for i in 0..n {
                    let next = exts.get(i + 1).map(|e| e.0).unwrap_or(proto);
                    if let Some(b) = exts.get_mut(i).and_then(|e| e.1.get_mut(0)) {
                        *b = next;
                    }
                }
                let ext_len: usize = exts.iter().map(|e| e.1.len()).sum();
                let payload = (ext_len + l4.len()) as u16;
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&payload.to_be_bytes());
                h[6] = first;
                h[7] = 64;
                h[8..24].copy_from_slice(&to16(s));
                h[24..40].copy_from_slice(&to16(d));
                out.extend_from_slice(&h);
                for (_, e) in exts {
                    out.extend_from_slice(&e);
                }
            }
        }
        out.extend_from_slice(&l4);
        // Pad to the Ethernet minimum like a NIC would (the IP length says what is real).
        while out.len() < 60 {
            out.push(0);
        }
        if let Some(t) = self.truncate_to {
            out.truncate(t);
        }
        out
    }
}
