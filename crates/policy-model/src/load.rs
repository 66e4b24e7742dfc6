//! Reading policy files and directories.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{ParseError, ParseErrors};
use crate::model::Policy;
use crate::parse::parse_policies;

/// Directory nesting beyond this is refused (it also stops symlink loops).
const MAX_DIR_DEPTH: usize = 32;

/// Loads policies from files and directories.
///
/// A directory is read recursively and its `.yaml`, `.yml` and `.json` files are parsed in
/// sorted path order; a file named directly is parsed whatever its extension. Errors from all
/// files are collected (an unreadable file is an error naming it); any error fails the load.
pub fn load_paths(paths: &[impl AsRef<Path>]) -> Result<Vec<Policy>, ParseErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for p in paths {
        let p = p.as_ref();
        match fs::metadata(p) {
            Ok(md) if md.is_dir() => {
                let mut found = Vec::new();
                walk(p, 0, &mut found, &mut errors);
                found.sort();
                files.extend(found);
            }
            Ok(_) => files.push(p.to_path_buf()),
            Err(e) => errors.push(ParseError::file(&p.display().to_string(), e.to_string())),
        }
    }
    let mut policies = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        let text = match fs::read(f) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(_) => {
                    errors.push(ParseError::file(&name, "is not valid UTF-8"));
                    continue;
                }
            },
            Err(e) => {
                errors.push(ParseError::file(&name, e.to_string()));
                continue;
            }
        };
        match parse_policies(&name, &text) {
            Ok(p) => policies.extend(p),
            Err(ParseErrors(es)) => errors.extend(es),
        }
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(ParseErrors(errors))
    }
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>, errors: &mut Vec<ParseError>) {
    let name = dir.display().to_string();
    if depth > MAX_DIR_DEPTH {
        errors.push(ParseError::file(
            &name,
            format!("directories nested deeper than {MAX_DIR_DEPTH} levels"),
        ));
        return;
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(ParseError::file(&name, e.to_string()));
            return;
        }
    };
    for entry in entries {
        let path = match entry {
            Ok(e) => e.path(),
            Err(e) => {
                errors.push(ParseError::file(&name, e.to_string()));
                continue;
            }
        };
        if path.is_dir() {
            walk(&path, depth + 1, out, errors);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(path);
        }
    }
}
