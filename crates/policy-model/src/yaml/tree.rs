//! A YAML node tree with positions, built from `saphyr-parser` events under hard limits.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A 1-based line and column (columns count characters, not bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Position {
    fn from_span(span: &Span) -> Self {
        Position {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// An error in a YAML document or in how it is read: position, field path and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{position}: {}{message}", path_prefix(path))]
pub struct YamlError {
    /// Where the offending node (or the syntax error) is.
    pub position: Position,
    /// The field path, such as `spec.ingress[0].toPorts`; empty at the top level.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

impl YamlError {
    /// An error at `position` for the field at `path`.
    pub fn new(position: Position, path: impl Into<String>, message: impl Into<String>) -> Self {
        YamlError {
            position,
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Bounds that keep hostile input from exhausting memory or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted input, in bytes.
    pub max_input_bytes: usize,
    /// Deepest nesting of sequences and mappings.
    pub max_depth: usize,
    /// Most nodes in the whole stream, alias expansions included.
    pub max_nodes: usize,
    /// Most nodes that alias expansion may add (stops "billion laughs").
    pub max_alias_nodes: usize,
}

impl Default for Limits {
    /// 4 MiB, depth 64, 500 000 nodes, 10 000 nodes from aliases: far beyond any real policy.
    fn default() -> Self {
        Limits {
            max_input_bytes: 4 << 20,
            max_depth: 64,
            max_nodes: 500_000,
            max_alias_nodes: 10_000,
        }
    }
}

/// A scalar as written: its text and whether it was plain (unquoted) or quoted/block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar {
    /// The scalar's value after YAML unescaping and folding.
    pub value: String,
    /// `true` when written quoted, as a block scalar, or tagged `!!str`: always a string.
    pub quoted: bool,
}

/// What a scalar means under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScalarType {
    /// `null`, `~`, or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer (decimal, `0o` octal or `0x` hex); `None` if it does not fit an `i64`.
    Int(Option<i64>),
    /// A floating-point number.
    Float,
    /// Anything else, and every quoted scalar.
    String,
}

impl Scalar {
    /// Resolves the scalar's type with the YAML 1.2 core schema.
    pub fn resolve(&self) -> ScalarType {
        if self.quoted {
            return ScalarType::String;
        }
        resolve_plain(&self.value)
    }
}

fn resolve_plain(s: &str) -> ScalarType {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return ScalarType::Null,
        "true" | "True" | "TRUE" => return ScalarType::Bool(true),
        "false" | "False" | "FALSE" => return ScalarType::Bool(false),
        _ => {}
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if !oct.is_empty() && oct.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return ScalarType::Int(i64::from_str_radix(oct, 8).ok());
        }
        return ScalarType::String;
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return ScalarType::Int(i64::from_str_radix(hex, 16).ok());
        }
        return ScalarType::String;
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return ScalarType::Int(s.parse::<i64>().ok());
    }
    if is_float(s) {
        return ScalarType::Float;
    }
    ScalarType::String
}

fn is_float(s: &str) -> bool {
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    if matches!(body, ".inf" | ".Inf" | ".INF") || matches!(s, ".nan" | ".NaN" | ".NAN") {
        return true;
    }
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (mantissa, None),
    };
    let all_digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match frac {
        // `.5`, `1.`, `1.5`
        Some(f) => all_digits(int) && all_digits(f) && !(int.is_empty() && f.is_empty()),
        None => !int.is_empty() && all_digits(int),
    };
    let exponent_ok = match exponent {
        Some(e) => {
            let e = e.strip_prefix(['-', '+']).unwrap_or(e);
            !e.is_empty() && all_digits(e)
        }
        None => true,
    };
    mantissa_ok && exponent_ok && (frac.is_some() || exponent.is_some())
}

/// The shape of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A scalar.
    Scalar(Scalar),
    /// A sequence (list).
    Sequence(Vec<Node>),
    /// A mapping, in document order; keys are unique.
    Mapping(Vec<(Node, Node)>),
}

