//! Parse errors with file, line, column and field path.

use std::fmt;

use crate::model::SourceLocation;
use crate::yaml::YamlError;

/// One problem in a policy file.
///
/// Displays as `file:line:col: path: message`, for example
/// `api.yaml:14:11: spec.ingress[0].toPorts[0].ports[0].port: "80800" is not a port number or name`.
/// Errors that concern a whole file (I/O) have line 0 and display as `file: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// Where the offending node is.
    pub location: SourceLocation,
    /// The field path, such as `spec.ingress[0]`; empty for problems with the document itself.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ParseError {
    pub(crate) fn from_yaml(file: &str, e: YamlError) -> Self {
        ParseError {
            location: SourceLocation {
                file: file.to_string(),
                line: e.position.line,
                column: e.position.column,
            },
            path: e.path,
            message: e.message,
        }
    }

    pub(crate) fn file(file: &str, message: impl Into<String>) -> Self {
        ParseError {
            location: SourceLocation {
                file: file.to_string(),
                line: 0,
                column: 0,
            },
            path: String::new(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.line == 0 {
            write!(f, "{}: ", self.location.file)?;
        } else {
            write!(f, "{}: ", self.location)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a set of policy files, in file and position order. Any error rejects
/// the file it is in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseErrors(pub Vec<ParseError>);

impl fmt::Display for ParseErrors {
    /// One error per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
