//! Validation of a [`Config`] into a resolved [`Layout`].

use std::collections::{HashMap, HashSet};

use super::config::{single_byte, Config, Oov, SequenceOrder, Truncation, DEFAULT_EMBEDDING_DIM};
use crate::{Error, Result};

/// One embedding table, owned by the feature that does not share.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Name of the owning feature; the tensor is `embeddings.<name>.weight`.
    pub name: String,
    /// Embedding width.
    pub dim: usize,
    /// Number of ids; `None` until inferred from training data.
    pub vocab_size: Option<usize>,
    /// Out-of-vocabulary policy.
    pub oov: Oov,
}

impl Table {
    /// Rows of the table: the vocabulary, plus one reserved row under `Oov::Reserved`.
    pub fn rows(&self) -> usize {
        self.vocab_size.unwrap_or(0) + usize::from(self.oov == Oov::Reserved)
    }
}

/// A sparse feature resolved to its table.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseSlot {
    /// Column name.
    pub name: String,
    /// Index into [`Layout::tables`].
    pub table: usize,
}

/// A sequence feature resolved to its table.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceSlot {
    /// Column name.
    pub name: String,
    /// Index into [`Layout::tables`].
    pub table: usize,
    /// Longest history kept.
    pub max_len: usize,
    /// Order in the file.
    pub order: SequenceOrder,
    /// Which end to keep.
    pub truncation: Truncation,
}

/// The validated, resolved view of a [`Config`]'s schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Embedding tables.
    pub tables: Vec<Table>,
    /// Sparse features, in schema order.
    pub sparse: Vec<SparseSlot>,
    /// Dense features: (name, dim), in schema order.
    pub dense: Vec<(String, usize)>,
    /// Sequence features, in schema order.
    pub sequences: Vec<SequenceSlot>,
    /// DIN pairs as (index into `sparse`, index into `sequences`).
    pub pairs: Vec<(usize, usize)>,
    /// Label column.
    pub label: String,
    /// User column for GAUC.
    pub user: Option<String>,
    /// Features that are a function of an item (`item_feature_of`).
    pub item_features: Vec<ItemFeature>,
}

/// A sparse feature that is a function of another (the item): its value,
/// and that of the history paired with it, follow from the item's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemFeature {
    /// The feature (index into [`Layout::sparse`]), e.g. `cate_id`.
    pub feature: usize,
    /// The item it is a function of (index into [`Layout::sparse`]), e.g. `item_id`.
    pub key: usize,
    /// When both are DIN targets: (the feature's history, the item's
    /// history), indices into [`Layout::sequences`], e.g.
    /// (`hist_cate_id`, `hist_item_id`). The first follows from the second
    /// position by position.
    pub history: Option<(usize, usize)>,
}

impl Layout {
    /// Width of the attention query (and of each key): the pairs' dims summed.
    pub fn query_dim(&self) -> usize {
        self.pairs
            .iter()
            .map(|&(s, _)| self.tables[self.sparse[s].table].dim)
            .sum()
    }

    /// Sequences that are not in a DIN pair (mean-pooled).
    pub fn unpaired_sequences(&self) -> Vec<usize> {
        (0..self.sequences.len())
            .filter(|i| !self.pairs.iter().any(|&(_, h)| h == *i))
            .collect()
    }

    /// Width of the DNN input: all sparse embeddings, dense values, the
    /// attention-pooled history and the mean-pooled unpaired sequences.
    pub fn dnn_input_dim(&self) -> usize {
        let sparse: usize = self.sparse.iter().map(|s| self.tables[s.table].dim).sum();
        let dense: usize = self.dense.iter().map(|d| d.1).sum();
        let unpaired: usize = self
            .unpaired_sequences()
            .iter()
            .map(|&i| self.tables[self.sequences[i].table].dim)
            .sum();
        sparse + dense + self.query_dim() + unpaired
    }
}

