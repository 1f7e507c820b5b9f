//! The library's one error type.

use std::path::PathBuf;

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library. Messages name the file, line,
/// field or column, and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written. The OS error is the
    /// source (not repeated in this message; print the error chain).
    #[error("{}: {action}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("cannot open", "cannot write", ...).
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A configuration value is invalid.
    #[error("config: field `{field}`: {reason} (value: {value})")]
    Config {
        /// Dotted path of the field, e.g. `schema.sparse[2].embedding_dim`.
        field: String,
        /// The bad value as written.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A configuration file is not valid TOML or JSON for the config structure.
    #[error("{}: invalid config: {message}", path.display())]
    ConfigSyntax {
        /// The config file.
        path: PathBuf,
        /// The parser's message (includes line and column where known).
        message: String,
    },
    /// A data file holds no data rows.
    #[error("{}: the file holds no data rows", path.display())]
    EmptyFile {
        /// The data file.
        path: PathBuf,
    },
    /// A data row has the wrong number of columns.
    #[error("{}:{line}: expected {expected} columns, found {found}", path.display())]
    RowLength {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Number of columns the schema expects.
        expected: usize,
        /// Number of columns in the row.
        found: usize,
    },
    /// A column needed by the schema is missing from the file's header.
    #[error("{}: column `{column}` is required by the schema but not in the header (header: {header})", path.display())]
    MissingColumn {
        /// The data file.
        path: PathBuf,
        /// The missing column.
        column: String,
        /// The header that was found.
        header: String,
    },
    /// Columns a behaviour log needs are missing from its header: all of
    /// them at once, each with its role (`user`, `item`, `category`, `time`,
    /// `behavior`, `label`).
    #[error("{}: the log has no column {} (its columns: {header})", path.display(), missing.iter().map(|(role, c)| format!("`{c}` (the {role} column)")).collect::<Vec<_>>().join(", "))]
    MissingLogColumns {
        /// The log file.
        path: PathBuf,
        /// (role, column name) of each missing column.
        missing: Vec<(&'static str, String)>,
        /// The columns the log has.
        header: String,
    },
    /// A value could not be parsed.
    #[error("{}:{line}: column `{column}`: {reason}: {value:?}", path.display())]
    Parse {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Column (feature) name.
        column: String,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An id is at or above its embedding table's vocabulary size.
    #[error("{}:{line}: column `{column}`: id {id} is at or above the vocabulary size {vocab_size} of embedding table `{table}` (its oov policy is \"error\"; use oov = \"reserved\" to map unseen ids to a reserved row)", path.display())]
    OutOfVocabulary {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Column (feature) name.
        column: String,
        /// The id.
        id: u64,
        /// The table's vocabulary size.
        vocab_size: usize,
        /// The table (the feature that owns it).
        table: String,
    },
    /// The delimited-file parser failed (e.g. invalid UTF-8 or quoting).
    #[error("{}:{line}: {message}", path.display())]
    Csv {
        /// The data file.
        path: PathBuf,
        /// 1-based line number (0 if unknown).
        line: u64,
        /// The parser's message.
        message: String,
    },
    /// A model directory is incomplete or inconsistent.
    #[error("{}: {reason}", path.display())]
    Checkpoint {
        /// The file in the model directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A scoring request is invalid (the server answers 400 with it).
    #[error("field `{field}`: {reason}")]
    Request {
        /// Where in the request, e.g. `candidates[3].item_id` or `user.hist_item_id[7]`.
        field: String,
        /// What is wrong, with the bad value.
        reason: String,
    },
    /// More malformed rows than `data.max_bad_rows_fraction` allows.
    #[error("{}: {skipped} of {total} rows are malformed, more than data.max_bad_rows_fraction = {limit} allows; the first, {first}", path.display())]
    TooManyBadRows {
        /// The data file.
        path: PathBuf,
        /// Malformed rows.
        skipped: usize,
        /// All data rows, malformed or not.
        total: usize,
        /// The allowed fraction.
        limit: f64,
        /// The first malformed row and its error.
        first: String,
    },
    /// Training cannot proceed (e.g. the loss became NaN).
    #[error("training: {0}")]
    Training(String),
    /// Distributed training: a setting it does not support, a collective
    /// that failed, or another rank that stopped.
    #[error("distributed training: {0}")]
    Distributed(String),
    /// A model cannot be exported in the format asked for.
    #[error("export: {0}")]
    Export(String),
}

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(field: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Request`].
    pub fn request(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Request {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }
}