/// One YAML node and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The node's content.
    pub kind: NodeKind,
    /// Where the node starts.
    pub position: Position,
}

impl Node {
    /// Whether the node is a null scalar (`null`, `~`, or empty).
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar(s) if s.resolve() == ScalarType::Null)
    }

    /// The scalar, if the node is one.
    pub fn as_scalar(&self) -> Option<&Scalar> {
        match &self.kind {
            NodeKind::Scalar(s) => Some(s),
            _ => None,
        }
    }

    /// What the node is, with an article, for messages: `a string`, `a list`, `null`...
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar(s) => match s.resolve() {
                ScalarType::Null => "null",
                ScalarType::Bool(_) => "a boolean",
                ScalarType::Int(_) | ScalarType::Float => "a number",
                ScalarType::String => "a string",
            },
            NodeKind::Sequence(_) => "a list",
            NodeKind::Mapping(_) => "a mapping",
        }
    }
}

/// Parses a (multi-document) YAML stream with the default [`Limits`].
///
/// Every document becomes one root [`Node`]; an empty document is a null scalar. Duplicate
/// mapping keys are an error, and aliases are expanded (within the alias budget).
pub fn parse_documents(text: &str) -> Result<Vec<Node>, YamlError> {
    parse_documents_with_limits(text, &Limits::default())
}

/// Like [`parse_documents`], with explicit limits.
pub fn parse_documents_with_limits(text: &str, limits: &Limits) -> Result<Vec<Node>, YamlError> {
    if text.len() > limits.max_input_bytes {
        return Err(YamlError::new(
            Position { line: 1, column: 1 },
            "",
            format!(
                "input is {} bytes, more than the limit of {}",
                text.len(),
                limits.max_input_bytes
            ),
        ));
    }
    Builder::new(limits).run(text)
}

/// A collection being built.
struct Frame {
    position: Position,
    anchor: usize,
    /// Nodes in this subtree so far, the collection itself included.
    count: usize,
    content: FrameContent,
}

enum FrameContent {
    Sequence(Vec<Node>),
    Mapping {
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
        seen: HashSet<String>,
    },
}

struct Builder<'l> {
    limits: &'l Limits,
    stack: Vec<Frame>,
    documents: Vec<Node>,
    root: Option<Node>,
    /// Finished anchored nodes, with their subtree sizes.
    anchors: BTreeMap<usize, (Node, usize)>,
    nodes: usize,
    alias_nodes: usize,
}

impl<'l> Builder<'l> {
    fn new(limits: &'l Limits) -> Self {
        Builder {
            limits,
            stack: Vec::new(),
            documents: Vec::new(),
            root: None,
            anchors: BTreeMap::new(),
            nodes: 0,
            alias_nodes: 0,
        }
    }