impl Config {
    /// Checks every field once and resolves the schema. Errors name the field
    /// and the bad value.
    pub fn validate(&self) -> Result<Layout> {
        self.validate_input()?;
        self.validate_model_and_train()?;
        let s = &self.schema;

        let mut names = HashSet::new();
        let all_names = s
            .sparse
            .iter()
            .map(|f| ("sparse", &f.name))
            .chain(s.dense.iter().map(|f| ("dense", &f.name)))
            .chain(s.sequence.iter().map(|f| ("sequence", &f.name)));
        for (i, (kind, name)) in all_names.enumerate() {
            if name.is_empty() {
                return Err(Error::config(
                    format!("schema.{kind}.name"),
                    "\"\"",
                    "feature names must not be empty",
                ));
            }
            if !names.insert(name.clone()) {
                return Err(Error::config(
                    format!("schema.{kind}.name"),
                    name,
                    format!("duplicate feature name (feature #{i})"),
                ));
            }
        }
        if names.contains(&s.label) {
            return Err(Error::config(
                "schema.label",
                &s.label,
                "the label column cannot also be a feature",
            ));
        }
        if s.label.is_empty() {
            return Err(Error::config("schema.label", "\"\"", "must name the label column"));
        }

        // Tables: owners first, in schema order (sparse, then sequences).
        let mut tables: Vec<Table> = Vec::new();
        let mut table_of: HashMap<&str, usize> = HashMap::new();
        let features = (s.sparse.iter().enumerate())
            .map(|(i, f)| {
                (
                    "sparse",
                    i,
                    &f.name,
                    &f.shares_embedding_with,
                    f.embedding_dim,
                    f.vocab_size,
                    f.oov,
                )
            })
            .chain((s.sequence.iter().enumerate()).map(|(i, f)| {
                (
                    "sequence",
                    i,
                    &f.name,
                    &f.shares_embedding_with,
                    f.embedding_dim,
                    f.vocab_size,
                    f.oov,
                )
            }));
        for (kind, i, name, shares, dim, vocab_size, oov) in features {
            if shares.is_none() {
                let (dim, field) = match (dim, s.embedding_dim) {
                    (Some(d), _) => (d, format!("schema.{kind}[{i}].embedding_dim")),
                    (None, Some(d)) => (d, "schema.embedding_dim".to_string()),
                    (None, None) => (DEFAULT_EMBEDDING_DIM, String::new()),
                };
                check_dim(&field, dim)?;
                check_vocab(&format!("schema.{kind}[{i}].vocab_size"), vocab_size)?;
                table_of.insert(name, tables.len());
                tables.push(Table {
                    name: name.clone(),
                    dim,
                    vocab_size,
                    oov,
                });
            }
        }
        let resolve = |field: String, owner: &str, dim: Option<usize>, vocab: Option<usize>| -> Result<usize> {
            let t = *table_of.get(owner).ok_or_else(|| {
                Error::config(&field, owner, "shares_embedding_with must name a feature that owns its embedding table (a sparse or sequence feature that does not share itself)")
            })?;
            if let Some(d) = dim {
                if d != tables[t].dim {
                    return Err(Error::config(
                        field.replace("shares_embedding_with", "embedding_dim"),
                        d,
                        format!(
                            "differs from the shared table `{owner}` (embedding_dim {}); leave it out",
                            tables[t].dim
                        ),
                    ));
                }
            }
            if let Some(v) = vocab {
                return Err(Error::config(
                    field.replace("shares_embedding_with", "vocab_size"),
                    v,
                    format!("a feature that shares table `{owner}` takes its vocabulary; set vocab_size on `{owner}`"),
                ));
            }
            Ok(t)
        };
        let mut sparse = Vec::new();
        for (i, f) in s.sparse.iter().enumerate() {
            let table = match &f.shares_embedding_with {
                None => table_of[f.name.as_str()],
                Some(owner) => resolve(
                    format!("schema.sparse[{i}].shares_embedding_with"),
                    owner,
                    f.embedding_dim,
                    f.vocab_size,
                )?,
            };
            sparse.push(SparseSlot {
                name: f.name.clone(),
                table,
            });
        }
        let mut sequences = Vec::new();
        for (i, f) in s.sequence.iter().enumerate() {
            if f.max_len == 0 {
                return Err(Error::config(
                    format!("schema.sequence[{i}].max_len"),
                    0,
                    "must be at least 1",
                ));
            }
            let table = match &f.shares_embedding_with {
                None => table_of[f.name.as_str()],
                Some(owner) => resolve(
                    format!("schema.sequence[{i}].shares_embedding_with"),
                    owner,
                    f.embedding_dim,
                    f.vocab_size,
                )?,
            };
            sequences.push(SequenceSlot {
                name: f.name.clone(),
                table,
                max_len: f.max_len,
                order: f.order,
                truncation: f.truncation,
            });
        }
        let mut dense = Vec::new();
        for (i, f) in s.dense.iter().enumerate() {
            if f.dim == 0 {
                return Err(Error::config(format!("schema.dense[{i}].dim"), 0, "must be at least 1"));
            }
            dense.push((f.name.clone(), f.dim));
        }

        if s.din_pairs.is_empty() {
            return Err(Error::config("schema.din_pairs", "[]", "DIN needs at least one target/history pair, e.g. { target = \"movie_id\", history = \"hist_movie_id\" }"));
        }
        let mut pairs = Vec::new();
        for (i, p) in s.din_pairs.iter().enumerate() {
            let t = sparse.iter().position(|x| x.name == p.target).ok_or_else(|| {
                Error::config(
                    format!("schema.din_pairs[{i}].target"),
                    &p.target,
                    "is not a sparse feature",
                )
            })?;
            let h = sequences.iter().position(|x| x.name == p.history).ok_or_else(|| {
                Error::config(
                    format!("schema.din_pairs[{i}].history"),
                    &p.history,
                    "is not a sequence feature",
                )
            })?;
            if pairs.iter().any(|&(_, hh)| hh == h) {
                return Err(Error::config(
                    format!("schema.din_pairs[{i}].history"),
                    &p.history,
                    "is already in another pair",
                ));
            }
            let (td, hd) = (tables[sparse[t].table].dim, tables[sequences[h].table].dim);
            if td != hd {
                return Err(Error::config(
                    format!("schema.din_pairs[{i}]"),
                    format!("{} / {}", p.target, p.history),
                    format!("target and history embedding dims differ ({td} vs {hd})"),
                ));
            }
            pairs.push((t, h));
        }
        let mut item_features = Vec::new();
        for (i, f) in s.sparse.iter().enumerate() {
            let Some(key_name) = &f.item_feature_of else { continue };
            let field = format!("schema.sparse[{i}].item_feature_of");
            let key = sparse.iter().position(|x| &x.name == key_name).ok_or_else(|| {
                Error::config(
                    &field,
                    key_name,
                    "must name another sparse feature (the item, e.g. item_id)",
                )
            })?;
            if key == i {
                return Err(Error::config(
                    &field,
                    key_name,
                    "a feature cannot be a function of itself",
                ));
            }
            if s.sparse[key].item_feature_of.is_some() {
                return Err(Error::config(
                    &field,
                    key_name,
                    "names a feature that is itself an item feature; name the item itself",
                ));
            }
            let paired = |t: usize| pairs.iter().find(|&&(pt, _)| pt == t).map(|&(_, h)| h);
            let history = match (paired(i), paired(key)) {
                (Some(h), Some(hk)) => Some((h, hk)),
                (None, _) => None,
                (Some(_), None) => {
                    return Err(Error::config(
                        &field,
                        key_name,
                        format!("`{}` is a DIN target but `{key_name}` is not, so its history cannot be filled from the item history; pair `{key_name}` with a history too", f.name),
                    ))
                }
            };
            item_features.push(ItemFeature {
                feature: i,
                key,
                history,
            });
        }
        if let Some((i, p)) = s.din_pairs.iter().enumerate().skip(1).find(|(_, p)| {
            let first = &s.sequence[pairs[0].1];
            let this = s.sequence.iter().find(|q| q.name == p.history);
            this.is_some_and(|q| {
                q.max_len != first.max_len || q.order != first.order || q.truncation != first.truncation
            })
        }) {
            return Err(Error::config(format!("schema.din_pairs[{i}].history"), &p.history, "histories of one attention unit are aligned per position: give them the same max_len, order and truncation"));
        }
        Ok(Layout {
            tables,
            sparse,
            dense,
            sequences,
            pairs,
            label: s.label.clone(),
            user: s.user.clone(),
            item_features,
        })
    }

