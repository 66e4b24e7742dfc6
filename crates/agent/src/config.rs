//! The agent's configuration from files, in the two shapes Cilium users know:
//!
//! * `--config FILE`: a YAML mapping whose keys are the long flag names
//!   (`policy-dir: /etc/weir/policies`, `node-address: [10.0.0.1]`, `no-proxies: true`),
//!   like the keys of Cilium's `cilium-config` ConfigMap.
//! * `--config-dir DIR`: one file per option, named after it, holding its value: the
//!   layout of a ConfigMap mounted as a volume (Cilium's `--config-dir`). Kubernetes'
//!   bookkeeping entries (names starting with `.`) are skipped.
//!
//! Both become command-line arguments placed *before* the real ones, so precedence is
//! defaults < config directory < config file < flags. The agent's option table is passed in
//! ([`KnownOption`]), which keeps this module free of the CLI parser and testable alone.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use weir_policy_model::yaml::{self, NodeKind, Position, ScalarType};

/// How an option takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionKind {
    /// `--name VALUE`, once.
    Value,
    /// `--name VALUE`, repeatable (a list in the file).
    Repeated,
    /// `--name` alone (`true`/`false` in the file).
    Switch,
}

/// An option the file may set: its long name, without dashes, and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownOption {
    /// The long flag name, such as `policy-dir`.
    pub name: String,
    /// How it takes its value.
    pub kind: OptionKind,
}

/// A configuration file or directory that cannot be used. Nothing of it is applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or directory could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// What was being read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A setting in the YAML file is wrong; the position and key say where.
    #[error("{file}:{position}: {key}: {message}")]
    Invalid {
        /// The configuration file.
        file: String,
        /// Line and column of the offending node.
        position: Position,
        /// The option key (empty for the document itself).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A file in the configuration directory is wrong.
    #[error("{path}: {message}")]
    InvalidEntry {
        /// The file named after the option.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One setting read from a file: the arguments it becomes and where it came from, so a
/// value the flag parser rejects can be blamed on its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The option's long name.
    pub name: String,
    /// `--name VALUE ...` as arguments.
    pub args: Vec<OsString>,
    /// Where it was written: `file:line:column`, or the directory entry's path.
    pub origin: String,
}

/// Finds `--config FILE` / `--config=FILE` and `--config-dir DIR` in raw arguments (before
/// the full parse, which needs the files' settings first).
pub fn config_locations(argv: &[OsString]) -> (Option<PathBuf>, Option<PathBuf>) {
    let (mut file, mut dir) = (None, None);
    let mut it = argv.iter().skip(1);
    while let Some(arg) = it.next() {
        let Some(s) = arg.to_str() else { continue };
        if s == "--" {
            break;
        }
        let mut take = |name: &str, slot: &mut Option<PathBuf>| {
            if s == name {
                if let Some(v) = it.next() {
                    *slot = Some(PathBuf::from(v));
                }
                true
            } else if let Some(v) = s.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                *slot = Some(PathBuf::from(v));
                true
            } else {
                false
            }
        };
        if !take("--config", &mut file) {
            take("--config-dir", &mut dir);
        }
    }
    (file, dir)
}

fn find<'k>(known: &'k [KnownOption], name: &str) -> Option<&'k KnownOption> {
    known.iter().find(|k| k.name == name)
}

