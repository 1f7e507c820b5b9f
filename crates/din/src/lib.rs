//! # din: the Deep Interest Network for click-through-rate prediction
//!
//! A Rust implementation of DIN (Zhou et al., KDD 2018). The modules follow the
//! data flow:
//!
//! ```text
//! schema -> data -> model -> train -> metrics -> checkpoint -> scorer
//! ```
//!
//! * [`prepare`]: raw behaviour logs to DIN samples, a config and a vocabulary.
//! * [`schema`]: the feature schema and the run configuration (TOML for people,
//!   JSON inside a model directory), validated once.
//! * [`data`]: delimited readers that turn files into columnar [`data::Dataset`]s
//!   with ragged (unpadded) behaviour histories.
//! * [`model`]: embeddings, the local activation unit, the DNN tower, each with an
//!   explicit forward and backward over one GEMM crate.
//! * [`train`]: loss, optimizers, regularisation and the training loop.
//! * [`metrics`]: logloss, AUC, GAUC and RelaImpr.
//! * [`distributed`]: data-parallel training over several processes with
//!   sharded embedding tables, over a small collective-communication trait.
//! * [`checkpoint`]: the model directory (`config.json` + `model.safetensors`),
//!   written atomically.
//! * [`scorer`]: inference: a loaded model that predicts, evaluates and
//!   scores requests in raw ids (what `din serve` runs).
//! * [`export`]: the inference graph as ONNX.
//! * [`threads`]: the worker pool.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod distributed;
pub mod error;
pub mod export;
pub mod metrics;
pub mod model;
pub mod prepare;
pub mod schema;
pub mod scorer;
pub mod threads;
pub mod train;

pub use error::{Error, Result};