    fn run(mut self, text: &str) -> Result<Vec<Node>, YamlError> {
        let mut parser = Parser::new_from_str(text);
        while let Some(event) = parser.next_event() {
            let (event, span) = event.map_err(|e| {
                YamlError::new(
                    Position {
                        line: e.marker().line(),
                        column: e.marker().col() + 1,
                    },
                    "",
                    e.info().to_string(),
                )
            })?;
            let position = Position::from_span(&span);
            match event {
                Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
                Event::DocumentStart(_) => {
                    self.root = None;
                    self.anchors.clear();
                }
                Event::DocumentEnd => {
                    let root = self.root.take().unwrap_or(Node {
                        kind: NodeKind::Scalar(Scalar {
                            value: String::new(),
                            quoted: false,
                        }),
                        position,
                    });
                    self.documents.push(root);
                }
                Event::Scalar(value, style, anchor, tag) => {
                    self.count(1, position)?;
                    let is_str_tag = tag
                        .as_ref()
                        .is_some_and(|t| t.handle == "tag:yaml.org,2002:" && t.suffix == "str");
                    let node = Node {
                        kind: NodeKind::Scalar(Scalar {
                            value: value.into_owned(),
                            quoted: style != ScalarStyle::Plain || is_str_tag,
                        }),
                        position,
                    };
                    if anchor != 0 {
                        self.anchors.insert(anchor, (node.clone(), 1));
                    }
                    self.finish_node(node, 1)?;
                }
                Event::Alias(id) => {
                    let Some((node, size)) = self.anchors.get(&id) else {
                        return Err(self.error(position, "alias refers to an unknown anchor"));
                    };
                    let (node, size) = (node.clone(), *size);
                    self.alias_nodes = self.alias_nodes.saturating_add(size);
                    if self.alias_nodes > self.limits.max_alias_nodes {
                        return Err(self.error(
                            position,
                            format!(
                                "aliases expand to more than {} nodes",
                                self.limits.max_alias_nodes
                            ),
                        ));
                    }
                    self.count(size, position)?;
                    self.finish_node(node, size)?;
                }
                Event::SequenceStart(anchor, _) => {
                    self.open(position, anchor, FrameContent::Sequence(Vec::new()))?;
                }
                Event::MappingStart(anchor, _) => {
                    self.open(
                        position,
                        anchor,
                        FrameContent::Mapping {
                            entries: Vec::new(),
                            pending_key: None,
                            seen: HashSet::new(),
                        },
                    )?;
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    let Some(frame) = self.stack.pop() else {
                        return Err(self.error(position, "unbalanced collection end"));
                    };
                    let kind = match frame.content {
                        FrameContent::Sequence(items) => NodeKind::Sequence(items),
                        FrameContent::Mapping { entries, .. } => NodeKind::Mapping(entries),
                    };
                    let node = Node {
                        kind,
                        position: frame.position,
                    };
                    if frame.anchor != 0 {
                        self.anchors
                            .insert(frame.anchor, (node.clone(), frame.count));
                    }
                    self.finish_node(node, frame.count)?;
                }
            }
        }
        Ok(self.documents)
    }

