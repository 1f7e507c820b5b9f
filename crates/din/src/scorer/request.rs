//! One scoring request: a user (profile features and behaviour histories)
//! and a list of candidates, in the application's raw ids, to one click
//! probability per candidate, with the attention weights that explain it.
//!
//! Values come as JSON (what a server or a Python dict hands over):
//!
//! * a sparse feature is a raw id: a string or an integer, looked up in the
//!   model's vocabulary when its table has one (`vocab.json`), else a dense id;
//! * a dense feature is a number, or a list of `dim` numbers;
//! * a history is a list of ids, in the order the model's data files list
//!   them (the schema's `order`), truncated to `max_len` like a file's.
//!
//! Each sparse or dense feature is taken from the candidate, else from the
//! user, else (for an item feature, `item_feature_of`) from the model's item
//! table; a history paired with an item feature is filled from the item
//! history the same way. The candidates share one history, so the model
//! computes its side of the first attention layer once for all of them.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::Scorer;
use crate::data::{kept_range, Batch, Ragged};
use crate::schema::{ItemFeature, Oov};
use crate::{Error, Result};

/// What [`Scorer::score`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Click probability of each candidate, in request order.
    pub scores: Vec<f32>,
    /// Per candidate, the history entries with the largest attention
    /// weights, largest first (empty when no explanation was asked for).
    pub explanations: Vec<Vec<Attended>>,
}

/// One history entry and the weight the local activation unit gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attended {
    /// Index of the entry in the request's history list.
    pub position: usize,
    /// The entry as the request gave it (the first DIN pair's history).
    pub id: Value,
    /// Its attention weight.
    pub weight: f32,
}

/// A request turned into model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// One row per candidate, all with the same histories.
    pub batch: Batch,
    /// For each behaviour the model attends to (the first pair's history
    /// after padding and truncation), its index in the request's list.
    pub positions: Vec<usize>,
}

/// A JSON value, shortened for an error message.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 64 {
        format!("{}...", s.chars().take(64).collect::<String>())
    } else {
        s
    }
}

impl Scorer {
    /// Scores `candidates` for `user`, returning one probability per
    /// candidate and, when `explain > 0`, the `explain` most attended history
    /// entries of each. Runs on the current rayon pool. Every problem with
    /// the request is an [`Error::Request`] naming the field.
    pub fn score(
        &self,
        user: &Map<String, Value>,
        candidates: &[Map<String, Value>],
        explain: usize,
    ) -> Result<Scored> {
        let enc = self.encode(user, candidates)?;
        let (scores, weights) = self.model.predict_with_weights(&enc.batch);
        let mut explanations = Vec::new();
        if explain > 0 {
            let l = &self.layout;
            let (target, history) = l.pairs[0];
            // The entries as given: the first pair's history, or the item
            // history it is filled from.
            let shown = user.get(&l.sequences[history].name).or_else(|| {
                let f = l.item_features.iter().find(|f| f.feature == target)?;
                user.get(&l.sequences[f.history?.1].name)
            });
            let len = enc.positions.len();
            for c in 0..candidates.len() {
                let w = &weights[c * len..(c + 1) * len];
                let mut order: Vec<usize> = (0..len).collect();
                order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
                explanations.push(
                    order
                        .into_iter()
                        .take(explain)
                        .map(|i| {
                            let position = enc.positions[i];
                            let id = shown
                                .and_then(|v| v.as_array())
                                .and_then(|a| a.get(position))
                                .cloned()
                                .unwrap_or(Value::Null);
                            Attended {
                                position,
                                id,
                                weight: w[i],
                            }
                        })
                        .collect(),
                );
            }
        }
        Ok(Scored { scores, explanations })
    }

