//! Where policies come from. The reference agent watches a directory of YAML files; a
//! Kubernetes source comes later behind the same trait.

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use weir_policy_model::{ParseError, ParseErrors, Policy, SourceLocation, parse_policies};

/// A change in the policy source.
#[derive(Debug)]
pub enum PolicyEvent {
    /// A file appeared or changed: its policies, or why it was rejected.
    Loaded(PathBuf, Result<Vec<Policy>, ParseErrors>),
    /// A file went away.
    Removed(PathBuf),
}

/// A source of policy changes.
pub trait PolicySource {
    /// The changes since the last call (the first call reports everything).
    fn poll(&mut self) -> Vec<PolicyEvent>;
}

/// Watches a directory (recursively) for `.yaml`, `.yml` and `.json` files by polling their
/// content: simple, needs no inotify, and catches editors that replace files by renaming.
#[derive(Debug)]
pub struct DirectorySource {
    dir: PathBuf,
    seen: BTreeMap<PathBuf, u64>,
}

impl DirectorySource {
    /// A source over `dir` (which may not exist yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirectorySource {
            dir: dir.into(),
            seen: BTreeMap::new(),
        }
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 16 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        // Hidden files are editors' temporaries (and Kubernetes ConfigMap's `..data` links).
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
        {
            continue;
        }
        if p.is_dir() {
            walk(&p, depth + 1, out);
        } else if matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
}

impl PolicySource for DirectorySource {
    fn poll(&mut self) -> Vec<PolicyEvent> {
        let mut files = Vec::new();
        walk(&self.dir, 0, &mut files);
        files.sort();
        let mut events = Vec::new();
        let mut now = BTreeMap::new();
        for f in files {
            let Ok(bytes) = std::fs::read(&f) else {
                continue;
            };
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            let digest = h.finish();
            now.insert(f.clone(), digest);
            if self.seen.get(&f) == Some(&digest) {
                continue;
            }
            let name = f.display().to_string();
            let result = match String::from_utf8(bytes) {
                Ok(text) => parse_policies(&name, &text),
                Err(_) => Err(ParseErrors(vec![ParseError {
                    location: SourceLocation {
                        file: name,
                        line: 0,
                        column: 0,
                    },
                    path: String::new(),
                    message: "is not valid UTF-8".into(),
                }])),
            };
            events.push(PolicyEvent::Loaded(f, result));
        }
        for old in self.seen.keys() {
            if !now.contains_key(old) {
                events.push(PolicyEvent::Removed(old.clone()));
            }
        }
        self.seen = now;
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a, namespace: ns}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n";

    #[test]
    fn reports_added_changed_broken_and_removed_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = DirectorySource::new(dir.path());
        assert!(src.poll().is_empty());
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, GOOD).unwrap();
        let ev = src.poll();
        assert!(matches!(&ev[..], [PolicyEvent::Loaded(p, Ok(v))] if p == &f && v.len() == 1));
        assert!(
            src.poll().is_empty(),
            "unchanged files are not reported again"
        );
        std::fs::write(&f, "kind: Nope\n").unwrap();
        assert!(matches!(&src.poll()[..], [PolicyEvent::Loaded(_, Err(_))]));
        std::fs::remove_file(&f).unwrap();
        assert!(matches!(&src.poll()[..], [PolicyEvent::Removed(p)] if p == &f));
    }
}
