//! The feature schema and the run configuration.
//!
//! People write TOML (see `configs/movie_sample.toml`); a model directory keeps
//! the resolved configuration as JSON. [`Config::validate`] checks everything
//! once and returns a [`Layout`]: the resolved embedding tables and feature
//! indices that the data reader and the model work with.

mod config;
mod layout;

pub use config::{
    ActivationKind, AttentionConfig, Config, DataConfig, DenseFeature, DinPair, DnnConfig, EarlyStoppingConfig,
    InputConfig, InputFormat, InputLayout, Keep, ModelConfig, Monitor, Normalization, OnNonFinite, Oov, OptimizerKind,
    Pooling, RegularizationConfig, RegularizationKind, Schema, SequenceFeature, SequenceOrder, SparseFeature,
    TrainConfig, Truncation, DEFAULT_EMBEDDING_DIM,
};
pub use layout::{ItemFeature, Layout, SequenceSlot, SparseSlot, Table};