    /// Turns a request into model input (see the module's documentation).
    pub fn encode(&self, user: &Map<String, Value>, candidates: &[Map<String, Value>]) -> Result<Encoded> {
        let l = &self.layout;
        if candidates.is_empty() {
            return Err(Error::request("candidates", "at least one candidate is needed"));
        }
        self.check_names(user, candidates)?;
        let n = candidates.len();
        let mut batch = Batch {
            sparse: vec![Vec::new(); l.sparse.len()],
            dense: vec![Vec::new(); l.dense.len()],
            sequences: vec![Ragged::new(); l.sequences.len()],
            labels: Vec::new(),
            rows: n,
            groups: Vec::new(),
            shared_sparse: Vec::new(),
            shared_dense: Vec::new(),
        };
        let item_of = |i: usize| l.item_features.iter().find(|f| f.feature == i);
        // Ordinary features first: an item feature follows from its item.
        for derived in [false, true] {
            for (i, slot) in l.sparse.iter().enumerate() {
                if item_of(i).is_some() != derived {
                    continue;
                }
                let name = &slot.name;
                let from_user = match user.get(name) {
                    Some(v) => Some(self.table_id(slot.table, v, || format!("user.{name}"))?),
                    None => None,
                };
                let mut ids = Vec::with_capacity(n);
                for (j, cand) in candidates.iter().enumerate() {
                    let id = match (cand.get(name), from_user, item_of(i)) {
                        (Some(v), _, _) => self.table_id(slot.table, v, || format!("candidates[{j}].{name}"))?,
                        (None, Some(id), _) => id,
                        (None, None, Some(f)) => {
                            self.item_value(f, batch.sparse[f.key][j], || format!("candidates[{j}].{name}"))?
                        }
                        (None, None, None) => {
                            return Err(Error::request(
                                format!("candidates[{j}].{name}"),
                                format!("missing: give `{name}` with each candidate, or once in `user`"),
                            ))
                        }
                    };
                    ids.push(id);
                }
                batch.sparse[i] = ids;
            }
        }
        for (f, (name, dim)) in l.dense.iter().enumerate() {
            let from_user = match user.get(name) {
                Some(v) => Some(dense_values(v, *dim, || format!("user.{name}"))?),
                None => None,
            };
            let out = &mut batch.dense[f];
            for (j, cand) in candidates.iter().enumerate() {
                match (cand.get(name), &from_user) {
                    (Some(v), _) => out.extend(dense_values(v, *dim, || format!("candidates[{j}].{name}"))?),
                    (None, Some(x)) => out.extend_from_slice(x),
                    (None, None) => {
                        return Err(Error::request(
                            format!("candidates[{j}].{name}"),
                            format!("missing: give `{name}` with each candidate, or once in `user`"),
                        ))
                    }
                }
            }
        }
        let (histories, positions) = self.histories(user)?;
        for (h, ids) in histories.iter().enumerate() {
            let seq = &mut batch.sequences[h];
            seq.values.reserve(n * ids.len());
            for _ in 0..n {
                seq.push(ids);
            }
        }
        Ok(Encoded { batch, positions })
    }

    /// Refuses fields that are not features of the model (but for the user
    /// column, `schema.user`, in `user`), and histories given per candidate.
    fn check_names(&self, user: &Map<String, Value>, candidates: &[Map<String, Value>]) -> Result<()> {
        let l = &self.layout;
        let is_sparse_or_dense = |k: &str| l.sparse.iter().any(|s| s.name == k) || l.dense.iter().any(|d| d.0 == k);
        let is_history = |k: &str| l.sequences.iter().any(|s| s.name == k);
        let features = || {
            let names: Vec<&str> = (l.sparse.iter().map(|s| s.name.as_str()))
                .chain(l.dense.iter().map(|d| d.0.as_str()))
                .chain(l.sequences.iter().map(|s| s.name.as_str()))
                .collect();
            names.join(", ")
        };
        // The column that groups rows by user (schema.user) is in every data
        // row, so a request may carry it even when it is not a feature.
        let is_user_column = |k: &str| l.user.as_deref() == Some(k);
        if let Some(k) = user
            .keys()
            .find(|k| !is_sparse_or_dense(k) && !is_history(k) && !is_user_column(k))
        {
            return Err(Error::request(
                format!("user.{k}"),
                format!("not a feature of this model (its features: {})", features()),
            ));
        }
        for (j, cand) in candidates.iter().enumerate() {
            if let Some(k) = cand.keys().find(|k| !is_sparse_or_dense(k)) {
                let reason = if is_history(k) {
                    "a history belongs to the user: give it once in `user`".to_string()
                } else {
                    format!("not a feature of this model (its features: {})", features())
                };
                return Err(Error::request(format!("candidates[{j}].{k}"), reason));
            }
        }
        Ok(())
    }

