//! A throwaway topology: a node namespace and two pod namespaces joined by veth pairs, all
//! named `weirt-<pid>-<n>-*`. Nothing touches the root namespace; Drop deletes everything and
//! kills the helper processes.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static LAB_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A node namespace and two pod namespaces (a, b) joined by veth pairs `lxca`, `lxcb`.
pub struct Lab {
    /// The node namespace (holds the host-side veths `lxca`, `lxcb`).
    pub node: String,
    /// Pod A's namespace.
    pub a: String,
    /// Pod B's namespace.
    pub b: String,
    children: Vec<Child>,
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pod A's IPv4 address.
pub const A4: &str = "10.201.1.2";
/// Pod B's IPv4 address.
pub const B4: &str = "10.201.2.2";
/// Pod A's IPv6 address.
pub const A6: &str = "fd00:201:1::2";
/// Pod B's IPv6 address.
pub const B6: &str = "fd00:201:2::2";

const SERVER: &str = r#"
import socket, sys, threading
def tcp(port, fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(64)
    while True:
        c, _ = s.accept()
        def h(c):
            while True:
                d = c.recv(4096)
                if not d: break
                c.sendall(d)
            c.close()
        threading.Thread(target=h, args=(c,), daemon=True).start()
def udp(port, fam, addr):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((addr, port))
    while True:
        d, a = s.recvfrom(4096); s.sendto(d, a)
for p in (8080, 9090):
    threading.Thread(target=tcp, args=(p, socket.AF_INET, "0.0.0.0"), daemon=True).start()
    threading.Thread(target=tcp, args=(p, socket.AF_INET6, "::"), daemon=True).start()
threading.Thread(target=udp, args=(5353, socket.AF_INET, "0.0.0.0"), daemon=True).start()
print("up", flush=True)
threading.Event().wait()
"#;

const CLIENT: &str = r#"
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = (sys.argv[4], 0) if len(sys.argv) > 4 else None
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=1.5, source_address=src)
        s.sendall(b"hello"); ok = s.recv(16) == b"hello"
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(1.5)
        if src: s.bind(src)
        s.sendto(b"hello", (host, port)); ok = s.recv(16) == b"hello"
    sys.exit(0 if ok else 1)
except Exception as e:
    sys.exit(2)
"#;

const PING: &str = r#"
import socket, sys, struct, os, time
host = sys.argv[1]
v6 = ":" in host
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6); req, rep = 128, 129
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); req, rep = 8, 0
ident = os.getpid() & 0xffff
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
body = struct.pack("!BBHHH", req, 0, 0, ident, 1) + b"weir"
if not v6:
    body = struct.pack("!BBHHH", req, 0, csum(body), ident, 1) + b"weir"
s.sendto(body, (host, 0))
s.settimeout(1.0)
end = time.time() + 1.0
while time.time() < end:
    try:
        d = s.recv(2048)
    except Exception:
        break
    icmp = d if v6 else d[(d[0] & 15) * 4:]
    t, _, _, i, _ = struct.unpack("!BBHHH", icmp[:8])
    if t == rep and i == ident:
        sys.exit(0)
sys.exit(1)
"#;

/// A transparent "proxy" listener in the node namespace: answers every connection with
/// `proxy <original destination>`.
const PROXY: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
print("up", flush=True)
while True:
    c, _ = s.accept()
    a = c.getsockname()
    c.recv(64); c.sendall(("proxy %s:%d" % a).encode()); c.close()
"#;

/// A client that prints what the server sends back.
const ASK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_STREAM)
if len(sys.argv) > 3:
    s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[3]))  # SO_MARK
s.settimeout(1.5); s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"hello"); print(s.recv(64).decode(), flush=True)
"#;

/// A long-lived client: one connection; each stdin line is echoed through it.
const PERSISTENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode()); d = s.recv(4096)
        print("ok" if d == line.encode() else "bad", flush=True)
    except Exception:
        print("fail", flush=True)
"#;

/// A long-lived TCP connection from a pod (a helper process).
pub struct Persistent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Persistent {
    /// Sends one message through the connection; true if it came back.
    pub fn roundtrip(&mut self) -> bool {
        if writeln!(self.stdin, "ping").is_err() {
            return false;
        }
        let mut l = String::new();
        self.stdout.read_line(&mut l).is_ok() && l.trim() == "ok"
    }
}

