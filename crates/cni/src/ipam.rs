//! Host-local IPAM for the node's pod CIDR.
//!
//! Layout under `<state_dir>/networks/<network>/`: one file per allocated
//! address, named by the address and holding `container_id\nifname\n`; a
//! `last_reserved` file so allocation walks round-robin (a freed address is not
//! reused at once); and a `lock` file. Every operation holds an exclusive
//! `flock` on `lock`, which serialises concurrent plugin processes and threads
//! alike (each call opens its own file description).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved";

/// IPAM failures.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Reading or writing the state directory failed.
    #[error("IPAM state {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Every usable address is taken.
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    /// The network name cannot name a directory safely.
    #[error("invalid network name {0:?}")]
    InvalidNetworkName(String),
    /// A requested address (`CNI_ARGS` `IP=`) is outside the pool, the gateway, or taken.
    #[error("requested address {0} is not available")]
    Unavailable(Ipv4Addr),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One network's address pool, persisted in a directory.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
}

/// Holds the pool's flock until dropped.
struct PoolLock(File);

impl Drop for PoolLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first is just explicit.
        let _ = self.0.unlock();
    }
}

impl Ipam {
    /// The pool for `network` in `subnet`, never handing out `gateway`, the
    /// network or the broadcast address. Creates the directory if needed.
    pub fn open(
        state_dir: &Path,
        network: &str,
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
    ) -> Result<Self, IpamError> {
        let safe = !network.is_empty()
            && network != "."
            && network != ".."
            && network
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !safe {
            return Err(IpamError::InvalidNetworkName(network.to_string()));
        }
        let dir = state_dir.join("networks").join(network);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self {
            dir,
            subnet: subnet.trunc(),
            gateway,
        })
    }

    /// The pool's subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    fn lock(&self) -> Result<PoolLock, IpamError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.lock().map_err(io_err(&path))?;
        Ok(PoolLock(file))
    }

    /// The address held by (`container_id`, `ifname`), allocating one if none:
    /// a repeated ADD gets the same address back.
    pub fn allocate(&self, container_id: &str, ifname: &str) -> Result<Ipv4Addr, IpamError> {
        let _lock = self.lock()?;
        if let Some(ip) = self.find(container_id, ifname)? {
            return Ok(ip);
        }
        let last = self.read_last_reserved();
        let candidates: Vec<Ipv4Addr> = self
            .subnet
            .hosts()
            .filter(|ip| *ip != self.gateway)
            .collect();
        // Start just after the last reservation, wrapping around once.
        let start = last
            .and_then(|l| candidates.iter().position(|ip| *ip == l))
            .map_or(0, |i| i + 1);
        let n = candidates.len();
        for offset in 0..n {
            let Some(&ip) = candidates.get((start + offset) % n) else {
                continue;
            };
            let path = self.dir.join(ip.to_string());
            if path.exists() {
                continue;
            }
            self.write_atomically(&path, format!("{container_id}\n{ifname}\n").as_bytes())?;
            self.write_atomically(
                &self.dir.join(LAST_RESERVED_FILE),
                ip.to_string().as_bytes(),
            )?;
            return Ok(ip);
        }
        Err(IpamError::Exhausted(self.subnet))
    }

    /// Reserves exactly `wanted` for (`container_id`, `ifname`), as host-local's
    /// `IP=` argument does; a repeated ADD with the same address succeeds.
    pub fn allocate_requested(
        &self,
        container_id: &str,
        ifname: &str,
        wanted: Ipv4Addr,
    ) -> Result<Ipv4Addr, IpamError> {
        let _lock = self.lock()?;
        if let Some(ip) = self.find(container_id, ifname)? {
            return if ip == wanted {
                Ok(ip)
            } else {
                Err(IpamError::Unavailable(wanted))
            };
        }
        let usable = self.subnet.hosts().any(|ip| ip == wanted) && wanted != self.gateway;
        let path = self.dir.join(wanted.to_string());
        if !usable || path.exists() {
            return Err(IpamError::Unavailable(wanted));
        }
        self.write_atomically(&path, format!("{container_id}\n{ifname}\n").as_bytes())?;
        Ok(wanted)
    }

    /// The address held by (`container_id`, `ifname`), if any.
    pub fn lookup(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        self.find(container_id, ifname)
    }

    /// Frees the address held by (`container_id`, `ifname`); `None` when it held
    /// nothing (DEL is idempotent).
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let found = self.find(container_id, ifname)?;
        if let Some(ip) = found {
            let path = self.dir.join(ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(found)
    }

    /// Every allocation as (address, container id, ifname).
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, String, String)>, IpamError> {
        let _lock = self.lock()?;
        self.entries()
    }

    fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|(_, c, i)| c == container_id && i == ifname)
            .map(|(ip, _, _)| ip))
    }

    fn entries(&self) -> Result<Vec<(Ipv4Addr, String, String)>, IpamError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue; // lock, last_reserved, temporary files
            };
            let path = entry.path();
            let content = match fs::read_to_string(&path) {
                Ok(c) => c,
                // Released between read_dir and read: only possible without the lock.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            let mut lines = content.lines();
            let container = lines.next().unwrap_or_default().to_string();
            let ifname = lines.next().unwrap_or_default().to_string();
            out.push((ip, container, ifname));
        }
        out.sort();
        Ok(out)
    }

    fn read_last_reserved(&self) -> Option<Ipv4Addr> {
        fs::read_to_string(self.dir.join(LAST_RESERVED_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Writes through a temporary file and rename, so a crash never leaves a
    /// half-written allocation behind.
    fn write_atomically(&self, path: &Path, data: &[u8]) -> Result<(), IpamError> {
        let tmp = self.dir.join(format!(".tmp-{}", std::process::id()));
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(data).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn pool(dir: &Path, cidr: &str) -> Ipam {
        let subnet: Ipv4Net = cidr.parse().expect("cidr");
        let gw = subnet.hosts().next().expect("host");
        Ipam::open(dir, "test-net", subnet, gw).expect("open")
    }

    #[test]
    fn allocates_skipping_gateway_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = pool(dir.path(), "10.0.0.0/29");
        let a = ipam.allocate("c1", "eth0").expect("alloc");
        assert_eq!(a, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(ipam.allocate("c1", "eth0").expect("again"), a);
        let b = ipam.allocate("c1", "eth1").expect("second if");
        assert_ne!(a, b);
        assert_eq!(ipam.lookup("c1", "eth0").expect("lookup"), Some(a));
    }

    #[test]
    fn requested_address_is_reserved_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = pool(dir.path(), "10.9.0.0/24");
        let want: Ipv4Addr = "10.9.0.77".parse().expect("addr");
        assert_eq!(ipam.allocate_requested("c1", "eth0", want).ok(), Some(want));
        assert_eq!(ipam.allocate_requested("c1", "eth0", want).ok(), Some(want));
        assert!(ipam.allocate_requested("c2", "eth0", want).is_err());
        let gw: Ipv4Addr = "10.9.0.1".parse().expect("addr");
        assert!(ipam.allocate_requested("c3", "eth0", gw).is_err());
        let outside: Ipv4Addr = "10.8.0.5".parse().expect("addr");
        assert!(ipam.allocate_requested("c3", "eth0", outside).is_err());
        // The round-robin allocator skips the requested address.
        for i in 0..10 {
            assert_ne!(ipam.allocate(&format!("r{i}"), "eth0").ok(), Some(want));
        }
    }

    #[test]
    fn exhausts_then_frees_round_robin() {
        let dir = tempfile::tempdir().expect("tempdir");
        // /29: hosts .1-.6, .1 is the gateway, so five addresses.
        let ipam = pool(dir.path(), "10.0.0.0/29");
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("c{i}"), "eth0").expect("alloc"))
            .collect();
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 0, 0)));
        assert!(!got.contains(&Ipv4Addr::new(10, 0, 0, 7)));
        assert!(matches!(
            ipam.allocate("c9", "eth0"),
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(
            ipam.release("c2", "eth0").expect("release"),
            got.get(2).copied()
        );
        assert_eq!(ipam.release("c2", "eth0").expect("release twice"), None);
        assert_eq!(ipam.allocate("c9", "eth0").ok(), got.get(2).copied());
    }

    #[test]
    fn freed_address_is_not_reused_immediately() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = pool(dir.path(), "10.0.0.0/24");
        let a = ipam.allocate("c1", "eth0").expect("alloc");
        ipam.release("c1", "eth0").expect("release");
        let b = ipam.allocate("c2", "eth0").expect("alloc");
        assert_ne!(a, b);
    }

    #[test]
    fn persists_across_instances() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = pool(dir.path(), "10.0.0.0/24")
            .allocate("c1", "eth0")
            .expect("alloc");
        let reopened = pool(dir.path(), "10.0.0.0/24");
        assert_eq!(reopened.lookup("c1", "eth0").expect("lookup"), Some(a));
        assert_eq!(
            reopened.list().expect("list"),
            vec![(a, "c1".into(), "eth0".into())]
        );
    }

    #[test]
    fn concurrent_threads_get_distinct_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    // A separate Ipam (and lock file description) per thread,
                    // as separate plugin processes would have.
                    let ipam = pool(&path, "10.0.0.0/24");
                    (0..8)
                        .map(|j| ipam.allocate(&format!("t{i}-{j}"), "eth0").expect("alloc"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Ipv4Addr> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect();
        let unique: BTreeSet<_> = all.iter().collect();
        assert_eq!(all.len(), 128);
        assert_eq!(unique.len(), 128);
        assert_eq!(pool(&path, "10.0.0.0/24").list().expect("list").len(), 128);
    }

    #[test]
    fn rejects_unsafe_network_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let subnet: Ipv4Net = "10.0.0.0/24".parse().expect("cidr");
        for bad in ["", "..", "a/b", "x y"] {
            assert!(matches!(
                Ipam::open(dir.path(), bad, subnet, Ipv4Addr::new(10, 0, 0, 1)),
                Err(IpamError::InvalidNetworkName(_))
            ));
        }
    }

    /// Child side of `concurrent_processes_get_distinct_addresses`: does nothing
    /// unless the parent set `WEIR_IPAM_CHILD_DIR`.
    #[test]
    fn ipam_child_process() {
        let Ok(dir) = std::env::var("WEIR_IPAM_CHILD_DIR") else {
            return;
        };
        let tag = std::env::var("WEIR_IPAM_CHILD_TAG").unwrap_or_default();
        let ipam = pool(Path::new(&dir), "10.0.0.0/24");
        for j in 0..16 {
            ipam.allocate(&format!("p{tag}-{j}"), "eth0")
                .expect("alloc");
        }
    }

    #[test]
    fn concurrent_processes_get_distinct_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("test binary");
        let children: Vec<_> = (0..6)
            .map(|i| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "ipam::tests::ipam_child_process",
                        "--test-threads=1",
                    ])
                    .env("WEIR_IPAM_CHILD_DIR", dir.path())
                    .env("WEIR_IPAM_CHILD_TAG", i.to_string())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("spawn child")
            })
            .collect();
        for mut child in children {
            assert!(child.wait().expect("wait").success());
        }
        let list = pool(dir.path(), "10.0.0.0/24").list().expect("list");
        assert_eq!(list.len(), 96);
        let unique: BTreeSet<_> = list.iter().map(|(ip, _, _)| *ip).collect();
        assert_eq!(unique.len(), 96);
    }
}
