//! Restart: the loader process dies (SIGKILL) while a TCP connection flows; enforcement keeps
//! running from the pinned programs and maps, and a new process takes the maps over.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use weir_datapath::Datapath;

use crate::Backend;
use crate::lab::{self, Lab};
use crate::support::*;
use crate::two_pods::*;

const CHILD_ENV: &str = "WEIR_RESTART_CHILD";

/// The first loader, run as a child process of [`restart_keeps_enforcing`]; does nothing when
/// run directly (the parent names it in the environment).
pub fn restart_child<B: Backend>() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let Some((pins, node)) = spec.split_once('|') else {
        panic!("bad {CHILD_ENV}");
    };
    let mut dp = B::load(std::path::Path::new(pins)).expect("child load");
    setup_maps(&mut dp);
    lab::in_netns(node, || {
        dp.attach_endpoint(&ep_a()).unwrap();
        dp.attach_endpoint(&ep_b()).unwrap();
    });
    println!("WEIR-READY");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// Kills the loader under traffic; enforcement continues and a new process takes over.
/// `child_test` is the name of the test function that calls [`restart_child`].
pub fn restart_keeps_enforcing<B: Backend>(child_test: &str) {
    if skip("restart_keeps_enforcing") {
        return;
    }
    let fs = Bpffs::new();
    let mut lab = Lab::new();
    lab.start_servers();
    let pins = fs.pins();
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}|{}", pins.display(), lab.node))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn loader");
    let out = child.stdout.take().expect("stdout");
    let ready = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("WEIR-READY"));
    assert!(ready, "child loader did not come up");

    assert!(lab.probe(&lab.a, "tcp", lab::B4, 8080));
    assert!(!lab.probe(&lab.a, "tcp", lab::B4, 9090));
    let mut conn = lab.persistent(&lab.a, lab::B4, 8080).expect("connect");
    assert!(conn.roundtrip());

    // Kill the loader: filters and pinned maps stay.
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(conn.roundtrip(), "connection survives the loader's death");
    assert!(
        !lab.probe(&lab.a, "tcp", lab::B4, 9090),
        "still enforcing without a loader"
    );

    // A new process reopens the pins and takes over.
    let mut dp = B::load(&pins).expect("reload");
    lab.in_node(|| {
        dp.attach_endpoint(&ep_a()).unwrap();
        dp.attach_endpoint(&ep_b()).unwrap();
    });
    assert!(conn.roundtrip(), "connection survives the takeover");
    assert_eq!(
        dp.dump_policy(weir_datapath::EndpointId(2)).unwrap().len(),
        3
    );
    install(&mut dp, 2, &policy_b(true, true));
    assert!(
        lab.probe(&lab.a, "tcp", lab::B4, 9090),
        "the new process controls the live maps"
    );
    assert!(conn.roundtrip());
    lab.in_node(|| {
        dp.detach_endpoint(&ep_a()).unwrap();
        dp.detach_endpoint(&ep_b()).unwrap();
    });
}
