//! Attaches Weir to one veth for `bench/datapath-veth.sh`, with either backend's programs and a
//! policy of N entries, and exits (the tc filters keep the programs running). Run inside the
//! target network namespace:
//! `nsenter --net=/var/run/netns/NS bench_attach aya|libbpf PIN_DIR IFNAME PEER_IP N`.
//!
//! The pod behind IFNAME (identity 1000) may reach PEER_IP (identity 300) on every port; the
//! other N-1 entries allow other identities and never match. One body for both backends, so
//! the two are measured with the same maps.

use std::net::IpAddr;
use std::path::Path;

use weir_datapath::{Datapath, EndpointAttachment, EndpointId};
use weir_datapath_aya::AyaDatapath;
use weir_datapath_libbpf::LibbpfDatapath;
use weir_identity::Identity;
use weir_policy_compiler::{EntryAction, MapStateDiff, PolicyEntry, PolicyKey};
use weir_policy_model::Direction;

type Error = Box<dyn std::error::Error>;

fn attach(dp: &mut dyn Datapath, ifname: &str, peer: IpAddr, n: u32) -> Result<(), Error> {
    dp.upsert_ipcache(peer.into(), Identity(300))?;
    let entry = PolicyEntry {
        action: EntryAction::Allow,
        derived_from: Default::default(),
    };
    let key = |identity, port, prefix_len| PolicyKey {
        identity: Identity(identity),
        direction: Direction::Egress,
        protocol: if prefix_len == 0 { 0 } else { 6 },
        port,
        prefix_len,
    };
    let mut upserts = vec![(key(300, 0, 0), entry.clone())];
    upserts.extend((1..n).map(|i| {
        (
            key(10_000 + i % 60_000, 1_000 + (i % 50_000) as u16, 24),
            entry.clone(),
        )
    }));
    dp.apply_policy_diff(
        EndpointId(1),
        &MapStateDiff {
            upserts,
            removals: vec![],
        },
    )?;
    dp.attach_endpoint(&EndpointAttachment {
        ifname: ifname.to_owned(),
        endpoint_id: EndpointId(1),
        identity: Identity(1000),
        addresses: Vec::new(),
    })?;
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, backend, pin_dir, ifname, peer, n] = args.as_slice() else {
        return Err("usage: bench_attach aya|libbpf PIN_DIR IFNAME PEER_IP N".into());
    };
    let peer: IpAddr = peer.parse()?;
    let n: u32 = n.parse()?;
    let pins = Path::new(pin_dir);
    let mut dp: Box<dyn Datapath> = match backend.as_str() {
        "aya" => Box::new(AyaDatapath::load(pins)?),
        "libbpf" => Box::new(LibbpfDatapath::load(pins)?),
        other => return Err(format!("unknown backend {other:?} (aya or libbpf)").into()),
    };
    attach(dp.as_mut(), ifname, peer, n)?;
    println!("{backend}: attached to {ifname} with {n} policy entries");
    Ok(())
}
