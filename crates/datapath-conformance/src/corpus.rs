//! The scenario corpus through the kernel: every new connection of every scenario in
//! `tests/scenarios/` and `examples/seed/`, as a packet through `weir_from_pod` (the source
//! pod's egress) and `weir_to_pod` (the destination pod's ingress), with the ipcache and policy
//! maps the scenario has at that point; the verdict and drop reason must be `decide`'s.

use std::path::{Path, PathBuf};

use weir_datapath::replay::{ReplayPacket, Replayer};
use weir_scenario::{kernel_probes, parse_scenario};

use crate::Backend;
use crate::support::{Bpffs, skip};

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
        let mut r = Replayer::with_datapath(dp);
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
                        &ReplayPacket {
                            src: probe.src,
                            dst: probe.dst,
                            protocol: probe.protocol,
                            port: probe.port,
                        },
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
