//! What maps an application's raw ids to a model's inputs: the raw value of
//! every dense id ([`Vocabulary`], `vocab.json`) and the value of each item
//! feature for every item ([`ItemTable`], `items.json`, the DIN authors'
//! `cate_list`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Dataset;
use crate::schema::{Layout, Oov};
use crate::{Error, Result};

/// The raw values of the dense ids of some embedding tables: dense id `i`
/// (from 1; 0 is padding) stands for `raw[i - 1]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vocabulary {
    tables: BTreeMap<String, TableVocab>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct TableVocab {
    raw: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Vocabulary {
    /// Builds a vocabulary from `{name: [raw of id 1, raw of id 2, ...]}`.
    /// A raw value listed twice in one table is an error (`path` names the
    /// file in it).
    pub fn from_fields(path: &Path, fields: BTreeMap<String, Vec<String>>) -> Result<Vocabulary> {
        let mut tables = BTreeMap::new();
        for (name, raw) in fields {
            if raw.len() >= u32::MAX as usize {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!("vocabulary `{name}` has {} values; ids are 32-bit", raw.len()),
                });
            }
            let mut ids = HashMap::with_capacity(raw.len());
            for (i, r) in raw.iter().enumerate() {
                if ids.insert(r.clone(), i as u32 + 1).is_some() {
                    return Err(Error::Checkpoint {
                        path: path.to_path_buf(),
                        reason: format!("vocabulary `{name}` lists the raw value {r:?} twice"),
                    });
                }
            }
            tables.insert(name, TableVocab { raw, ids });
        }
        Ok(Vocabulary { tables })
    }

    /// Reads a `vocab.json` as `din prepare` writes it.
    pub fn read(path: &Path) -> Result<Vocabulary> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, "cannot read vocabulary", e))?;
        let fields: BTreeMap<String, Vec<String>> = serde_json::from_slice(&text).map_err(|e| Error::ConfigSyntax {
            path: path.to_path_buf(),
            message: format!("a vocabulary is {{\"feature\": [\"raw value of id 1\", ...]}}: {e}"),
        })?;
        Vocabulary::from_fields(path, fields)
    }

    /// The vocabularies of `layout`'s embedding tables only (a prepared
    /// vocabulary may list features the config does not use).
    pub fn restricted_to(mut self, layout: &Layout) -> Vocabulary {
        self.tables
            .retain(|name, _| layout.tables.iter().any(|t| &t.name == name));
        self
    }

    /// Whether table `table` has raw values.
    pub fn has(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }

    /// The dense id of `raw` in `table`'s vocabulary, if listed.
    pub fn id(&self, table: &str, raw: &str) -> Option<u32> {
        self.tables.get(table)?.ids.get(raw).copied()
    }

    /// The raw value of dense id `id` in `table`, if listed.
    pub fn raw(&self, table: &str, id: u32) -> Option<&str> {
        let t = self.tables.get(table)?;
        t.raw.get((id as usize).checked_sub(1)?).map(String::as_str)
    }

    /// Number of raw values of `table` (0 when it has none).
    pub fn len(&self, table: &str) -> usize {
        self.tables.get(table).map_or(0, |t| t.raw.len())
    }

    /// Whether no table has raw values.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The JSON form, `{name: [raw, ...]}` (tables in name order).
    pub fn to_json(&self) -> Vec<u8> {
        let fields: BTreeMap<&str, &[String]> = self
            .tables
            .iter()
            .map(|(k, v)| (k.as_str(), v.raw.as_slice()))
            .collect();
        serde_json::to_vec(&fields).unwrap_or_default()
    }
}

/// Item features by item: `features[f].values[item id]` is feature `f`'s
/// dense id for that item, `None` for an item never seen with one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemTable {
    /// One column per item feature, by the feature's name.
    pub features: BTreeMap<String, ItemColumn>,
}

/// One item feature's values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemColumn {
    /// The feature it is a function of (e.g. `item_id`).
    pub key: String,
    /// The value for each id of `key` (indexed by that id).
    pub values: Vec<Option<u32>>,
}

impl ItemTable {
    /// Records item -> value for every item feature of `layout` from the rows
    /// of `data` (after [`apply_vocab`](super::apply_vocab)): the targets and,
    /// position by position, the paired histories. Two rows that give one
    /// item two values are an error naming both lines.
    pub fn derive(layout: &Layout, data: &[&Dataset]) -> Result<ItemTable> {
        Self::derive_from(layout, data, None)
    }

