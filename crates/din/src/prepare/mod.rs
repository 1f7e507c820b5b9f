//! `prepare`: raw behaviour logs to DIN samples, a config and a vocabulary.
//!
//! Raw ids of any kind are mapped to dense ids (0 is kept for padding). Two
//! protocols build the samples:
//!
//! * [`Protocol::NextItem`] (the DIN paper's): each user's behaviours sorted by
//!   time; every behaviour after the first is predicted from the earlier ones
//!   (positive), paired with an item the user never touched (negative, with its
//!   own category); each user's last behaviour is held out as test
//!   ([`PrepareOptions::test_per_user`] changes how many), the one before it
//!   validation ([`PrepareOptions::valid_per_user`]).
//! * [`Protocol::Rating`] (the paper's MovieLens setup): every rating is a
//!   sample, labelled positive when the rating is at least a threshold, with
//!   the history of earlier positives; each user's last ratings are test,
//!   the ones before them validation.
//!
//! A sample's history holds only behaviours strictly before it in time, so a
//! test sample never feeds a training history beyond its timestamp.

pub mod events;
mod samples;
mod writer;

pub use events::{read_log, read_movielens, Event, Log, LogSpec};
pub use samples::{build_samples, Sample, Samples, Vocab};
pub use writer::{
    prepare, write_prepared, PrepareReport, CONFIG_FILE, ITEMS_FILE, PARQUET_ROW_GROUP, TEST_FILE, TRAIN_FILE,
    VALID_FILE, VOCAB_FILE,
};

/// How samples are made from behaviours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Protocol {
    /// Next behaviour vs a sampled negative (the DIN paper).
    NextItem,
    /// Every rated item; positive when the value is at least `threshold`.
    Rating {
        /// Lowest positive value (4 for MovieLens, as in the paper).
        threshold: f32,
    },
}

/// How [`prepare`] writes the sample files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SampleFormat {
    /// Tab-separated text with a header (`train.tsv`, ...), histories as
    /// comma-separated ids.
    #[default]
    Tsv,
    /// Parquet (`train.parquet`, ...): an int64 column per id, `list<int64>`
    /// histories, an int8 label, snappy-compressed row groups of
    /// [`PARQUET_ROW_GROUP`] rows, so that streamed training
    /// (`data.window_rows`) reads them row group by row group.
    Parquet,
}

impl SampleFormat {
    /// The file of a split in this format: `train`, `valid` or `test` with
    /// this format's extension.
    pub fn file(self, split: &str) -> String {
        match self {
            SampleFormat::Tsv => format!("{split}.tsv"),
            SampleFormat::Parquet => format!("{split}.parquet"),
        }
    }
}

/// Options of [`prepare`].
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareOptions {
    /// The protocol.
    pub protocol: Protocol,
    /// Longest history kept (the most recent behaviours).
    pub max_len: usize,
    /// Seed of the negative sampler.
    pub seed: u64,
    /// Cut histories at a gap longer than this many days (a new session).
    pub session_gap_days: Option<f64>,
    /// Add `days_since_prev`: ln(1 + days since the most recent history
    /// behaviour), -1 when the history is empty.
    pub days_since_prev: bool,
    /// Only these behaviour types enter histories (all when `None`).
    pub history_behaviors: Option<Vec<String>>,
    /// Write each sample's history timestamps (`hist_time`) too.
    pub history_times: bool,
    /// Embedding width written into the generated config.
    pub embedding_dim: usize,
    /// Next-item protocol: only behaviours whose value (rating, label) is at
    /// least this are behaviours at all (in histories and as targets), as
    /// the paper and most papers build MovieLens histories from ratings >= 4.
    pub min_value: Option<f32>,
    /// Each user's last this many samples (by time) are held out as test.
    /// 1 is the paper's protocol; the rating protocol needs more, or every
    /// user's test samples have one label class and GAUC is undefined.
    pub test_per_user: usize,
    /// Each user's this many samples just before the test ones are held out
    /// as validation (`valid.tsv`): the generated config validates on them,
    /// stops early and keeps the best epoch. 0 writes no validation file; the
    /// config then validates on the test file and keeps the last epoch, as
    /// choosing an epoch on the test set would be choosing on the test set.
    pub valid_per_user: usize,
    /// Give the generated config a `user_id` embedding. Off by default, as
    /// for the next-item protocol: the user's history already says who they
    /// are, and a per-user embedding learned from a few hundred rows
    /// overfits. `din prepare` turns it on for the rating protocol, where it
    /// learns each user's rating level.
    pub user_feature: bool,
    /// Next-item protocol: sampled negatives per positive, each an item the
    /// user never touched, distinct, sharing the positive's history (a page
    /// view's candidates; see issue 13's common feature trick). 1, the
    /// paper's, by default.
    pub negatives: usize,
    /// Write the grouped layout: one line per run of samples with the same
    /// user side (user, profile, histories, time), the candidates' item,
    /// category and label joined by `|` (`input.layout = "grouped"`).
    pub grouped: bool,
    /// The sample files' format. Parquet has one sample per row: with
    /// `grouped`, the config sets `data.group = true` instead, which stores
    /// a run of rows sharing a user side once, as the grouped text layout does.
    pub format: SampleFormat,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            protocol: Protocol::NextItem,
            max_len: 50,
            seed: 2024,
            session_gap_days: None,
            days_since_prev: false,
            history_behaviors: None,
            history_times: false,
            embedding_dim: 8,
            min_value: None,
            test_per_user: 1,
            valid_per_user: 1,
            user_feature: false,
            negatives: 1,
            grouped: false,
            format: SampleFormat::Tsv,
        }
    }
}
