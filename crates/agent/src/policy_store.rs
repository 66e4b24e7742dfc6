//! Policies changed through the API (`weir policy import` / `weir policy delete`), kept in the
//! agent's policy directory so that a restart, and anyone reading the directory, sees them.
//!
//! An import is validated whole before anything changes. Each imported object is written, as
//! the YAML document the user wrote, to its own file under `<policy-dir>/imported/` (write to
//! a hidden temporary, then rename, so the directory watcher never reads half a file). An
//! object that another file defined is taken out of that file, so exactly one file holds it.
//! A delete removes the object's document from whichever file holds it (the file itself when
//! nothing else is left in it). The manager is updated in the same call, so the change is in
//! the kernel when the API answers; the directory watcher later sees the same content and
//! finds nothing to do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use weir_datapath::Datapath;
use weir_policy_model::{ParseErrors, Policy, PolicyKind, PolicyName, parse_policies};

use crate::manager::{Manager, ManagerError, PolicyFile};

/// Why a policy change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The files do not parse or validate; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// No file holds the policy.
    #[error("no policy {0}")]
    NotFound(String),
    /// The request cannot be carried out as asked (ambiguous name, a shared document, a file
    /// that is currently rejected).
    #[error("{0}")]
    Conflict(String),
    /// Reading or writing a policy file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The manager could not apply the change (the files are written).
    #[error("{0}")]
    Manager(#[from] ManagerError),
}

/// Which policy a delete names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyQuery {
    /// Namespace; `None` for cluster-wide policies.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
    /// The kind; `None` matches any.
    pub kind: Option<PolicyKind>,
}

impl PolicyQuery {
    fn matches(&self, n: &PolicyName) -> bool {
        n.name == self.name
            && n.namespace == self.namespace
            && self.kind.is_none_or(|k| k == n.kind)
    }
}

impl std::fmt::Display for PolicyQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(k) = self.kind {
            write!(f, "{} ", k.as_str())?;
        }
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Parses a kind name as `kind:` spells it (case-insensitive), or its short forms
/// (`cnp`, `ccnp`, `netpol`).
pub fn parse_kind(s: &str) -> Option<PolicyKind> {
    match s.to_ascii_lowercase().as_str() {
        "ciliumnetworkpolicy" | "cnp" => Some(PolicyKind::CiliumNetworkPolicy),
        "ciliumclusterwidenetworkpolicy" | "ccnp" => {
            Some(PolicyKind::CiliumClusterwideNetworkPolicy)
        }
        "networkpolicy" | "netpol" | "knp" => Some(PolicyKind::NetworkPolicy),
        _ => None,
    }
}

/// `Kind namespace/name`, as the API reports policies.
pub fn describe(n: &PolicyName) -> String {
    format!("{} {n}", n.kind.as_str())
}

/// One change to the policy directory.
#[derive(Debug, Clone)]
pub enum FileOp {
    /// Write `text` to `path`; `policies` is what it parses to (under `path`'s name).
    Write {
        /// The file.
        path: PathBuf,
        /// Its new content.
        text: String,
        /// Its policies.
        policies: Vec<Policy>,
    },
    /// Remove `path`.
    Remove {
        /// The file.
        path: PathBuf,
    },
}

impl FileOp {
    /// The file the change is to.
    pub fn path(&self) -> &Path {
        match self {
            FileOp::Write { path, .. } | FileOp::Remove { path } => path,
        }
    }
}

/// Changes to make, in order: new definitions first, then the files they are taken out of,
/// so a moved policy is never absent from the kernel in between.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The file changes.
    pub ops: Vec<FileOp>,
    /// The policies imported or deleted.
    pub policies: Vec<PolicyName>,
}

/// The API's view of the policy directory.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    dir: PathBuf,
}