fn names(known: &[KnownOption]) -> String {
    known
        .iter()
        .map(|k| k.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the YAML configuration `text` (named `file` in errors) into settings.
pub fn settings_from_yaml(
    file: &str,
    text: &str,
    known: &[KnownOption],
) -> Result<Vec<Setting>, ConfigError> {
    let invalid = |position: Position, key: &str, message: String| ConfigError::Invalid {
        file: file.to_string(),
        position,
        key: key.to_string(),
        message,
    };
    let docs =
        yaml::parse_documents(text).map_err(|e| invalid(e.position, &e.path, e.message.clone()))?;
    let mut out = Vec::new();
    let mut docs = docs.into_iter();
    let Some(doc) = docs.next() else {
        return Ok(out);
    };
    if let Some(extra) = docs.next() {
        return Err(invalid(
            extra.position,
            "",
            "one document expected, found more".into(),
        ));
    }
    let entries = match doc.kind {
        NodeKind::Mapping(entries) => entries,
        NodeKind::Scalar(s) if s.resolve() == ScalarType::Null => return Ok(out),
        _ => {
            return Err(invalid(
                doc.position,
                "",
                "expected a mapping of option names to values".into(),
            ));
        }
    };
    for (key, value) in entries {
        let NodeKind::Scalar(k) = &key.kind else {
            return Err(invalid(key.position, "", "option names are strings".into()));
        };
        let name = k.value.as_str();
        let Some(option) = find(known, name) else {
            return Err(invalid(
                key.position,
                name,
                format!("unknown option; known options: {}", names(known)),
            ));
        };
        let flag = OsString::from(format!("--{name}"));
        let scalar = |node: &yaml::Node| -> Result<String, ConfigError> {
            match &node.kind {
                NodeKind::Scalar(s) if s.resolve() == ScalarType::Null => {
                    Err(invalid(node.position, name, "has no value".into()))
                }
                NodeKind::Scalar(s) => Ok(s.value.clone()),
                _ => Err(invalid(
                    node.position,
                    name,
                    "expected a single value".into(),
                )),
            }
        };
        let args = match option.kind {
            OptionKind::Value => vec![flag, scalar(&value)?.into()],
            OptionKind::Switch => match &value.kind {
                NodeKind::Scalar(s) => match s.resolve() {
                    ScalarType::Bool(true) => vec![flag],
                    ScalarType::Bool(false) => Vec::new(),
                    _ => {
                        return Err(invalid(
                            value.position,
                            name,
                            format!("expected true or false, found {:?}", s.value),
                        ));
                    }
                },
                _ => {
                    return Err(invalid(
                        value.position,
                        name,
                        "expected true or false".into(),
                    ));
                }
            },
            OptionKind::Repeated => {
                let items = match &value.kind {
                    NodeKind::Sequence(items) => items.iter().collect::<Vec<_>>(),
                    _ => vec![&value],
                };
                let mut args = Vec::new();
                for item in items {
                    args.push(flag.clone());
                    args.push(scalar(item)?.into());
                }
                args
            }
        };
        out.push(Setting {
            name: name.to_string(),
            args,
            origin: format!("{file}:{}", value.position),
        });
    }
    Ok(out)
}

/// Reads a configuration directory: one file per option, its content the value.
pub fn settings_from_dir(dir: &Path, known: &[KnownOption]) -> Result<Vec<Setting>, ConfigError> {
    let read_err = |path: &Path, source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| read_err(dir, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    let mut out = Vec::new();
    for entry in entries {
        let file_name = entry.file_name();
        let name = file_name.to_string_lossy();
        let path = entry.path();
        // `..data` and friends from a mounted ConfigMap, editor backups.
        if name.starts_with('.') || path.is_dir() {
            continue;
        }
        let Some(option) = find(known, &name) else {
            return Err(ConfigError::InvalidEntry {
                path,
                message: format!("unknown option; known options: {}", names(known)),
            });
        };
        let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
        let value = text.trim();
        let flag = OsString::from(format!("--{name}"));
        let args = match option.kind {
            OptionKind::Value => vec![flag, value.into()],
            OptionKind::Switch => match value {
                "true" => vec![flag],
                "false" | "" => Vec::new(),
                other => {
                    return Err(ConfigError::InvalidEntry {
                        path,
                        message: format!("expected true or false, found {other:?}"),
                    });
                }
            },
            // Lists are written space- or comma-separated, as in Cilium's ConfigMap.
            OptionKind::Repeated => value
                .split([' ', ',', '\n', '\t'])
                .filter(|v| !v.is_empty())
                .flat_map(|v| [flag.clone(), v.into()])
                .collect(),
        };
        out.push(Setting {
            name: name.into_owned(),
            args,
            origin: path.display().to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<KnownOption> {
        [
            ("policy-dir", OptionKind::Value),
            ("policy-poll-ms", OptionKind::Value),
            ("node-address", OptionKind::Repeated),
            ("no-proxies", OptionKind::Switch),
        ]
        .into_iter()
        .map(|(n, kind)| KnownOption {
            name: n.into(),
            kind,
        })
        .collect()
    }

    fn args(settings: &[Setting]) -> Vec<String> {
        settings
            .iter()
            .flat_map(|s| s.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn yaml_keys_become_flags() {
        let s = settings_from_yaml(
            "agent.yaml",
            "# comment\npolicy-dir: /etc/p\npolicy-poll-ms: 100\nnode-address: [10.0.0.1, fd00::1]\nno-proxies: true\n",
            &known(),
        )
        .expect("valid");
        assert_eq!(
            args(&s),
            [
                "--policy-dir",
                "/etc/p",
                "--policy-poll-ms",
                "100",
                "--node-address",
                "10.0.0.1",
                "--node-address",
                "fd00::1",
                "--no-proxies"
            ]
        );
        assert_eq!(s[1].origin, "agent.yaml:3:17");
    }

    #[test]
    fn false_switch_and_empty_file_add_nothing() {
        let s = settings_from_yaml("a", "no-proxies: false\n", &known()).expect("valid");
        assert!(args(&s).is_empty());
        assert!(
            settings_from_yaml("a", "", &known())
                .expect("empty")
                .is_empty()
        );
    }

    #[test]
    fn errors_name_file_line_column_and_key() {
        let e = settings_from_yaml("agent.yaml", "policy-dir: /x\npolicy-dri: /y\n", &known())
            .expect_err("unknown");
        let text = e.to_string();
        assert!(
            text.starts_with("agent.yaml:2:1: policy-dri: unknown option"),
            "{text}"
        );
        let e = settings_from_yaml("agent.yaml", "no-proxies: yes please\n", &known())
            .expect_err("not bool");
        assert!(
            e.to_string()
                .starts_with("agent.yaml:1:13: no-proxies: expected true or false"),
            "{e}"
        );
        let e =
            settings_from_yaml("agent.yaml", "policy-dir: [a, b]\n", &known()).expect_err("list");
        assert!(
            e.to_string()
                .contains("policy-dir: expected a single value"),
            "{e}"
        );
        let e = settings_from_yaml("agent.yaml", "- a\n", &known()).expect_err("not a map");
        assert!(e.to_string().contains("expected a mapping"), "{e}");
        let e = settings_from_yaml("agent.yaml", "a: [\n", &known()).expect_err("syntax");
        assert!(e.to_string().starts_with("agent.yaml:"), "{e}");
    }

    #[test]
    fn directory_entries_become_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("policy-dir"), "/etc/p\n").expect("write");
        std::fs::write(dir.path().join("node-address"), "10.0.0.1 10.0.0.2").expect("write");
        std::fs::write(dir.path().join("no-proxies"), "true").expect("write");
        std::fs::write(dir.path().join("..data"), "ignored").expect("write");
        let s = settings_from_dir(dir.path(), &known()).expect("valid");
        assert_eq!(
            args(&s),
            [
                "--no-proxies",
                "--node-address",
                "10.0.0.1",
                "--node-address",
                "10.0.0.2",
                "--policy-dir",
                "/etc/p"
            ]
        );
        std::fs::write(dir.path().join("bogus"), "1").expect("write");
        let e = settings_from_dir(dir.path(), &known()).expect_err("unknown");
        assert!(e.to_string().contains("bogus: unknown option"), "{e}");
    }

    #[test]
    fn locations_are_found_in_both_spellings() {
        let argv = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_locations(&argv(&["agent", "--config", "/a.yaml", "--config-dir=/d"])),
            (Some("/a.yaml".into()), Some("/d".into()))
        );
        assert_eq!(
            config_locations(&argv(&["agent", "--config=/b.yaml"])),
            (Some("/b.yaml".into()), None)
        );
        assert_eq!(config_locations(&argv(&["agent"])), (None, None));
    }
}
