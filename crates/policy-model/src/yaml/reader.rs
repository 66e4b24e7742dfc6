//! Typed, path-tracking access to a [`Node`] tree for strict parsers.

use super::tree::{Node, NodeKind, ScalarType, YamlError};

/// Joins a field name onto a path: `spec` + `ingress` = `spec.ingress`.
pub fn join_field(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// One node together with its field path, for typed reads with good errors.
#[derive(Debug, Clone)]
pub struct Field<'a> {
    /// The node.
    pub node: &'a Node,
    /// Its path, such as `spec.ingress[0]`.
    pub path: String,
}

impl<'a> Field<'a> {
    /// A field for a node at a path.
    pub fn new(node: &'a Node, path: impl Into<String>) -> Self {
        Field {
            node,
            path: path.into(),
        }
    }

    /// An error at this node.
    pub fn error(&self, message: impl Into<String>) -> YamlError {
        YamlError::new(self.node.position, self.path.clone(), message)
    }

    fn expected(&self, what: &str) -> YamlError {
        self.error(format!("expected {what}, found {}", self.node.type_name()))
    }

    /// The value of a string scalar (quoted, or plain that is not null/bool/number).
    pub fn str(&self) -> Result<&'a str, YamlError> {
        match &self.node.kind {
            NodeKind::Scalar(s) if s.resolve() == ScalarType::String => Ok(&s.value),
            _ => Err(self.expected("a string")),
        }
    }

    /// The text of any non-null scalar, for fields that take a number or a string (ports).
    pub fn scalar_text(&self) -> Result<&'a str, YamlError> {
        match &self.node.kind {
            NodeKind::Scalar(s) if s.resolve() != ScalarType::Null => Ok(&s.value),
            _ => Err(self.expected("a string or number")),
        }
    }

    /// A boolean (`true`/`false`).
    pub fn bool(&self) -> Result<bool, YamlError> {
        match &self.node.kind {
            NodeKind::Scalar(s) => match s.resolve() {
                ScalarType::Bool(b) => Ok(b),
                _ => Err(self.expected("a boolean")),
            },
            _ => Err(self.expected("a boolean")),
        }
    }

    /// An integer scalar.
    pub fn int(&self) -> Result<i64, YamlError> {
        match &self.node.kind {
            NodeKind::Scalar(s) => match s.resolve() {
                ScalarType::Int(Some(i)) => Ok(i),
                ScalarType::Int(None) => Err(self.error(format!("{} is out of range", s.value))),
                _ => Err(self.expected("an integer")),
            },
            _ => Err(self.expected("an integer")),
        }
    }

    /// The items of a list, each with its path (`path[i]`). A null is an empty list.
    pub fn list(&self) -> Result<Vec<Field<'a>>, YamlError> {
        match &self.node.kind {
            NodeKind::Sequence(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, n)| Field::new(n, format!("{}[{i}]", self.path)))
                .collect()),
            _ if self.node.is_null() => Ok(Vec::new()),
            _ => Err(self.expected("a list")),
        }
    }

    /// A reader over a mapping. A null is an empty mapping.
    pub fn map(&self) -> Result<MapReader<'a>, YamlError> {
        MapReader::new(self.node, self.path.clone())
    }

    /// A mapping of strings to strings (such as `matchLabels`), in document order.
    pub fn string_map(&self) -> Result<Vec<(Field<'a>, Field<'a>)>, YamlError> {
        let NodeKind::Mapping(entries) = &self.node.kind else {
            if self.node.is_null() {
                return Ok(Vec::new());
            }
            return Err(self.expected("a mapping"));
        };
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let key = Field::new(k, self.path.clone());
            let name = key.str()?;
            let value = Field::new(v, join_field(&self.path, name));
            value.str()?;
            out.push((key, value));
        }
        Ok(out)
    }
}

/// Reads a mapping field by field and reports every key that was not taken.
///
/// ```
/// use weir_policy_model::yaml::{parse_documents, MapReader};
/// let docs = parse_documents("name: web\nreplicas: 3\nextra: 1\n").unwrap();
/// let mut m = MapReader::new(&docs[0], "").unwrap();
/// assert_eq!(m.required("name").unwrap().str().unwrap(), "web");
/// assert_eq!(m.optional("replicas").unwrap().int().unwrap(), 3);
/// let unknown = m.finish();
/// assert_eq!(unknown[0].to_string(), "3:1: extra: unknown field");
/// ```
#[derive(Debug)]
pub struct MapReader<'a> {
    node: &'a Node,
    path: String,
    entries: &'a [(Node, Node)],
    used: Vec<bool>,
}

