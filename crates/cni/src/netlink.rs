//! Kernel networking through rtnetlink: the veth pair, addresses, routes and
//! the neighbour entry of the L3 design.
//!
//! Design: the pod gets `IP/32` on its interface, a link route to
//! [`POD_GATEWAY`] (169.254.1.1), a default route via it, and a permanent
//! neighbour entry mapping it to the host-side veth's MAC, so no ARP is needed
//! for the next hop and no address lives on the host veth. The node gets a
//! `/32` link route to the pod through the host-side veth.
//!
//! Work inside the container namespace runs on a dedicated thread that
//! `setns`es into it and opens its own netlink socket there; the calling
//! thread's namespace never changes.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::spec::POD_GATEWAY;

/// Networking failures.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A netlink request failed.
    #[error("{op}: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The state found differs from what ADD sets up (CHECK).
    #[error("{0}")]
    Mismatch(String),
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |source| NetError::Netlink { op, source }
}

fn sys(op: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let op = op.into();
    move |source| NetError::Io { op, source }
}

/// A network interface as seen in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface name.
    pub name: String,
    /// Interface index in its namespace.
    pub index: u32,
    /// MAC address (zeros when the link has none).
    pub mac: [u8; 6],
    /// Administratively up.
    pub up: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Self {
            name: String::new(),
            index: msg.header.index,
            mac: [0; 6],
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(a) => {
                    if let Ok(mac) = <[u8; 6]>::try_from(a.as_slice()) {
                        link.mac = mac;
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// A netlink handle in the current thread's namespace; its connection task is
/// spawned on the current tokio runtime.
pub fn connect() -> Result<Handle, NetError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(sys("open netlink socket"))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Runs `work` with a netlink handle inside the network namespace at `netns`,
/// on a fresh thread with its own single-threaded runtime.
pub fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
{
    let file = File::open(netns).map_err(sys(format!("open netns {}", netns.display())))?;
    let thread = std::thread::Builder::new()
        .name("weir-cni-netns".into())
        .spawn(move || -> Result<T, NetError> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetError::Io {
                    op: "setns into container netns".into(),
                    source: io::Error::from(e),
                }
            })?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(sys("build netns runtime"))?;
            runtime.block_on(async move { work(connect()?).await })
        })
        .map_err(sys("spawn netns thread"))?;
    thread.join().map_err(|_| NetError::Io {
        op: "netns thread".into(),
        source: io::Error::other("panicked"),
    })?
}

/// The link called `name`, or `None` when there is none.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, NetError> {
    let result = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    match result {
        Ok(msg) => Ok(msg.as_ref().map(Link::from_message)),
        Err(e) if is_errno(&e, nix::libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// Creates the veth pair: `host_name` here, `container_ifname` directly inside
/// `netns`. Returns the host side, left down.
pub async fn create_veth(
    handle: &Handle,
    host_name: &str,
    container_ifname: &str,
    netns: &File,
    mtu: Option<u32>,
) -> Result<Link, NetError> {
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(container_ifname.to_string())
        .setns_by_fd(netns.as_raw_fd());
    let mut veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_string());
    if let Some(mtu) = mtu {
        peer = peer.mtu(mtu);
        veth = veth.mtu(mtu);
    }
    let msg = veth
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();
    handle.link().add(msg).execute().await.map_err(nl(format!(
        "create veth {host_name} <-> {container_ifname}"
    )))?;
    link_by_name(handle, host_name)
        .await?
        .ok_or_else(|| NetError::Mismatch(format!("veth {host_name} vanished after creation")))
}

/// Deletes the link `name` (for a veth, both ends). `false` when it did not exist.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, NetError> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        // Raced with another DEL.
        Err(e) if is_errno(&e, nix::libc::ENODEV) => Ok(false),
        Err(e) => Err(nl(format!("delete link {name}"))(e)),
    }
}

/// Sets link `index` administratively up.
pub async fn set_up(handle: &Handle, index: u32) -> Result<(), NetError> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set link {index} up")))
}

/// Node side: host veth up and a `/32` link route to the pod through it.
pub async fn configure_host(
    handle: &Handle,
    host: &Link,
    pod_ip: Ipv4Addr,
) -> Result<(), NetError> {
    set_up(handle, host.index).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(pod_ip, 32)
        .output_interface(host.index)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route {pod_ip}/32 dev {}", host.name)))
}

