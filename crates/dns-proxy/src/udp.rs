//! The UDP listener: per datagram, who sent it and which DNS server it was for.
//!
//! Two modes:
//! - **Transparent** (production): the datapath steers pods' DNS datagrams to the socket with
//!   TPROXY, keeping their destination. The socket has `IP_TRANSPARENT` and
//!   `IP_RECVORIGDSTADDR` (`IPV6_*` for IPv6), so `recvmsg` hands over each datagram's
//!   original destination in a control message; answers are sent from that address (a
//!   transparent socket bound to it), so the pod sees its server answer. Needs
//!   `CAP_NET_ADMIN` (for `IP_TRANSPARENT`, binding to non-local addresses).
//! - **Fixed** (tests, or fronting one known server): every datagram is for one upstream, and
//!   answers come from the listener's own address. No privilege needed.

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// At most this many per-server reply sockets are kept (a node usually has one or two DNS
/// servers; the cap only bounds a pathological spread).
const MAX_REPLY_SOCKETS: usize = 256;

#[derive(Debug, Clone, Copy)]
enum Mode {
    Transparent,
    Fixed(SocketAddr),
}

/// A UDP socket the proxy serves DNS on.
#[derive(Debug)]
pub struct DnsUdpSocket {
    socket: UdpSocket,
    local: SocketAddr,
    mode: Mode,
    reply_sockets: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: bool) -> io::Result<()> {
    let v: libc::c_int = value.into();
    // SAFETY: `fd` is an open socket for the duration of the call; the pointer and length
    // describe the local `c_int`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn transparent_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

impl DnsUdpSocket {
    /// Binds a transparent listener on `addr` (TPROXY target). Needs `CAP_NET_ADMIN`; must be
    /// called inside a tokio runtime.
    pub fn transparent(addr: SocketAddr) -> io::Result<Self> {
        let socket = transparent_socket(addr)?;
        let fd = socket.as_raw_fd();
        if addr.is_ipv6() {
            set_int_opt(fd, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, true)?;
            // Dual-stack: IPv4 datagrams report their destination through the IPv4 option.
            let _ = set_int_opt(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, true);
        } else {
            set_int_opt(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, true)?;
        }
        socket.bind(&addr.into())?;
        let socket = UdpSocket::from_std(socket.into())?;
        let local = socket.local_addr()?;
        Ok(DnsUdpSocket {
            socket,
            local,
            mode: Mode::Transparent,
            reply_sockets: Mutex::new(HashMap::new()),
        })
    }

    /// Serves on `socket`, sending every query to `upstream` and answering from the socket.
    pub fn fixed(socket: UdpSocket, upstream: SocketAddr) -> io::Result<Self> {
        let local = socket.local_addr()?;
        Ok(DnsUdpSocket {
            socket,
            local,
            mode: Mode::Fixed(upstream),
            reply_sockets: Mutex::new(HashMap::new()),
        })
    }

    /// Binds `addr` and serves it in fixed mode (see [`fixed`](Self::fixed)).
    pub async fn bind_fixed(addr: SocketAddr, upstream: SocketAddr) -> io::Result<Self> {
        DnsUdpSocket::fixed(UdpSocket::bind(addr).await?, upstream)
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Receives one datagram: (length, client, original destination).
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
        match self.mode {
            Mode::Fixed(upstream) => {
                let (n, from) = self.socket.recv_from(buf).await?;
                Ok((n, from, upstream))
            }
            Mode::Transparent => {
                let fd = self.socket.as_raw_fd();
                let (n, from, orig) = self
                    .socket
                    .async_io(Interest::READABLE, || recv_with_origdst(fd, buf))
                    .await?;
                // Without a control message (not steered, option lost) the datagram was
                // addressed to the listener itself.
                Ok((n, from, orig.unwrap_or(self.local)))
            }
        }
    }

    /// Sends an answer to `client`, from `original` (the server it asked) in transparent
    /// mode, from the listener otherwise.
    pub(crate) async fn reply(
        &self,
        data: &[u8],
        client: SocketAddr,
        original: SocketAddr,
    ) -> io::Result<()> {
        if matches!(self.mode, Mode::Fixed(_)) || original == self.local {
            self.socket.send_to(data, client).await?;
            return Ok(());
        }
        let sock = self.reply_socket(original)?;
        sock.send_to(data, client).await?;
        Ok(())
    }

    fn reply_socket(&self, from: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        let mut map = self.reply_sockets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(&from) {
            return Ok(s.clone());
        }
        let socket = transparent_socket(from)?;
        socket.bind(&from.into())?;
        // It only sends; never let it take datagrams meant for the listener.
        let _ = socket.shutdown(std::net::Shutdown::Read);
        let s = Arc::new(UdpSocket::from_std(socket.into())?);
        if map.len() >= MAX_REPLY_SOCKETS {
            map.clear();
        }
        map.insert(from, s.clone());
        Ok(s)
    }
}

fn v4(sa: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

fn v6(sa: &libc::sockaddr_in6) -> SocketAddr {
    let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
    let port = u16::from_be(sa.sin6_port);
    // A v4-mapped peer on a dual-stack socket is reported as plain IPv4.
    match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::from((v4, port)),
        None => SocketAddr::V6(SocketAddrV6::new(
            ip,
            port,
            sa.sin6_flowinfo,
            sa.sin6_scope_id,
        )),
    }
}

/// `recvmsg` with room for the original-destination control message.
fn recv_with_origdst(
    fd: RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    // SAFETY (whole function): every structure passed to the kernel is a plain C struct that
    // is valid all-zero, lives on this stack frame for the duration of the call, and is
    // described by the lengths we pass; `buf` outlives the call. Control messages are read
    // with the libc CMSG macros inside the `msg_controllen` the kernel reported, and their
    // payloads with unaligned reads after checking their length.
    let mut src: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64s keep the buffer aligned for `cmsghdr`.
    let mut control = [0u64; 32];
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&mut src as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    let from = match libc::c_int::from(src.ss_family) {
        libc::AF_INET => v4(unsafe { &*(&src as *const libc::sockaddr_storage).cast() }),
        libc::AF_INET6 => v6(unsafe { &*(&src as *const libc::sockaddr_storage).cast() }),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram from a non-IP address",
            ));
        }
    };
    let mut orig = None;
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        let hdr = unsafe { &*cmsg };
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
        let payload = (hdr.cmsg_len as usize).saturating_sub(header_len);
        if hdr.cmsg_level == libc::SOL_IP
            && hdr.cmsg_type == libc::IP_ORIGDSTADDR
            && payload >= mem::size_of::<libc::sockaddr_in>()
        {
            let sa: libc::sockaddr_in =
                unsafe { data.cast::<libc::sockaddr_in>().read_unaligned() };
            orig = Some(v4(&sa));
        } else if hdr.cmsg_level == libc::SOL_IPV6
            && hdr.cmsg_type == libc::IPV6_ORIGDSTADDR
            && payload >= mem::size_of::<libc::sockaddr_in6>()
        {
            let sa: libc::sockaddr_in6 =
                unsafe { data.cast::<libc::sockaddr_in6>().read_unaligned() };
            orig = Some(v6(&sa));
        }
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((n, from, orig))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `CAP_NET_ADMIN`, a transparent socket on loopback reports each datagram's
    /// destination (here its own address, as nothing is steered) and answers from it.
    #[tokio::test]
    async fn transparent_socket_reports_original_destination() {
        let sock = match DnsUdpSocket::transparent(SocketAddr::from(([127, 0, 0, 1], 0))) {
            Ok(s) => s,
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                eprintln!("skipping: no CAP_NET_ADMIN for IP_TRANSPARENT");
                return;
            }
        };
        let client = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let caddr = client.local_addr().unwrap_or_else(|e| panic!("{e}"));
        client
            .send_to(b"hello", sock.local_addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 64];
        let (n, from, orig) = sock.recv(&mut buf).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from, caddr);
        assert_eq!(orig, sock.local_addr());
        sock.reply(b"back", from, orig)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (n, from) = client
            .recv_from(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf[..n], b"back");
        assert_eq!(from, sock.local_addr());
    }

    /// A reply from a non-local "server" address goes through a transparent socket bound to
    /// it (loopback's 127/8 is local, so another 127.x address stands in for it).
    #[tokio::test]
    async fn transparent_reply_from_other_address() {
        let sock = match DnsUdpSocket::transparent(SocketAddr::from(([127, 0, 0, 1], 0))) {
            Ok(s) => s,
            Err(_) => return,
        };
        let client = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let caddr = client.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = SocketAddr::from(([127, 0, 0, 53], 5353));
        sock.reply(b"x", caddr, server)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 8];
        let (_, from) = client
            .recv_from(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from, server);
    }
}