    fn validate_input(&self) -> Result<()> {
        let d = single_byte("input.delimiter", &self.input.delimiter)?;
        let q = single_byte("input.sequence_separator", &self.input.sequence_separator)?;
        if d == q {
            return Err(Error::config(
                "input.sequence_separator",
                format!("{:?}", self.input.sequence_separator),
                "must differ from input.delimiter",
            ));
        }
        if !self.input.header && self.input.columns.is_empty() {
            return Err(Error::config(
                "input.columns",
                "[]",
                "name the columns in file order when input.header is false",
            ));
        }
        let mut seen = HashSet::new();
        for c in &self.input.columns {
            if !seen.insert(c) {
                return Err(Error::config("input.columns", c, "duplicate column name"));
            }
        }
        let d = &self.data;
        if let Some(f) = d.validation_split {
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::config("data.validation_split", f, "must be in (0, 1)"));
            }
            if d.validation.is_some() {
                return Err(Error::config(
                    "data.validation_split",
                    f,
                    "give either data.validation or data.validation_split, not both",
                ));
            }
            if d.window_rows.is_some() {
                return Err(Error::config(
                    "data.validation_split",
                    f,
                    "splits the whole training file, which data.window_rows streams instead of holding; give a separate data.validation file",
                ));
            }
        }
        if d.window_rows == Some(0) {
            return Err(Error::config(
                "data.window_rows",
                0,
                "must be at least 1 (or left out to hold the whole file)",
            ));
        }
        Ok(())
    }

    fn validate_model_and_train(&self) -> Result<()> {
        let a = &self.model.attention;
        if a.hidden_units.is_empty() {
            return Err(Error::config(
                "model.attention.hidden_units",
                "[]",
                "the local activation unit needs at least one hidden layer",
            ));
        }
        for (name, units) in [
            ("model.attention.hidden_units", &a.hidden_units),
            ("model.dnn.hidden_units", &self.model.dnn.hidden_units),
        ] {
            if units.contains(&0) {
                return Err(Error::config(
                    name,
                    format!("{units:?}"),
                    "layer widths must be at least 1",
                ));
            }
        }
        let p = self.model.dnn.dropout;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config("model.dnn.dropout", p, "must be in [0, 1)"));
        }
        let t = &self.train;
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return Err(Error::config(
                "train.learning_rate",
                t.learning_rate,
                "must be a positive number",
            ));
        }
        for (name, v) in [
            ("train.batch_size", t.batch_size),
            ("train.eval_batch_size", t.eval_batch_size),
            ("train.epochs", t.epochs),
        ] {
            if v == 0 {
                return Err(Error::config(name, v, "must be at least 1"));
            }
        }
        let r = &t.regularization;
        for (name, l) in [("lambda", Some(r.lambda)), ("dnn_lambda", r.dnn_lambda)] {
            if let Some(l) = l.filter(|l| !(l.is_finite() && *l >= 0.0)) {
                return Err(Error::config(
                    format!("train.regularization.{name}"),
                    l,
                    "must be a non-negative number",
                ));
            }
        }
        if let Some(es) = &t.early_stopping {
            if es.patience == 0 {
                return Err(Error::config("train.early_stopping.patience", 0, "must be at least 1"));
            }
            if self.data.validation.is_none() && self.data.validation_split.is_none() {
                return Err(Error::config(
                    "train.early_stopping",
                    format!("{:?}", es.monitor),
                    "needs validation data: set data.validation or data.validation_split",
                ));
            }
            if es.monitor == super::Monitor::ValGauc && self.schema.user.is_none() {
                return Err(Error::config(
                    "train.early_stopping.monitor",
                    "val_gauc",
                    "GAUC needs schema.user (the column that groups rows by user)",
                ));
            }
        }
        Ok(())
    }

    /// Writes inferred vocabulary sizes back into the schema, so that the
    /// saved config freezes them.
    pub fn freeze_vocab(&mut self, layout: &Layout) {
        for t in &layout.tables {
            let size = t.vocab_size;
            if let Some(f) = self.schema.sparse.iter_mut().find(|f| f.name == t.name) {
                f.vocab_size = size;
            } else if let Some(f) = self.schema.sequence.iter_mut().find(|f| f.name == t.name) {
                f.vocab_size = size;
            }
        }
    }
}

fn check_dim(field: &str, dim: usize) -> Result<()> {
    if dim == 0 {
        return Err(Error::config(field, dim, "must be at least 1"));
    }
    Ok(())
}

fn check_vocab(field: &str, v: Option<usize>) -> Result<()> {
    match v {
        Some(0) => Err(Error::config(
            field,
            0,
            "must be at least 1 (or left out to infer it from the training data)",
        )),
        // Ids are 32-bit, and a reserved out-of-vocabulary row takes id `vocab_size`.
        Some(v) if v >= u32::MAX as usize => Err(Error::config(field, v, "must be below 4294967295 (ids are 32-bit)")),
        _ => Ok(()),
    }
}
