//! The scenario corpus through the kernel: every new connection of every scenario in
//! `tests/scenarios/` and `examples/seed/`, as a packet through `weir_from_pod` (the source
//! pod's egress) and `weir_to_pod` (the destination pod's ingress), with the ipcache and policy
//! maps the scenario has at that point; the verdict and drop reason must be `decide`'s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use weir_datapath::packet::{L4, PacketSpec};
use weir_datapath::{Datapath, DatapathError, EndpointId};
use weir_datapath_abi as abi;
use weir_identity::Identity;
use weir_policy_compiler::{MapState, MapStateDiff};
use weir_policy_model::Direction;
use weir_scenario::{kernel_probes, parse_scenario};

use crate::support::{Bpffs, skip};
use crate::{Backend, Hook, Outcome};

fn corpus() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for dir in ["tests/scenarios", "examples/seed"] {
        for e in std::fs::read_dir(root.join(dir)).expect("corpus dir") {
            let p = e.expect("dir entry").path();
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Named endpoints with replaceable policy maps and an ipcache, on one loaded datapath: each
/// run is the first packet of a new connection, judged by one endpoint on ifindex 1.
pub struct Replay<B: Backend> {
    /// The loaded datapath.
    pub dp: B::Dp,
    endpoints: BTreeMap<String, EndpointId>,
    ipcache: BTreeSet<(IpNet, Identity)>,
    next_port: u16,
}

impl<B: Backend> Replay<B> {
    /// Wraps a loaded datapath.
    pub fn new(dp: B::Dp) -> Self {
        Self {
            dp,
            endpoints: BTreeMap::new(),
            ipcache: BTreeSet::new(),
            next_port: 20000,
        }
    }

    fn endpoint(&mut self, name: &str) -> EndpointId {
        let next = EndpointId(self.endpoints.len() as u32 + 1);
        *self.endpoints.entry(name.to_string()).or_insert(next)
    }

    /// Makes the ipcache hold exactly `entries`.
    pub fn sync_ipcache(&mut self, entries: &[(IpNet, Identity)]) -> Result<(), DatapathError> {
        let want: BTreeSet<(IpNet, Identity)> =
            entries.iter().map(|(n, i)| (n.trunc(), *i)).collect();
        for (net, id) in want.difference(&self.ipcache) {
            self.dp.upsert_ipcache(*net, *id)?;
        }
        let nets: BTreeSet<IpNet> = want.iter().map(|(n, _)| *n).collect();
        for (net, _) in self.ipcache.difference(&want) {
            if !nets.contains(net) {
                self.dp.remove_ipcache(*net)?;
            }
        }
        self.ipcache = want;
        Ok(())
    }

    /// Makes endpoint `name`'s policy equal `map`.
    pub fn sync_policy(&mut self, name: &str, map: &MapState) -> Result<(), DatapathError> {
        let id = self.endpoint(name);
        let old = self.dp.dump_policy(id)?;
        let diff = MapStateDiff {
            upserts: map.entries.iter().map(|(k, e)| (*k, e.clone())).collect(),
            removals: old
                .keys()
                .filter(|k| !map.entries.contains_key(k))
                .copied()
                .collect(),
        };
        self.dp.apply_policy_diff(id, &diff)
    }

    /// Runs the first packet of a new connection judged by endpoint `name`.
    pub fn run(
        &mut self,
        name: &str,
        identity: Identity,
        direction: Direction,
        (src, dst, protocol, port): (IpAddr, IpAddr, u8, u16),
    ) -> Result<Outcome, DatapathError> {
        let id = self.endpoint(name);
        B::register_ifindex(
            &mut self.dp,
            1,
            abi::EndpointInfo {
                endpoint_id: id.0,
                identity: identity.get(),
                flags: 0,
            },
        )?;
        let sport = self.next_port;
        self.next_port = if sport == u16::MAX { 20000 } else { sport + 1 };
        let l4 = match protocol {
            6 => L4::Tcp {
                sport,
                dport: port,
                flags: 0x02,
            },
            17 => L4::Udp { sport, dport: port },
            132 => L4::Sctp { sport, dport: port },
            1 | 58 => L4::Icmp {
                ty: port as u8,
                code: 0,
                id: sport,
            },
            p => L4::Raw {
                protocol: p,
                payload: vec![0; 8],
            },
        };
        let hook = match direction {
            Direction::Egress => Hook::FromPod,
            Direction::Ingress => Hook::ToPod,
        };
        B::test_run(&self.dp, hook, &PacketSpec::new(src, dst, l4).build(), 1)
    }
}

/// Every kernel verdict of the corpus equals `decide`'s.
pub fn corpus_verdicts_equal_decide<B: Backend>() {
    if skip("corpus_verdicts_equal_decide") {
        return;
    }
    let files = corpus();
    assert!(files.len() > 80, "corpus has {} files", files.len());
    let mut checked = 0usize;
    let mut failures = Vec::new();
    for path in files {
        // A fresh load per scenario: no map or conntrack state leaks between files.
        let fs = Bpffs::new();
        let dp = B::load(&fs.pins()).unwrap_or_else(|e| panic!("load {}: {e}", B::NAME));
        let mut r = Replay::<B>::new(dp);
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).expect("read");
        let s = parse_scenario(&name, &text).expect("parse");
        for probe in kernel_probes(&s).expect("probes") {
            r.sync_ipcache(&probe.ipcache).expect("ipcache");
            for side in &probe.sides {
                r.sync_policy(&side.endpoint, &side.map_state)
                    .expect("policy");
                let got = r
                    .run(
                        &side.endpoint,
                        side.identity,
                        side.direction,
                        (probe.src, probe.dst, probe.protocol, probe.port),
                    )
                    .expect("test run");
                let want = weir_datapath::test_run_verdict(
                    side.expected.into(),
                    side.direction,
                    probe.protocol,
                    probe.port,
                );
                checked += 1;
                if got.verdict != want || got.remote_identity != side.remote {
                    failures.push(format!(
                        "{name}:{} {} [{:?} of {}]: kernel {:?} (remote {}), decide {:?} (remote {})",
                        probe.line,
                        probe.flow,
                        side.direction,
                        side.endpoint,
                        got.verdict,
                        got.remote_identity.get(),
                        want,
                        side.remote.get()
                    ));
                }
            }
        }
    }
    eprintln!("{}: {checked} kernel verdicts checked", B::NAME);
    assert!(
        failures.is_empty(),
        "{}: {} disagreements:\n{}",
        B::NAME,
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 300, "only {checked} verdicts checked");
}