impl Drop for Persistent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// Creates the namespaces, veths, addresses and routes.
    pub fn new() -> Lab {
        let n = LAB_SEQ.fetch_add(1, Ordering::SeqCst);
        let p = format!("weirt-{}-{n}", std::process::id());
        let lab = Lab {
            node: format!("{p}-node"),
            a: format!("{p}-a"),
            b: format!("{p}-b"),
            children: Vec::new(),
        };
        for ns in [&lab.node, &lab.a, &lab.b] {
            run(&["ip", "netns", "add", ns]);
        }
        let node = lab.node.as_str();
        for (ns, host, net4, net6) in [
            (&lab.a, "lxca", "10.201.1", "fd00:201:1"),
            (&lab.b, "lxcb", "10.201.2", "fd00:201:2"),
        ] {
            run(&[
                "ip", "-n", node, "link", "add", host, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            run(&[
                "ip",
                "-n",
                node,
                "addr",
                "add",
                &format!("{net4}.1/24"),
                "dev",
                host,
            ]);
            run(&[
                "ip",
                "-n",
                node,
                "addr",
                "add",
                &format!("{net6}::1/64"),
                "dev",
                host,
                "nodad",
            ]);
            run(&["ip", "-n", node, "link", "set", host, "up"]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{net4}.2/24"),
                "dev",
                "eth0",
            ]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{net6}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&[
                "ip",
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &format!("{net4}.1"),
            ]);
            run(&[
                "ip",
                "-n",
                ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("{net6}::1"),
            ]);
        }
        run(&[
            "ip",
            "netns",
            "exec",
            node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            node,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        lab
    }

    /// Starts the echo servers in pod b (TCP 8080/9090 v4+v6, UDP 5353).
    pub fn start_servers(&mut self) {
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.b, "python3", "-c", SERVER])
            .stdout(Stdio::piped())
            .spawn()
            .expect("server");
        let mut line = String::new();
        if let Some(out) = c.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        assert_eq!(line.trim(), "up");
        self.children.push(c);
    }

    /// Starts the transparent proxy listener in the node namespace, with the policy routing
    /// that delivers packets marked for the proxy (0x200/0xf00) locally.
    pub fn start_proxy(&mut self, port: u16) {
        let node = self.node.clone();
        // Early demux would hand packets of a connection the proxy accepted (after an ingress
        // hairpin) to the proxy's socket while they are still being forwarded to the pod's
        // interface, and the kernel drops forwarded packets that carry a socket.
        run(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_early_demux=0",
            "net.ipv4.udp_early_demux=0",
        ]);
        run(&[
            "ip",
            "-n",
            &node,
            "rule",
            "add",
            "fwmark",
            "0x200/0xf00",
            "lookup",
            "2004",
        ]);
        run(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "2004",
        ]);
        let mut c = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node,
                "python3",
                "-c",
                PROXY,
                &port.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("proxy");
        let mut line = String::new();
        if let Some(out) = c.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        assert_eq!(line.trim(), "up");
        self.children.push(c);
    }

    /// Connects from `ns`, sends a line and returns what came back.
    pub fn ask(&self, ns: &str, host: &str, port: u16) -> Option<String> {
        self.ask_marked(ns, host, port, None)
    }

    /// As [`Lab::ask`], with the client socket's `SO_MARK` set to `mark` when given.
    pub fn ask_marked(&self, ns: &str, host: &str, port: u16, mark: Option<u32>) -> Option<String> {
        let mut args = vec![
            "netns".to_string(),
            "exec".to_string(),
            ns.to_string(),
            "python3".to_string(),
            "-c".to_string(),
            ASK.to_string(),
            host.to_string(),
            port.to_string(),
        ];
        args.extend(mark.map(|m| m.to_string()));
        let out = Command::new("ip")
            .args(&args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs a one-shot client in `ns`; true if the echo came back.
    pub fn probe(&self, ns: &str, proto: &str, host: &str, port: u16) -> bool {
        self.probe_from(ns, proto, None, host, port)
    }

    /// As [`probe`](Self::probe), from source address `src` (which must be assigned in `ns`).
    pub fn probe_from(
        &self,
        ns: &str,
        proto: &str,
        src: Option<&str>,
        host: &str,
        port: u16,
    ) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "python3",
                "-c",
                CLIENT,
                proto,
                host,
                &port.to_string(),
            ])
            .args(src)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// One ICMP echo (raw socket in python: the machine has no `ping`).
    pub fn ping(&self, ns: &str, host: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", PING, host])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Opens a long-lived connection from `ns`.
    pub fn persistent(&self, ns: &str, host: &str, port: u16) -> Option<Persistent> {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "python3",
                "-c",
                PERSISTENT,
                host,
                &port.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdin = child.stdin.take()?;
        let mut stdout = BufReader::new(child.stdout.take()?);
        let mut l = String::new();
        stdout.read_line(&mut l).ok()?;
        let p = Persistent {
            child,
            stdin,
            stdout,
        };
        (l.trim() == "connected").then_some(p)
    }

    /// Runs `f` on a thread that has entered the node namespace (for netlink/tc and ifindex).
    pub fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.node, f)
    }
}

/// Runs `f` on a thread that has entered the named network namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).expect("open netns");
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            f()
        })
        .join()
        .expect("node thread")
    })
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::thread::sleep(Duration::from_millis(50));
        for ns in [&self.a, &self.b, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
