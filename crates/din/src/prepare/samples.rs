//! Dense ids, per-user timelines and the two sample protocols.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Log, PrepareOptions, Protocol};
use crate::{Error, Result};

/// Raw values by dense id: `fields[name][id - 1]` is the raw value of `id`
/// (id 0 is padding).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Vocab {
    /// One list per field.
    pub fields: BTreeMap<String, Vec<String>>,
}

/// Maps raw strings to dense ids from 1, in order of first appearance.
#[derive(Debug, Default)]
struct IdMap {
    ids: HashMap<String, u32>,
    raw: Vec<String>,
}

impl IdMap {
    fn id(&mut self, raw: &str) -> u32 {
        if let Some(&id) = self.ids.get(raw) {
            return id;
        }
        self.raw.push(raw.to_string());
        let id = self.raw.len() as u32;
        self.ids.insert(raw.to_string(), id);
        id
    }
}

/// One DIN sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Dense user id.
    pub user: u32,
    /// Dense profile ids, in [`Log::profile_fields`] order.
    pub profile: Vec<u32>,
    /// Candidate item.
    pub item: u32,
    /// Its category.
    pub category: u32,
    /// History items, oldest first.
    pub hist_items: Vec<u32>,
    /// Their categories.
    pub hist_categories: Vec<u32>,
    /// Their timestamps.
    pub hist_times: Vec<i64>,
    /// The sample's timestamp.
    pub time: i64,
    /// ln(1 + days since the most recent history behaviour), -1 without history.
    pub days_since_prev: f32,
    /// 0 or 1.
    pub label: u8,
}

/// Samples and what was needed to make them.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Training samples.
    pub train: Vec<Sample>,
    /// Validation samples (each user's `valid_per_user` samples before the
    /// test ones).
    pub valid: Vec<Sample>,
    /// Held-out samples (each user's last `test_per_user` samples by time).
    pub test: Vec<Sample>,
    /// Raw values of every dense id.
    pub vocab: Vocab,
    /// Profile field names.
    pub profile_fields: Vec<String>,
    /// Users with at least one sample.
    pub users: usize,
    /// Behaviours whose category differs from the one first seen for their
    /// item: every sample gives an item that first category, so that the
    /// category is a function of the item (`item_feature_of`).
    pub category_conflicts: usize,
    /// Users left out: fewer than two behaviours (after `min_value`), so
    /// nothing to predict or to hold out.
    pub short_users: usize,
    /// Behaviours dropped by `min_value`.
    pub below_min_value: usize,
    /// Every item's category, by dense item id (index 0, padding, is 0).
    pub item_categories: Vec<u32>,
}

struct Timeline {
    item: u32,
    category: u32,
    time: i64,
    session: u32,
    in_history: bool,
    value: Option<f32>,
}

