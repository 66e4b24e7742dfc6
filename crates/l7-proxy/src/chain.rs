//! Egress and ingress L7 rules on one connection: the proxy's own upstream connections that
//! come back to it.
//!
//! When a client's egress rule and the server's ingress rule both have HTTP rules, the
//! upstream connection the egress side opens is redirected by the datapath to the ingress
//! listener of the same proxy. It arrives from the node's own address, so the address says
//! nothing about the client. The egress side registers each upstream connection's exact local
//! address with the client's identity before connecting, and the ingress side judges a
//! connection from a registered address by that identity. A registration ends with its
//! connection; nothing outside this process can make one, and a pod cannot connect from the
//! node's address and port without the node's socket.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use weir_identity::Identity;

/// Upstream connections opened for egress clients, by local address.
#[derive(Debug, Default)]
pub(crate) struct OwnUpstreams {
    by_local: Mutex<HashMap<SocketAddr, Identity>>,
}

/// Keeps a registration for as long as its connection lives.
#[derive(Debug)]
pub(crate) struct Registration {
    owner: Arc<OwnUpstreams>,
    local: SocketAddr,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.owner
            .by_local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.local);
    }
}

impl OwnUpstreams {
    /// The client identity of a connection this proxy opened from `peer`, if it did.
    pub(crate) fn client_of(&self, peer: SocketAddr) -> Option<Identity> {
        self.by_local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&canonical(peer))
            .copied()
    }

    fn register(self: &Arc<Self>, local: SocketAddr, client: Identity) -> Registration {
        let local = canonical(local);
        self.by_local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(local, client);
        Registration {
            owner: self.clone(),
            local,
        }
    }

    /// Connects to `addr` for `client` (with `SO_MARK` when given), registered under the
    /// socket's exact local address before the first packet leaves.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
        mark: Option<u32>,
        client: Identity,
    ) -> io::Result<(TcpStream, Registration)> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        // The address the kernel would pick for this destination, asked of a UDP socket
        // (connect on UDP only routes), so the TCP socket's local address is known exactly.
        let source = route_source(addr, mark)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        let local = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
        let registration = self.register(local, client);
        socket.set_nonblocking(true)?;
        let stream = TcpSocket::from_std_stream(socket.into())
            .connect(addr)
            .await?;
        Ok((stream, registration))
    }
}

fn route_source(addr: SocketAddr, mark: Option<u32>) -> io::Result<IpAddr> {
    let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(mark) = mark {
        probe.set_mark(mark)?;
    }
    probe.connect(&addr.into())?;
    probe
        .local_addr()?
        .as_socket()
        .map(|a| a.ip())
        .ok_or_else(|| io::Error::other("routed socket has no IP address"))
}

/// IPv4-mapped IPv6 addresses (from a dual-stack listener) are kept as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registered_while_connected_and_gone_after() {
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            return;
        };
        let to = listener
            .local_addr()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1)));
        let own = Arc::new(OwnUpstreams::default());
        let (stream, reg) = own
            .connect(to, None, Identity(4242))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let (_accepted, peer) = listener
            .accept()
            .await
            .unwrap_or_else(|e| panic!("accept: {e}"));
        // What the accepting side sees is exactly what was registered.
        assert_eq!(own.client_of(peer), Some(Identity(4242)));
        let mapped = SocketAddr::new(
            match peer.ip() {
                IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                ip => ip,
            },
            peer.port(),
        );
        assert_eq!(own.client_of(mapped), Some(Identity(4242)));
        // Another port of the same address is not this connection.
        let other = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
        assert_eq!(own.client_of(other), None);
        drop(stream);
        drop(reg);
        assert_eq!(own.client_of(peer), None);
    }
}
