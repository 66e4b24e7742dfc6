//! `weir policy test --datapath aya` on the seed scenarios: every flow passes through the
//! kernel (as root), or the command says clearly that it needs root.

use std::process::Command;

#[test]
fn seed_scenarios_pass_through_the_kernel() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["policy", "test", "--datapath", "aya", "examples/seed"])
        .current_dir(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(stderr.contains("needs root"), "{stderr}");
        assert_eq!(out.status.code(), Some(2));
        return;
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("through the aya datapath"));
    assert!(stdout.contains("kernel egress"));
    assert!(stdout.contains("L7 checked offline"));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
}