/// Builds the samples of `log` under `options` (deterministic for a seed).
pub fn build_samples(log: &Log, options: &PrepareOptions) -> Result<Samples> {
    if options.max_len == 0 {
        return Err(Error::config("max_len", 0, "must be at least 1"));
    }
    if options.negatives == 0 {
        return Err(Error::config("negatives", 0, "must be at least 1"));
    }
    if options.negatives > 1 && options.protocol != Protocol::NextItem {
        return Err(Error::config(
            "negatives",
            options.negatives,
            "applies to the next-item protocol; the rating protocol's negatives are the low ratings",
        ));
    }
    if options.test_per_user == 0 {
        return Err(Error::config("test_per_user", 0, "must be at least 1"));
    }
    if let Some(m) = options.min_value {
        if let Protocol::Rating { .. } = options.protocol {
            return Err(Error::config(
                "min_value",
                m,
                "applies to the next-item protocol; the rating protocol labels by its threshold",
            ));
        }
        if !m.is_finite() || log.events.iter().any(|e| e.value.is_none()) {
            return Err(Error::config(
                "min_value",
                m,
                "needs a finite threshold and a rating or label column in the log",
            ));
        }
    }
    if let Protocol::Rating { .. } = options.protocol {
        if log.events.iter().any(|e| e.value.is_none()) {
            return Err(Error::config(
                "protocol",
                "rating",
                "needs a rating or label column in the log",
            ));
        }
    }
    let (mut users, mut items, mut categories) = (IdMap::default(), IdMap::default(), IdMap::default());
    let mut profile_maps: Vec<IdMap> = log.profile_fields.iter().map(|_| IdMap::default()).collect();
    let mut item_category: Vec<u32> = vec![0]; // by item id; first category seen wins
    let mut category_conflicts = 0;
    let mut by_user: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut profiles: HashMap<u32, Vec<u32>> = HashMap::new();
    for (i, e) in log.events.iter().enumerate() {
        let u = users.id(&e.user);
        let it = items.id(&e.item);
        let c = categories.id(&e.category);
        if it as usize == item_category.len() {
            item_category.push(c);
        } else if item_category[it as usize] != c {
            category_conflicts += 1;
        }
        by_user.entry(u).or_default().push(i);
        profiles
            .entry(u)
            .or_insert_with(|| e.profile.iter().zip(&mut profile_maps).map(|(v, m)| m.id(v)).collect());
    }
    let n_items = items.raw.len() as u32;
    let gap = options.session_gap_days.map(|d| (d * 86_400.0) as i64);
    let history_ok = |b: &Option<String>| match (&options.history_behaviors, b) {
        (None, _) => true,
        (Some(allowed), Some(b)) => allowed.iter().any(|a| a == b),
        (Some(_), None) => true,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut out = Samples {
        profile_fields: log.profile_fields.clone(),
        category_conflicts,
        ..Samples::default()
    };

    for (&user, idx) in &by_user {
        let mut idx = idx.clone();
        // Time order; ties keep file order.
        idx.sort_by_key(|&i| (log.events[i].time, log.events[i].line));
        let mut timeline: Vec<Timeline> = Vec::with_capacity(idx.len());
        let mut session = 0;
        // Every item the user touched, kept or not: never a negative for them.
        let touched: HashSet<u32> = idx.iter().map(|&i| items.ids[&log.events[i].item]).collect();
        if let Some(m) = options.min_value {
            let before = idx.len();
            idx.retain(|&i| log.events[i].value.is_some_and(|v| v >= m));
            out.below_min_value += before - idx.len();
        }
        for (k, &i) in idx.iter().enumerate() {
            let e = &log.events[i];
            if let (Some(g), true) = (gap, k > 0) {
                if e.time - log.events[idx[k - 1]].time > g {
                    session += 1;
                }
            }
            let item = items.ids[&e.item];
            let positive = match options.protocol {
                Protocol::NextItem => true,
                Protocol::Rating { threshold } => e.value.is_some_and(|v| v >= threshold),
            };
            timeline.push(Timeline {
                item,
                category: item_category[item as usize],
                time: e.time,
                session,
                in_history: positive && history_ok(&e.behavior),
                value: e.value,
            });
        }
        let first = match options.protocol {
            Protocol::NextItem => 1,
            Protocol::Rating { .. } => 0,
        };
        if timeline.len() < 2 {
            out.short_users += 1;
            continue; // nothing to hold out
        }
        out.users += 1;
        let profile = profiles.get(&user).cloned().unwrap_or_default();
        for i in first..timeline.len() {
            let target = &timeline[i];
            let (mut hist_items, mut hist_categories, mut hist_times) = (Vec::new(), Vec::new(), Vec::new());
            for prev in timeline[..i].iter().rev() {
                if prev.session != target.session || hist_items.len() == options.max_len {
                    break;
                }
                if prev.time < target.time && prev.in_history {
                    hist_items.push(prev.item);
                    hist_categories.push(prev.category);
                    hist_times.push(prev.time);
                }
            }
            hist_items.reverse();
            hist_categories.reverse();
            hist_times.reverse();
            let days_since_prev = hist_times
                .last()
                .map_or(-1.0, |&t| ((target.time - t) as f64 / 86_400.0).ln_1p() as f32);
            let base = Sample {
                user,
                profile: profile.clone(),
                item: target.item,
                category: target.category,
                hist_items,
                hist_categories,
                hist_times,
                time: target.time,
                days_since_prev,
                label: 1,
            };
            let is_test = i + options.test_per_user >= timeline.len();
            let is_valid = !is_test && i + options.test_per_user + options.valid_per_user >= timeline.len();
            let mut made = Vec::with_capacity(2);
            match options.protocol {
                Protocol::NextItem => {
                    // As many as there are untouched items, distinct.
                    let wanted = options.negatives.min(n_items as usize - touched.len());
                    let mut negatives: Vec<u32> = Vec::with_capacity(wanted);
                    while negatives.len() < wanted {
                        let candidate = rng.gen_range(1..=n_items);
                        if !touched.contains(&candidate) && !negatives.contains(&candidate) {
                            negatives.push(candidate);
                        }
                    }
                    for &negative in &negatives {
                        let mut neg = base.clone();
                        neg.item = negative;
                        neg.category = item_category[negative as usize];
                        neg.label = 0;
                        made.push(neg);
                    }
                    made.insert(0, base);
                }
                Protocol::Rating { threshold } => {
                    let mut s = base;
                    s.label = u8::from(target.value.is_some_and(|v| v >= threshold));
                    made.push(s);
                }
            }
            if is_test {
                out.test.extend(made);
            } else if is_valid {
                out.valid.extend(made);
            } else {
                out.train.extend(made);
            }
        }
    }
    out.item_categories = item_category;
    out.vocab.fields.insert("user_id".into(), users.raw);
    out.vocab.fields.insert("item_id".into(), items.raw);
    out.vocab.fields.insert("cate_id".into(), categories.raw);
    for (name, map) in log.profile_fields.iter().zip(profile_maps) {
        out.vocab.fields.insert(name.clone(), map.raw);
    }
    Ok(out)
}
