//! Config errors that point at the place in the file.

use std::{fmt, io, path::PathBuf};

/// One problem in a config file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    pub message: String,
}

impl Diagnostic {
    /// Builds a diagnostic for the byte offset `offset` of `source`.
    pub(crate) fn at(file: PathBuf, source: &str, offset: usize, message: String) -> Self {
        let offset = offset.min(source.len());
        let before = &source[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = source[line_start..offset].chars().count() + 1;
        Diagnostic {
            file,
            line,
            column,
            message,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Why a config could not be used. Nothing is applied when any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (the I/O error is part of the message, not a separate source,
    /// so one-line reports do not repeat it).
    #[error("{}: cannot read config: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    /// One or more problems, each with its position; displayed one per line.
    #[error("{}", DisplayAll(.0))]
    Invalid(Vec<Diagnostic>),
}

struct DisplayAll<'a>(&'a [Diagnostic]);

impl fmt::Display for DisplayAll<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_one_based_line_and_character_column() {
        let source = "a = 1\nbé = x\n";
        let offset = source.find('x').unwrap();
        let d = Diagnostic::at("f.toml".into(), source, offset, "bad".into());
        assert_eq!((d.line, d.column), (2, 6));
        assert_eq!(d.to_string(), "f.toml:2:6: bad");
    }
}
