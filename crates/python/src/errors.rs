//! din's errors as Python exceptions, worded for arrays rather than files:
//! a data error names the container, the feature, the row (0-based, as
//! numpy counts) and the value.

use pyo3::exceptions::{PyFloatingPointError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// The exception for `e`: data and config errors are `ValueError`, file
/// errors `OSError`, a loss or gradient that is not finite
/// `FloatingPointError`, anything else `RuntimeError`.
pub fn to_py(e: din::Error) -> PyErr {
    use din::Error as E;
    let row = |line: u64| line.saturating_sub(1);
    match e {
        E::Parse {
            path,
            line,
            column,
            value,
            reason,
        } => PyValueError::new_err(format!(
            "{}['{column}'] row {}: {reason} (value: {value})",
            path.display(),
            row(line)
        )),
        E::OutOfVocabulary {
            path,
            line,
            column,
            id,
            vocab_size,
            table,
        } => PyValueError::new_err(format!(
            "{}['{column}'] row {}: id {id} is out of range: the embedding table `{table}` has vocabulary_size {vocab_size} (ids 0 to {})",
            path.display(),
            row(line),
            vocab_size.saturating_sub(1)
        )),
        E::MissingColumn { path, column, .. } => {
            PyValueError::new_err(format!("{} has no column '{column}'", path.display()))
        }
        E::EmptyFile { path } => PyValueError::new_err(format!("{} holds no samples", path.display())),
        e @ E::Io { .. } => {
            let source = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
            PyOSError::new_err(format!("{e}{source}"))
        }
        E::Training(m) if m.contains("not finite") || m.contains("NaN") => {
            PyFloatingPointError::new_err(format!("training: {m}"))
        }
        e @ (E::Config { .. } | E::ConfigSyntax { .. } | E::Request { .. } | E::Checkpoint { .. }) => {
            PyValueError::new_err(e.to_string())
        }
        e => PyRuntimeError::new_err(e.to_string()),
    }
}