impl<'a> MapReader<'a> {
    /// A reader over `node`, which must be a mapping (or null, read as empty).
    pub fn new(node: &'a Node, path: impl Into<String>) -> Result<Self, YamlError> {
        let path = path.into();
        let entries: &'a [(Node, Node)] = match &node.kind {
            NodeKind::Mapping(e) => e,
            _ if node.is_null() => &[],
            _ => {
                return Err(YamlError::new(
                    node.position,
                    path,
                    format!("expected a mapping, found {}", node.type_name()),
                ));
            }
        };
        Ok(MapReader {
            node,
            path,
            used: vec![false; entries.len()],
            entries,
        })
    }

    /// The mapping's own path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The mapping node.
    pub fn node(&self) -> &'a Node {
        self.node
    }

    /// An error at the mapping itself.
    pub fn error(&self, message: impl Into<String>) -> YamlError {
        YamlError::new(self.node.position, self.path.clone(), message)
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|(k, _)| {
            matches!(&k.kind, NodeKind::Scalar(s) if s.value == name
                && s.resolve() == ScalarType::String)
        })
    }

    /// Whether the field is present and not null (does not take it).
    pub fn has(&self, name: &str) -> bool {
        self.find(name)
            .and_then(|i| self.entries.get(i))
            .is_some_and(|(_, v)| !v.is_null())
    }

    /// Takes a field; `None` when it is absent or null (as Kubernetes reads null).
    pub fn optional(&mut self, name: &str) -> Option<Field<'a>> {
        let i = self.find(name)?;
        if let Some(u) = self.used.get_mut(i) {
            *u = true;
        }
        let entries: &'a [(Node, Node)] = self.entries;
        let (_, v) = entries.get(i)?;
        if v.is_null() {
            return None;
        }
        Some(Field::new(v, join_field(&self.path, name)))
    }

    /// Takes a field that must be present and not null.
    pub fn required(&mut self, name: &str) -> Result<Field<'a>, YamlError> {
        self.optional(name).ok_or_else(|| {
            YamlError::new(
                self.node.position,
                join_field(&self.path, name),
                "required field is missing",
            )
        })
    }

    /// Takes a field and discards it (fields that are accepted but have no effect).
    pub fn ignore(&mut self, name: &str) {
        let _ = self.optional(name);
    }

    /// Takes each named field that is present and returns an error for it saying Weir does not
    /// support it.
    pub fn unsupported(&mut self, names: &[&str]) -> Vec<YamlError> {
        let mut errors = Vec::new();
        for name in names {
            if let Some(i) = self.find(name) {
                if let Some(u) = self.used.get_mut(i) {
                    *u = true;
                }
                if let Some((k, _)) = self.entries.get(i) {
                    errors.push(YamlError::new(
                        k.position,
                        join_field(&self.path, name),
                        "is not supported by Weir",
                    ));
                }
            }
        }
        errors
    }

    /// Ends reading: one "unknown field" error per key that was not taken.
    pub fn finish(self) -> Vec<YamlError> {
        self.entries
            .iter()
            .zip(&self.used)
            .filter(|(_, used)| !**used)
            .map(|((k, _), _)| match &k.kind {
                NodeKind::Scalar(s) => YamlError::new(
                    k.position,
                    join_field(&self.path, &s.value),
                    "unknown field",
                ),
                _ => YamlError::new(
                    k.position,
                    self.path.clone(),
                    format!(
                        "unknown field: expected a string key, found {}",
                        k.type_name()
                    ),
                ),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse_documents;

    #[test]
    fn typed_reads_and_paths() {
        let docs = parse_documents("spec:\n  ports: '80'\n  list: [a, 2]\n  flag: true\n  n: ~\n")
            .unwrap();
        let mut top = MapReader::new(&docs[0], "").unwrap();
        let mut spec = top.required("spec").unwrap().map().unwrap();
        let ports = spec.required("ports").unwrap();
        let e = ports.list().unwrap_err();
        assert_eq!(
            e.to_string(),
            "2:10: spec.ports: expected a list, found a string"
        );
        let list = spec.required("list").unwrap().list().unwrap();
        assert_eq!(list[0].str().unwrap(), "a");
        assert_eq!(
            list[1].str().unwrap_err().to_string(),
            "3:13: spec.list[1]: expected a string, found a number"
        );
        assert_eq!(list[1].scalar_text().unwrap(), "2");
        assert!(spec.required("flag").unwrap().bool().unwrap());
        assert!(spec.optional("n").is_none());
        assert_eq!(
            spec.required("missing").unwrap_err().to_string(),
            "2:3: spec.missing: required field is missing"
        );
        assert!(spec.finish().is_empty());
        assert!(top.finish().is_empty());
    }

    #[test]
    fn unsupported_and_unknown() {
        let docs = parse_documents("a: 1\ntoServices: []\nzzz: 2\n").unwrap();
        let mut m = MapReader::new(&docs[0], "spec").unwrap();
        m.ignore("a");
        let u = m.unsupported(&["toServices", "toGroups"]);
        assert_eq!(
            u[0].to_string(),
            "2:1: spec.toServices: is not supported by Weir"
        );
        let rest = m.finish();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].to_string(), "3:1: spec.zzz: unknown field");
    }
}