/// A YAML text cut at its document markers: `(first line, text)` per piece, 1-based lines.
/// The marker line starts the piece after it.
pub fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let is_marker = line.starts_with("---")
            && line
                .get(3..)
                .is_some_and(|r| r.is_empty() || r.starts_with(char::is_whitespace));
        if is_marker && i > 0 {
            out.push((start, std::mem::take(&mut current)));
            start = i + 1;
        }
        current.push_str(line);
    }
    out.push((start, current));
    out
}

/// The index of the piece holding `line`.
fn piece_of(pieces: &[(usize, String)], line: usize) -> usize {
    pieces
        .iter()
        .rposition(|(start, _)| *start <= line)
        .unwrap_or(0)
}

fn names(policies: &[Policy]) -> BTreeSet<PolicyName> {
    policies.iter().map(|p| p.name.clone()).collect()
}

fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn short_kind(k: PolicyKind) -> &'static str {
    match k {
        PolicyKind::CiliumNetworkPolicy => "cnp",
        PolicyKind::CiliumClusterwideNetworkPolicy => "ccnp",
        PolicyKind::NetworkPolicy => "netpol",
    }
}

impl PolicyStore {
    /// The store over the agent's policy directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PolicyStore { dir: dir.into() }
    }

    /// Where imported policies are written.
    pub fn imported_dir(&self) -> PathBuf {
        self.dir.join("imported")
    }

    fn parse_as(path: &Path, text: &str) -> Result<Vec<Policy>, ParseErrors> {
        parse_policies(&path.display().to_string(), text)
    }

    /// The content a file has now, or will have once earlier steps of the plan ran.
    fn text_of(path: &Path, pending: &BTreeMap<PathBuf, String>) -> Result<String, StoreError> {
        if let Some(t) = pending.get(path) {
            return Ok(t.clone());
        }
        std::fs::read_to_string(path).map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// `text` without the document holding `name`; `Ok(None)` when nothing is left.
    fn without(path: &Path, text: &str, name: &PolicyName) -> Result<Option<String>, StoreError> {
        let before = Self::parse_as(path, text).map_err(|e| {
            StoreError::Conflict(format!(
                "{} is currently rejected, so {name} cannot be taken out of it; fix or remove it first:\n{e}",
                path.display()
            ))
        })?;
        let pieces = split_documents(text);
        let hit: BTreeSet<usize> = before
            .iter()
            .filter(|p| &p.name == name)
            .map(|p| piece_of(&pieces, p.location.line))
            .collect();
        let rest: String = pieces
            .iter()
            .enumerate()
            .filter(|(i, _)| !hit.contains(i))
            .map(|(_, (_, t))| t.as_str())
            .collect();
        let mut expected = names(&before);
        expected.remove(name);
        if expected.is_empty() && is_blank_yaml(&rest) {
            return Ok(None);
        }
        match Self::parse_as(path, &rest) {
            Ok(after) if names(&after) == expected => Ok(Some(rest)),
            _ => Err(StoreError::Conflict(format!(
                "{name} shares a YAML document with other policies in {}; edit that file",
                path.display()
            ))),
        }
    }

    /// Plans taking `name` out of every file but `keep` that holds it.
    fn take_out(
        &self,
        name: &PolicyName,
        keep: Option<&Path>,
        files: &BTreeMap<PathBuf, PolicyFile>,
        pending: &mut BTreeMap<PathBuf, String>,
        ops: &mut Vec<FileOp>,
    ) -> Result<(), StoreError> {
        for (path, f) in files {
            if Some(path.as_path()) == keep || !f.policies.contains(name) {
                continue;
            }
            let text = Self::text_of(path, pending)?;
            ops.retain(|op| op.path() != path);
            match Self::without(path, &text, name)? {
                Some(rest) => {
                    let policies = Self::parse_as(path, &rest)
                        .map_err(|e| StoreError::Conflict(e.to_string()))?;
                    pending.insert(path.clone(), rest.clone());
                    ops.push(FileOp::Write {
                        path: path.clone(),
                        text: rest,
                        policies,
                    });
                }
                None => {
                    pending.insert(path.clone(), String::new());
                    ops.push(FileOp::Remove { path: path.clone() });
                }
            }
        }
        Ok(())
    }

    /// Validates `docs` (`(name for errors, text)`) whole and plans their import against the
    /// directory's current `files`. Nothing is written.
    pub fn plan_import(
        &self,
        docs: &[(String, String)],
        files: &BTreeMap<PathBuf, PolicyFile>,
    ) -> Result<Plan, StoreError> {
        let mut errors = Vec::new();
        let mut parsed = Vec::new();
        for (name, text) in docs {
            match parse_policies(name, text) {
                Ok(p) => parsed.push((text, p)),
                Err(e) => errors.extend(e.0.iter().map(ToString::to_string)),
            }
        }
        let mut seen: BTreeMap<PolicyName, String> = BTreeMap::new();
        for (_, policies) in &parsed {
            for p in policies {
                if let Some(first) = seen.insert(p.name.clone(), p.location.to_string()) {
                    errors.push(format!(
                        "{}: {} {} is also defined at {first}",
                        p.location,
                        p.name.kind.as_str(),
                        p.name
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(StoreError::Invalid(errors.join("\n")));
        }
        if seen.is_empty() {
            return Err(StoreError::Invalid("no policy objects in the input".into()));
        }

        // One file per document: the user's own text, under a name made from its first object.
        let imported = self.imported_dir();
        let mut writes: Vec<FileOp> = Vec::new();
        let mut targets: BTreeMap<PolicyName, PathBuf> = BTreeMap::new();
        let mut taken: BTreeSet<PathBuf> = BTreeSet::new();
        for (text, policies) in &parsed {
            let pieces = split_documents(text);
            let mut groups: BTreeMap<usize, Vec<&Policy>> = BTreeMap::new();
            for p in policies {
                groups
                    .entry(piece_of(&pieces, p.location.line))
                    .or_default()
                    .push(p);
            }
            // Pieces that do not stand alone (never seen in practice) keep the file whole.
            let mut chunks: Vec<(String, BTreeSet<PolicyName>)> = Vec::new();
            let standalone = groups.iter().all(|(i, group)| {
                let piece = pieces.get(*i).map_or("", |(_, t)| t.as_str());
                let want: BTreeSet<PolicyName> = group.iter().map(|p| p.name.clone()).collect();
                parse_policies("piece", piece).is_ok_and(|got| names(&got) == want)
            });
            if standalone {
                for (i, group) in &groups {
                    let piece = pieces.get(*i).map_or(String::new(), |(_, t)| t.clone());
                    chunks.push((piece, group.iter().map(|p| p.name.clone()).collect()));
                }
            } else {
                chunks.push(((*text).clone(), names(policies)));
            }
            for (chunk, group) in chunks {
                let Some(first) = group.iter().next() else {
                    continue;
                };
                let base = format!(
                    "{}-{}-{}",
                    short_kind(first.kind),
                    sanitize(first.namespace.as_deref().unwrap_or("_cluster")),
                    sanitize(&first.name)
                );
                // A file that holds policies outside this group gets a sibling instead.
                let mut n = 1;
                let path = loop {
                    let candidate = if n == 1 {
                        imported.join(format!("{base}.yaml"))
                    } else {
                        imported.join(format!("{base}-{n}.yaml"))
                    };
                    let fits = files
                        .get(&candidate)
                        .is_none_or(|f| f.policies.iter().all(|p| group.contains(p)));
                    if fits && !taken.contains(&candidate) {
                        break candidate;
                    }
                    n += 1;
                };
                let text = if chunk.ends_with('\n') {
                    chunk
                } else {
                    format!("{chunk}\n")
                };
                let policies =
                    Self::parse_as(&path, &text).map_err(|e| StoreError::Invalid(e.to_string()))?;
                for name in &group {
                    targets.insert(name.clone(), path.clone());
                }
                taken.insert(path.clone());
                writes.push(FileOp::Write {
                    path,
                    text,
                    policies,
                });
            }
        }

        // Then take each imported object out of the other files that held it.
        let mut pending: BTreeMap<PathBuf, String> = writes
            .iter()
            .filter_map(|op| match op {
                FileOp::Write { path, text, .. } => Some((path.clone(), text.clone())),
                FileOp::Remove { .. } => None,
            })
            .collect();
        let mut later = Vec::new();
        for (name, target) in &targets {
            self.take_out(name, Some(target), files, &mut pending, &mut later)?;
        }
        writes.extend(later);
        Ok(Plan {
            ops: writes,
            policies: targets.into_keys().collect(),
        })
    }

    /// Plans deleting the one policy `query` names.
    pub fn plan_delete(
        &self,
        query: &PolicyQuery,
        files: &BTreeMap<PathBuf, PolicyFile>,
    ) -> Result<Plan, StoreError> {
        let matching: BTreeSet<PolicyName> = files
            .values()
            .flat_map(|f| f.policies.iter())
            .filter(|n| query.matches(n))
            .cloned()
            .collect();
        let mut it = matching.iter();
        let (Some(name), None) = (it.next(), it.next()) else {
            if matching.is_empty() {
                return Err(StoreError::NotFound(query.to_string()));
            }
            let kinds: Vec<&str> = matching.iter().map(|n| n.kind.as_str()).collect();
            return Err(StoreError::Conflict(format!(
                "{query} names {} policies ({}); say which kind",
                matching.len(),
                kinds.join(", ")
            )));
        };
        let mut ops = Vec::new();
        self.take_out(name, None, files, &mut BTreeMap::new(), &mut ops)?;
        Ok(Plan {
            ops,
            policies: vec![name.clone()],
        })
    }
}

/// Writes `text` to `path` through a hidden temporary in the same directory and a rename.
fn write_atomically(path: &Path, text: &str) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Hidden: the directory watcher skips dot files.
    let tmp = dir.join(format!(".{file_name}.tmp"));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Plan {
    /// Carries the plan out: each file change is written, then applied to the manager, in
    /// order. Returns the files changed.
    pub fn commit<D: Datapath>(self, manager: &mut Manager<D>) -> Result<Vec<PathBuf>, StoreError> {
        let mut changed = Vec::new();
        for op in self.ops {
            match op {
                FileOp::Write {
                    path,
                    text,
                    policies,
                } => {
                    write_atomically(&path, &text)?;
                    manager.load_policy_file(&path, Ok(policies))?;
                    changed.push(path);
                }
                FileOp::Remove { path } => {
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => return Err(StoreError::Io { path, source }),
                    }
                    manager.remove_policy_file(&path)?;
                    changed.push(path);
                }
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::ManagerConfig;
    use weir_datapath::FakeDatapath;

    fn cnp(name: &str, app: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: prod}}\nspec:\n  endpointSelector: {{matchLabels: {{app: {app}}}}}\n  ingress: [{{}}]\n"
        )
    }

    fn load_dir(m: &mut Manager<FakeDatapath>, dir: &Path) {
        let mut src = crate::policy_source::DirectorySource::new(dir);
        use crate::policy_source::{PolicyEvent, PolicySource};
        for ev in src.poll() {
            match ev {
                PolicyEvent::Loaded(p, r) => m.load_policy_file(&p, r).unwrap(),
                PolicyEvent::Removed(p) => m.remove_policy_file(&p).unwrap(),
            }
        }
    }

    fn all_names(m: &Manager<FakeDatapath>) -> Vec<String> {
        m.compiler()
            .repository()
            .iter()
            .map(|p| p.name.to_string())
            .collect()
    }

    #[test]
    fn split_keeps_every_line_and_starts_pieces_at_markers() {
        let text = "---\na: 1\n--- \nb: 2\n---x\n";
        let pieces = split_documents(text);
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            pieces.iter().map(|(_, t)| t.as_str()).collect::<String>(),
            text
        );
        assert_eq!(pieces[1].0, 3);
        assert_eq!(split_documents("").len(), 1);
    }

    #[test]
    fn import_splits_documents_replaces_and_survives_a_restart_of_the_watcher() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path());
        let mut m = Manager::new(ManagerConfig::default(), FakeDatapath::new()).unwrap();
        // A user file holding two objects; importing one of them moves it.
        let user = dir.path().join("user.yaml");
        std::fs::write(&user, format!("{}---\n{}", cnp("a", "x"), cnp("b", "y"))).unwrap();
        load_dir(&mut m, dir.path());

        let input = format!("# mine\n{}---\n{}", cnp("b", "z"), cnp("c", "z"));
        let plan = store
            .plan_import(&[("in.yaml".into(), input)], m.policy_files())
            .unwrap();
        assert_eq!(plan.policies.len(), 2);
        let changed = plan.commit(&mut m).unwrap();
        assert_eq!(changed.len(), 3, "{changed:?}");
        let b_file = store.imported_dir().join("cnp-prod-b.yaml");
        assert!(std::fs::read_to_string(&b_file).unwrap().contains("app: z"));
        assert!(!std::fs::read_to_string(&user).unwrap().contains("name: b"));
        assert_eq!(all_names(&m), ["prod/a", "prod/b", "prod/c"]);
        assert!(
            m.compiler()
                .repository()
                .iter()
                .any(|p| p.name.name == "b" && p.location.file == b_file.display().to_string()),
            "the imported version is enforced"
        );

        // A fresh agent reading the directory sees the same policies.
        let mut fresh = Manager::new(ManagerConfig::default(), FakeDatapath::new()).unwrap();
        load_dir(&mut fresh, dir.path());
        assert_eq!(all_names(&fresh), ["prod/a", "prod/b", "prod/c"]);
        assert!(fresh.policy_files().values().all(|f| f.error.is_none()));
    }

    #[test]
    fn a_bad_file_rejects_the_whole_import() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path());
        let m = Manager::new(ManagerConfig::default(), FakeDatapath::new()).unwrap();
        let bad = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x, namespace: prod}\nspec:\n  endpointSelectr: {}\n";
        let err = store
            .plan_import(
                &[
                    ("good.yaml".into(), cnp("a", "x")),
                    ("bad.yaml".into(), bad.into()),
                ],
                m.policy_files(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad.yaml:5:"), "{err}");
        let dup = store
            .plan_import(
                &[
                    ("1.yaml".into(), cnp("a", "x")),
                    ("2.yaml".into(), cnp("a", "y")),
                ],
                m.policy_files(),
            )
            .unwrap_err()
            .to_string();
        assert!(dup.contains("also defined at 1.yaml:1:1"), "{dup}");
        assert!(!store.imported_dir().exists(), "nothing written");
    }

    #[test]
    fn delete_takes_one_document_out_or_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path());
        let mut m = Manager::new(ManagerConfig::default(), FakeDatapath::new()).unwrap();
        let user = dir.path().join("user.yaml");
        std::fs::write(&user, format!("{}---\n{}", cnp("a", "x"), cnp("b", "y"))).unwrap();
        load_dir(&mut m, dir.path());
        let q = |name: &str| PolicyQuery {
            namespace: Some("prod".into()),
            name: name.into(),
            kind: None,
        };
        store
            .plan_delete(&q("a"), m.policy_files())
            .unwrap()
            .commit(&mut m)
            .unwrap();
        assert_eq!(all_names(&m), ["prod/b"]);
        assert!(user.exists());
        assert!(matches!(
            store.plan_delete(&q("a"), m.policy_files()),
            Err(StoreError::NotFound(_))
        ));
        store
            .plan_delete(&q("b"), m.policy_files())
            .unwrap()
            .commit(&mut m)
            .unwrap();
        assert!(!user.exists());
        assert!(all_names(&m).is_empty());
    }
}