    /// Every history of the user as dense ids, padding dropped and truncated
    /// as the data reader does, and the request positions of the first
    /// pair's entries.
    fn histories(&self, user: &Map<String, Value>) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
        let l = &self.layout;
        // Histories filled from an item history: (history, item feature).
        let filled = |h: usize| {
            l.item_features
                .iter()
                .find(|f| f.history.is_some_and(|(fh, _)| fh == h))
        };
        // With padding (0) still in, as given.
        let mut raw: Vec<Option<Vec<u32>>> = vec![None; l.sequences.len()];
        for (h, slot) in l.sequences.iter().enumerate() {
            let name = &slot.name;
            match user.get(name) {
                Some(Value::Array(items)) => {
                    let mut ids = Vec::with_capacity(items.len());
                    for (p, v) in items.iter().enumerate() {
                        ids.push(self.history_id(slot.table, v, || format!("user.{name}[{p}]"))?);
                    }
                    raw[h] = Some(ids);
                }
                Some(other) => {
                    return Err(Error::request(
                        format!("user.{name}"),
                        format!("expected a list of ids (a history), found {}", show(other)),
                    ))
                }
                None if filled(h).is_some() => {}
                None => {
                    return Err(Error::request(
                        format!("user.{name}"),
                        "missing: give the user's history as a list of ids ([] for none)",
                    ))
                }
            }
        }
        for h in 0..l.sequences.len() {
            if let (None, Some(f)) = (&raw[h], filled(h)) {
                let (_, hk) = f.history.unwrap_or((h, h));
                let key_name = &l.sequences[hk].name;
                let keys = raw[hk].as_deref().unwrap_or_default();
                let mut ids = Vec::with_capacity(keys.len());
                for (p, &k) in keys.iter().enumerate() {
                    ids.push(if k == 0 {
                        0
                    } else {
                        self.item_value(f, k, || format!("user.{key_name}[{p}]"))?
                    });
                }
                raw[h] = Some(ids);
            }
        }
        // The histories of one attention unit are aligned per position.
        let first = l.pairs[0].1;
        let base = raw[first].as_deref().unwrap_or_default();
        for &(_, h) in &l.pairs[1..] {
            let other = raw[h].as_deref().unwrap_or_default();
            let (a, b) = (&l.sequences[first].name, &l.sequences[h].name);
            if other.len() != base.len() {
                return Err(Error::request(
                    format!("user.{b}"),
                    format!(
                        "has {} ids but `{a}` has {}: the histories of one attention unit are aligned per position",
                        other.len(),
                        base.len()
                    ),
                ));
            }
            if let Some(p) = base.iter().zip(other).position(|(x, y)| (*x == 0) != (*y == 0)) {
                return Err(Error::request(
                    format!("user.{b}[{p}]"),
                    format!(
                        "only one of `{a}` and `{b}` has padding (0) at this position; they are aligned per position"
                    ),
                ));
            }
        }
        let mut positions = Vec::new();
        let mut out = Vec::with_capacity(raw.len());
        for (h, (slot, ids)) in l.sequences.iter().zip(raw).enumerate() {
            let ids = ids.unwrap_or_default();
            let real: Vec<usize> = (0..ids.len()).filter(|&p| ids[p] != 0).collect();
            let kept = &real[kept_range(slot, real.len())];
            if h == first {
                positions = kept.to_vec();
            }
            out.push(kept.iter().map(|&p| ids[p]).collect());
        }
        Ok((out, positions))
    }

    /// A history entry's dense id: 0 (padding) for a dense 0 in a table
    /// without a vocabulary, else as [`Scorer::table_id`].
    fn history_id(&self, table: usize, v: &Value, field: impl Fn() -> String) -> Result<u32> {
        let t = &self.layout.tables[table];
        let has_vocab = self.assets.vocab.as_ref().is_some_and(|voc| voc.has(&t.name));
        if !has_vocab && (v.as_u64() == Some(0) || v.as_str().is_some_and(|s| s.trim() == "0")) {
            return Ok(0);
        }
        self.table_id(table, v, field)
    }

    /// The dense id of a raw value in table `table`, under its oov policy.
    fn table_id(&self, table: usize, v: &Value, field: impl Fn() -> String) -> Result<u32> {
        let t = &self.layout.tables[table];
        let vocab_size = t.vocab_size.unwrap_or(0);
        let vocab = self.assets.vocab.as_ref().filter(|voc| voc.has(&t.name));
        let found: Option<u32> = match vocab {
            Some(voc) => {
                let raw: Cow<'_, str> = match v {
                    Value::String(s) => Cow::Borrowed(s),
                    Value::Number(x) if x.is_u64() || x.is_i64() => Cow::Owned(x.to_string()),
                    other => {
                        return Err(Error::request(
                            field(),
                            format!("expected a raw id (a string or an integer), found {}", show(other)),
                        ))
                    }
                };
                voc.id(&t.name, &raw)
            }
            None => {
                let id = match v {
                    Value::Number(x) => x.as_u64(),
                    Value::String(s) => s.trim().parse::<u64>().ok(),
                    _ => None,
                }
                .ok_or_else(|| {
                    Error::request(
                        field(),
                        format!(
                            "expected a dense id (a non-negative integer: table `{}` has no vocabulary in this model), found {}",
                            t.name,
                            show(v)
                        ),
                    )
                })?;
                u32::try_from(id).ok()
            }
        };
        match found {
            Some(id) if (id as usize) < vocab_size => Ok(id),
            _ => match t.oov {
                Oov::Reserved => Ok(vocab_size as u32),
                Oov::Error => Err(Error::request(
                    field(),
                    match vocab {
                        Some(_) => format!(
                            "unknown value {}: not in the vocabulary of table `{}` (its oov policy is \"error\")",
                            show(v),
                            t.name
                        ),
                        None => format!(
                            "id {} is at or above the vocabulary size {vocab_size} of table `{}` (its oov policy is \"error\")",
                            show(v),
                            t.name
                        ),
                    },
                )),
            },
        }
    }

    /// Item feature `f` of item `item` from the item table, under the
    /// feature table's oov policy when the item is not in it.
    fn item_value(&self, f: &ItemFeature, item: u32, field: impl Fn() -> String) -> Result<u32> {
        let l = &self.layout;
        let name = &l.sparse[f.feature].name;
        let found = self.assets.items.as_ref().and_then(|t| t.value(name, item));
        if let Some(v) = found {
            return Ok(v);
        }
        let table = &l.tables[l.sparse[f.feature].table];
        if table.oov == Oov::Reserved {
            return Ok(table.vocab_size.unwrap_or(0) as u32);
        }
        let key_table = &l.tables[l.sparse[f.key].table];
        let raw = self
            .assets
            .vocab
            .as_ref()
            .and_then(|v| v.raw(&key_table.name, item))
            .map_or_else(|| item.to_string(), |r| format!("{r:?}"));
        Err(Error::request(
            field(),
            format!(
                "`{name}` follows from `{}`, but {} {raw} has no `{name}` in the model's item table; give `{name}` explicitly",
                l.sparse[f.key].name, l.sparse[f.key].name
            ),
        ))
    }
}

/// A dense feature's values: a number, or a list of `dim` numbers, finite as f32.
fn dense_values(v: &Value, dim: usize, field: impl Fn() -> String) -> Result<Vec<f32>> {
    let numbers: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    if numbers.len() != dim {
        return Err(Error::request(
            field(),
            format!("expected {dim} number(s), found {}", show(v)),
        ));
    }
    numbers
        .into_iter()
        .map(|x| {
            let f = x
                .as_f64()
                .ok_or_else(|| Error::request(field(), format!("expected a number, found {}", show(x))))?
                as f32;
            if f.is_finite() {
                Ok(f)
            } else {
                Err(Error::request(
                    field(),
                    format!("{} is not a finite 32-bit number", show(x)),
                ))
            }
        })
        .collect()
}