    fn count(&mut self, n: usize, position: Position) -> Result<(), YamlError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > self.limits.max_nodes {
            return Err(self.error(
                position,
                format!("more than {} YAML nodes", self.limits.max_nodes),
            ));
        }
        Ok(())
    }

    fn open(
        &mut self,
        position: Position,
        anchor: usize,
        content: FrameContent,
    ) -> Result<(), YamlError> {
        if self.stack.len() >= self.limits.max_depth {
            return Err(self.error(
                position,
                format!("nesting deeper than {} levels", self.limits.max_depth),
            ));
        }
        self.count(1, position)?;
        self.stack.push(Frame {
            position,
            anchor,
            count: 1,
            content,
        });
        Ok(())
    }

    /// Attaches a finished node to its parent (or makes it the document root).
    fn finish_node(&mut self, node: Node, size: usize) -> Result<(), YamlError> {
        let duplicate = match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                return Ok(());
            }
            Some(frame) => {
                frame.count = frame.count.saturating_add(size);
                match &mut frame.content {
                    FrameContent::Sequence(items) => {
                        items.push(node);
                        None
                    }
                    FrameContent::Mapping {
                        entries,
                        pending_key,
                        seen,
                    } => match pending_key.take() {
                        Some(key) => {
                            entries.push((key, node));
                            None
                        }
                        None => {
                            let dup = match &node.kind {
                                NodeKind::Scalar(s) if !seen.insert(s.value.clone()) => {
                                    Some((node.position, s.value.clone()))
                                }
                                _ => None,
                            };
                            *pending_key = Some(node);
                            dup
                        }
                    },
                }
            }
        };
        match duplicate {
            Some((position, key)) => Err(self.error(position, format!("duplicate key {key:?}"))),
            None => Ok(()),
        }
    }

    /// An error whose path is where the builder currently is.
    fn error(&self, position: Position, message: impl Into<String>) -> YamlError {
        let mut path = String::new();
        for frame in &self.stack {
            match &frame.content {
                FrameContent::Sequence(items) => path.push_str(&format!("[{}]", items.len())),
                FrameContent::Mapping { pending_key, .. } => {
                    if let Some(NodeKind::Scalar(k)) = pending_key.as_ref().map(|k| &k.kind) {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(&k.value);
                    }
                }
            }
        }
        YamlError::new(position, path, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(n: &Node) -> &str {
        n.as_scalar()
            .map(|s| s.value.as_str())
            .unwrap_or("<not a scalar>")
    }

    #[test]
    fn documents_positions_and_comments() {
        let docs =
            parse_documents("# コメント\na: 1 # 日本語\nb:\n  - x\n  - 'y'\n---\n---\nc: {d: e}\n")
                .unwrap();
        assert_eq!(docs.len(), 3);
        let NodeKind::Mapping(m) = &docs[0].kind else {
            panic!("not a mapping")
        };
        assert_eq!(scalar(&m[0].0), "a");
        assert_eq!(m[0].0.position, Position { line: 2, column: 1 });
        assert_eq!(m[0].1.position, Position { line: 2, column: 4 });
        let NodeKind::Sequence(items) = &m[1].1.kind else {
            panic!("not a list")
        };
        assert_eq!(items[1].position, Position { line: 5, column: 5 });
        assert!(items[1].as_scalar().unwrap().quoted);
        assert!(!items[0].as_scalar().unwrap().quoted);
        assert!(docs[1].is_null());
        assert!(parse_documents("").unwrap().is_empty());
        assert!(parse_documents("# only a comment\n").unwrap().is_empty());
    }

    #[test]
    fn core_schema() {
        let t = |s: &str| resolve_plain(s);
        assert_eq!(t("~"), ScalarType::Null);
        assert_eq!(t("True"), ScalarType::Bool(true));
        assert_eq!(t("yes"), ScalarType::String);
        assert_eq!(t("80"), ScalarType::Int(Some(80)));
        assert_eq!(t("-3"), ScalarType::Int(Some(-3)));
        assert_eq!(t("0x1F"), ScalarType::Int(Some(31)));
        assert_eq!(t("0o17"), ScalarType::Int(Some(15)));
        assert_eq!(t("1.5"), ScalarType::Float);
        assert_eq!(t("1e3"), ScalarType::Float);
        assert_eq!(t(".inf"), ScalarType::Float);
        assert_eq!(t("1.2.3"), ScalarType::String);
        assert_eq!(t("."), ScalarType::String);
        assert_eq!(t("10.0.0.0/8"), ScalarType::String);
        assert_eq!(t("99999999999999999999"), ScalarType::Int(None));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse_documents("a:\n  b: 1\n  b: 2\n").unwrap_err();
        assert_eq!(e.to_string(), "3:3: a.b: duplicate key \"b\"");
    }

    #[test]
    fn limits() {
        let deep = "[".repeat(100) + &"]".repeat(100);
        let e = parse_documents(&deep).unwrap_err();
        assert!(e.message.contains("nesting deeper than 64"), "{e}");

        let laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n\
                      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n\
                      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n";
        let e = parse_documents(laughs).unwrap_err();
        assert!(e.message.contains("aliases expand"), "{e}");

        let small = Limits {
            max_input_bytes: 4,
            ..Limits::default()
        };
        assert!(parse_documents_with_limits("a: bc", &small).is_err());
        let few = Limits {
            max_nodes: 3,
            ..Limits::default()
        };
        assert!(parse_documents_with_limits("[1, 2, 3]", &few).is_err());
    }

    #[test]
    fn aliases_expand() {
        let docs = parse_documents("a: &x {k: v}\nb: *x\n").unwrap();
        let NodeKind::Mapping(m) = &docs[0].kind else {
            panic!("not a mapping")
        };
        assert_eq!(m[0].1.kind, m[1].1.kind);
        assert!(parse_documents("a: *nope\n").is_err());
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse_documents("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.position.line >= 1, "{e}");
        assert!(parse_documents("a: 'unterminated\n").is_err());
    }
}
