//! Who a connection is from and where it was going: resolved once per accepted connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use weir_identity::{Identity, ReservedIdentity};
use weir_policy_model::Direction;

use crate::policy::EndpointId;

/// Everything the proxy knows about one accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionContext {
    /// The local endpoint whose policy applies: the destination for ingress, the source for
    /// egress. `None` when the address is not a local endpoint: every request is denied.
    pub endpoint: Option<EndpointId>,
    /// Direction as seen from that endpoint.
    pub direction: Direction,
    /// The other side's identity (the source for ingress, the destination for egress).
    pub remote_identity: Identity,
    /// The identity of the local side (the destination for ingress, the source for egress).
    pub local_identity: Identity,
    /// Where the client meant to connect: allowed requests are forwarded there.
    pub original_destination: SocketAddr,
    /// The client's address.
    pub source: SocketAddr,
}

impl ConnectionContext {
    /// Resolves the context of an accepted connection.
    pub fn resolve(
        stream: &TcpStream,
        direction: Direction,
        destinations: &dyn OriginalDestination,
        identities: &dyn IdentityResolver,
    ) -> io::Result<Self> {
        let source = stream.peer_addr()?;
        let original_destination = destinations.original_destination(stream)?;
        let (local, remote) = match direction {
            Direction::Ingress => (original_destination.ip(), source.ip()),
            Direction::Egress => (source.ip(), original_destination.ip()),
        };
        Ok(ConnectionContext {
            endpoint: identities.local_endpoint(local),
            direction,
            remote_identity: identities.identity(remote),
            local_identity: identities.identity(local),
            original_destination,
            source,
        })
    }
}

/// The socket mark (`SO_MARK`) of the upstream connection opened for a client connection,
/// so the datapath can tell the proxy's own traffic apart: Weir's datapath passes the ingress
/// proxy's connections without a second policy lookup, and judges the egress proxy's by the
/// client's identity carried in the mark. `None`: no mark.
pub trait UpstreamMark: Send + Sync {
    /// The mark for the upstream connection of `ctx`.
    fn mark(&self, ctx: &ConnectionContext) -> Option<u32>;
}

/// Finds where an intercepted connection was going.
pub trait OriginalDestination: Send + Sync {
    /// The original destination of an accepted connection.
    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// TPROXY-style interception: the listener has `IP_TRANSPARENT`, and the kernel delivers the
/// connection with its original destination as the accepted socket's local address.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransparentDestination;

impl OriginalDestination for TransparentDestination {
    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.local_addr()
    }
}

/// Binds a listener for TPROXY-style interception. `IP_TRANSPARENT` lets it accept
/// connections addressed to any IP that the datapath steers to it, keeping their original
/// destination as the local address (read it with [`TransparentDestination`]). Needs
/// `CAP_NET_ADMIN`; must be called inside a tokio runtime.
pub fn transparent_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// NAT-style interception (`REDIRECT`/DNAT to the proxy port): the original destination is
/// read from conntrack with `SO_ORIGINAL_DST` (or `IP6T_SO_ORIGINAL_DST`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NatDestination;

impl OriginalDestination for NatDestination {
    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let sock = SockRef::from(stream);
        let addr = if stream.local_addr()?.is_ipv6() {
            sock.original_dst_v6()?
        } else {
            sock.original_dst_v4()?
        };
        addr.as_socket().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP")
        })
    }
}

/// A fixed mapping from the proxy's local address to an upstream (for tests, and for a proxy
/// that fronts known services without interception). Falls back to `default`.
#[derive(Debug, Clone, Default)]
pub struct StaticDestination {
    /// Local (listener) address → destination.
    pub by_local: HashMap<SocketAddr, SocketAddr>,
    /// Destination for any other local address.
    pub default: Option<SocketAddr>,
}

impl StaticDestination {
    /// Every connection goes to `destination`.
    pub fn always(destination: SocketAddr) -> Self {
        StaticDestination {
            by_local: HashMap::new(),
            default: Some(destination),
        }
    }
}

impl OriginalDestination for StaticDestination {
    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let local = stream.local_addr()?;
        self.by_local
            .get(&local)
            .copied()
            .or(self.default)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no static destination"))
    }
}

/// IP → security identity and IP → local endpoint; the agent implements it with its ipcache
/// and endpoint table.
pub trait IdentityResolver: Send + Sync {
    /// The identity of an address. Unknown addresses are `world`, as in Cilium's ipcache.
    fn identity(&self, ip: IpAddr) -> Identity;
    /// The local endpoint with this address, if any.
    fn local_endpoint(&self, ip: IpAddr) -> Option<EndpointId>;
}

/// A fixed [`IdentityResolver`] (tests, embedding without an ipcache).
#[derive(Debug, Clone, Default)]
pub struct StaticIdentities {
    /// Address → identity; others are `world`.
    pub identities: HashMap<IpAddr, Identity>,
    /// Address → local endpoint.
    pub endpoints: HashMap<IpAddr, EndpointId>,
}

impl IdentityResolver for StaticIdentities {
    fn identity(&self, ip: IpAddr) -> Identity {
        self.identities
            .get(&ip)
            .copied()
            .unwrap_or(Identity::from(ReservedIdentity::World))
    }

    fn local_endpoint(&self, ip: IpAddr) -> Option<EndpointId> {
        self.endpoints.get(&ip).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn transparent_listener_needs_privilege_or_works() {
        match transparent_listener(SocketAddr::from(([127, 0, 0, 1], 0))) {
            Ok(l) => {
                let addr = l
                    .local_addr()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                let client = TcpStream::connect(addr).await;
                let (server, _) = l.accept().await.unwrap_or_else(|e| panic!("{e}"));
                assert!(client.is_ok());
                let dst = TransparentDestination.original_destination(&server);
                assert_eq!(dst.ok(), Some(addr));
                // Without a NAT entry there is no SO_ORIGINAL_DST answer, or it is the
                // address itself: either way no panic.
                let _ = NatDestination.original_destination(&server);
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        }
    }

    #[test]
    fn static_identities_default_to_world() {
        let ids = StaticIdentities::default();
        let ip = IpAddr::from([10, 0, 0, 1]);
        assert_eq!(ids.identity(ip), Identity::from(ReservedIdentity::World));
        assert_eq!(ids.local_endpoint(ip), None);
    }
}