/// Pod side (run inside the pod's namespace): `lo` and the interface up,
/// `IP/32`, the permanent neighbour for the gateway, and the routes.
pub async fn configure_container(
    handle: &Handle,
    ifname: &str,
    pod_ip: Ipv4Addr,
    host_mac: [u8; 6],
) -> Result<Link, NetError> {
    if let Some(lo) = link_by_name(handle, "lo").await? {
        set_up(handle, lo.index).await?;
    }
    let link = link_by_name(handle, ifname)
        .await?
        .ok_or_else(|| NetError::Mismatch(format!("{ifname} is missing in the container")))?;
    set_up(handle, link.index).await?;
    handle
        .address()
        .add(link.index, IpAddr::V4(pod_ip), 32)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("address {pod_ip}/32 on {ifname}")))?;
    handle
        .neighbours()
        .add(link.index, IpAddr::V4(POD_GATEWAY))
        .link_layer_address(&host_mac)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("neighbour {POD_GATEWAY} on {ifname}")))?;
    let gateway_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(POD_GATEWAY, 32)
        .output_interface(link.index)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(gateway_route)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route {POD_GATEWAY}/32 dev {ifname}")))?;
    let default_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(POD_GATEWAY)
        .output_interface(link.index)
        .build();
    handle
        .route()
        .add(default_route)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("default route via {POD_GATEWAY} dev {ifname}")))?;
    Ok(link)
}

async fn ipv4_routes(handle: &Handle) -> Result<Vec<RouteMessage>, NetError> {
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("dump routes"))
}

fn route_has(route: &RouteMessage, want: &RouteAttribute) -> bool {
    route.attributes.iter().any(|a| a == want)
}

/// CHECK, node side: the host veth is up with the pod's `/32` route on it.
pub async fn check_host(
    handle: &Handle,
    host_name: &str,
    pod_ip: Ipv4Addr,
) -> Result<Link, NetError> {
    let host = link_by_name(handle, host_name)
        .await?
        .ok_or_else(|| NetError::Mismatch(format!("host veth {host_name} is missing")))?;
    if !host.up {
        return Err(NetError::Mismatch(format!("host veth {host_name} is down")));
    }
    let found = ipv4_routes(handle).await?.iter().any(|r| {
        r.header.destination_prefix_length == 32
            && route_has(r, &RouteAttribute::Destination(RouteAddress::Inet(pod_ip)))
            && route_has(r, &RouteAttribute::Oif(host.index))
    });
    if !found {
        return Err(NetError::Mismatch(format!(
            "no route {pod_ip}/32 dev {host_name}"
        )));
    }
    Ok(host)
}

/// CHECK, pod side (inside the namespace): the interface is up with `IP/32`
/// and the default route via the gateway.
pub async fn check_container(
    handle: &Handle,
    ifname: &str,
    pod_ip: Ipv4Addr,
) -> Result<Link, NetError> {
    let link = link_by_name(handle, ifname)
        .await?
        .ok_or_else(|| NetError::Mismatch(format!("{ifname} is missing in the container")))?;
    if !link.up {
        return Err(NetError::Mismatch(format!("{ifname} is down")));
    }
    let addresses: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("list addresses of {ifname}")))?;
    let has_ip = addresses.iter().any(|a| {
        a.header.prefix_len == 32
            && a.attributes
                .contains(&AddressAttribute::Address(IpAddr::V4(pod_ip)))
    });
    if !has_ip {
        return Err(NetError::Mismatch(format!("{ifname} lacks {pod_ip}/32")));
    }
    let has_default = ipv4_routes(handle).await?.iter().any(|r| {
        r.header.destination_prefix_length == 0
            && route_has(r, &RouteAttribute::Gateway(RouteAddress::Inet(POD_GATEWAY)))
            && route_has(r, &RouteAttribute::Oif(link.index))
    });
    if !has_default {
        return Err(NetError::Mismatch(format!(
            "no default route via {POD_GATEWAY} dev {ifname}"
        )));
    }
    Ok(link)
}
