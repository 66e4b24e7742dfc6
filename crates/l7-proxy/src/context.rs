//! Who a connection is from and where it was going: resolved once per accepted connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::SockRef;
use tokio::net::TcpStream;
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
            original_destination,
            source,
        })
    }
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