    /// Reads an item table (`items.json`) and checks it against `layout`
    /// (see [`ItemTable::check`]).
    pub fn read(path: &Path, layout: &Layout) -> Result<ItemTable> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read the item table", e))?;
        let table: ItemTable = serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not an item table: {e}"),
        })?;
        table.check(layout, path)?;
        Ok(table)
    }

    /// Like [`ItemTable::derive`], starting from `known` (a table read from
    /// its file, see [`ItemTable::read`]): every row must agree with it, and
    /// items it lacks are filled in from the rows.
    pub fn derive_from(layout: &Layout, data: &[&Dataset], known: Option<(ItemTable, &Path)>) -> Result<ItemTable> {
        let (mut known, known_path) = match known {
            Some((table, path)) => (table, Some(path)),
            None => (ItemTable::default(), None),
        };
        let mut features = BTreeMap::new();
        for f in &layout.item_features {
            let key_table = &layout.tables[layout.sparse[f.key].table];
            let key_rows = key_table.rows();
            // Under oov = "reserved" unseen items share one row: no single value.
            let reserved = (key_table.oov == Oov::Reserved).then(|| key_table.vocab_size.unwrap_or(0) as u32);
            let name = &layout.sparse[f.feature].name;
            // `check` made the known column as long as the key's table.
            let mut values: Vec<Option<u32>> = known
                .features
                .remove(name)
                .map_or_else(|| vec![None; key_rows], |c| c.values);
            // Where each value was first seen: (file, line); file `usize::MAX`
            // is the known table's.
            let mut seen: Vec<(usize, u64)> = values
                .iter()
                .map(|v| if v.is_some() { (usize::MAX, 0) } else { (0, 0) })
                .collect();
            let key_name = &layout.sparse[f.key].name;
            for (d, set) in data.iter().enumerate() {
                let batch = &set.batch;
                for r in 0..batch.rows {
                    let line = u64::from(set.lines[r]);
                    // The target, then the paired histories position by position.
                    let (keys, vals): (&[u32], &[u32]) = match f.history {
                        Some((h, hk)) => (batch.history(hk, r), batch.history(h, r)),
                        None => (&[], &[]),
                    };
                    let target = (batch.sparse_id(f.key, r), batch.sparse_id(f.feature, r));
                    for (k, v) in std::iter::once(target).chain(keys.iter().copied().zip(vals.iter().copied())) {
                        if Some(k) == reserved {
                            continue;
                        }
                        let slot = &mut values[k as usize];
                        match *slot {
                            None => {
                                *slot = Some(v);
                                seen[k as usize] = (d, line);
                            }
                            Some(old) if old != v => {
                                let (od, oline) = seen[k as usize];
                                let there = match (od, known_path) {
                                    (usize::MAX, Some(p)) => format!("in {}", p.display()),
                                    _ => format!("at {}:{oline}", data[od.min(data.len() - 1)].source.display()),
                                };
                                return Err(Error::Parse {
                                    path: set.source.clone(),
                                    line,
                                    column: name.clone(),
                                    value: v.to_string(),
                                    reason: format!(
                                        "`{name}` is an item feature of `{key_name}` (item_feature_of), but {key_name} {k} has {name} {v} here and {old} {there}; fix the data or remove item_feature_of"
                                    ),
                                });
                            }
                            Some(_) => {}
                        }
                    }
                }
            }
            features.insert(
                name.clone(),
                ItemColumn {
                    key: key_name.clone(),
                    values,
                },
            );
        }
        Ok(ItemTable { features })
    }

    /// Checks the table against `layout`: one column per item feature, keyed
    /// by its item, one value per item id, every value inside its table.
    pub fn check(&self, layout: &Layout, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        for f in &layout.item_features {
            let (name, key) = (&layout.sparse[f.feature].name, &layout.sparse[f.key].name);
            let col = self
                .features
                .get(name)
                .ok_or_else(|| bad(format!("no column for item feature `{name}`")))?;
            if &col.key != key {
                return Err(bad(format!(
                    "column `{name}` is keyed by `{}`, config.json says `{key}`",
                    col.key
                )));
            }
            let rows = layout.tables[layout.sparse[f.key].table].rows();
            if col.values.len() != rows {
                return Err(bad(format!(
                    "column `{name}` has {} items, table `{key}` has {rows} rows",
                    col.values.len()
                )));
            }
            let limit = layout.tables[layout.sparse[f.feature].table].rows();
            if let Some((item, v)) = col
                .values
                .iter()
                .enumerate()
                .find_map(|(i, v)| v.filter(|&v| v as usize >= limit).map(|v| (i, v)))
            {
                return Err(bad(format!(
                    "column `{name}`: item {item} has value {v}, outside its table of {limit} rows"
                )));
            }
        }
        if let Some(extra) = self.features.keys().find(|n| {
            !layout
                .item_features
                .iter()
                .any(|f| &layout.sparse[f.feature].name == *n)
        }) {
            return Err(bad(format!(
                "column `{extra}` is not an item feature of the model in config.json"
            )));
        }
        Ok(())
    }

    /// The value of item feature `feature` for item id `item`, if known.
    pub fn value(&self, feature: &str, item: u32) -> Option<u32> {
        self.features.get(feature)?.values.get(item as usize).copied().flatten()
    }
}
