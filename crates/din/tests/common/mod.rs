//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use din::data::{Batch, Ragged};
use din::model::{Din, Module, Role};
use din::schema::{Config, Layout};
use rand::{Rng, SeedableRng};

/// `rel` inside `../shared/data`, which sits beside the repository in CI;
/// `None` (and a `skipped` line) on a fresh clone, where the test passes.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (it is only beside the project in CI)",
            p.display()
        );
        None
    }
}

/// A config with two DIN pairs (item, cate) x (hist_items, hist_cates), a
/// user feature, a dense feature and one mean-pooled sequence.
pub fn config(attention_activation: &str, normalization: &str, dnn_activation: &str) -> Config {
    let text = format!(
        r#"
[input]
columns = ["user", "item", "cate", "price", "hist_items", "hist_cates", "tags", "label"]
[schema]
label = "label"
user = "user"
sparse = [
  {{ name = "user", vocab_size = 5, embedding_dim = 3 }},
  {{ name = "item", vocab_size = 12, embedding_dim = 4 }},
  {{ name = "cate", vocab_size = 6, embedding_dim = 2 }},
]
dense = [{{ name = "price", dim = 2 }}]
sequence = [
  {{ name = "hist_items", shares_embedding_with = "item", max_len = 5 }},
  {{ name = "hist_cates", shares_embedding_with = "cate", max_len = 5 }},
  {{ name = "tags", vocab_size = 7, embedding_dim = 2, max_len = 4 }},
]
din_pairs = [{{ target = "item", history = "hist_items" }}, {{ target = "cate", history = "hist_cates" }}]
[model.attention]
hidden_units = [6, 4]
activation = "{attention_activation}"
normalization = "{normalization}"
[model.dnn]
hidden_units = [5, 3]
activation = "{dnn_activation}"
"#
    );
    Config::from_toml_str(&text).expect("test config parses")
}

/// A batch of four samples for [`config`]; sample 2 has an empty history.
pub fn batch() -> Batch {
    let ragged = |rows: &[&[u32]]| {
        let mut r = Ragged::new();
        for row in rows {
            r.push(row);
        }
        r
    };
    Batch {
        sparse: vec![vec![1, 2, 3, 1], vec![3, 7, 11, 5], vec![1, 2, 5, 4]],
        dense: vec![vec![0.5, -1.0, 1.5, 0.2, -0.3, 0.8, 0.0, 1.0]],
        sequences: vec![
            ragged(&[&[1, 2, 4], &[5, 6, 7, 8, 9], &[], &[10, 3]]),
            ragged(&[&[1, 1, 2], &[3, 4, 5, 1, 2], &[], &[3, 3]]),
            ragged(&[&[1, 2], &[], &[6], &[3, 4, 5, 6]]),
        ],
        labels: vec![1.0, 0.0, 0.0, 1.0],
        rows: 4,
        groups: Vec::new(),
        shared_sparse: Vec::new(),
        shared_dense: Vec::new(),
    }
}

/// Gives every bias, slope and Dice statistic a random value (they start at
/// 0, 0 or 1), so that each of them shows in the output.
pub fn randomize(model: &mut Din, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    model.visit_mut("", &mut |name, p| match p.role {
        Role::Bias | Role::Alpha => p.value.iter_mut().for_each(|v| *v = rng.gen_range(-0.5..0.5)),
        Role::Statistic if name.contains("var") => p.value.iter_mut().for_each(|v| *v = rng.gen_range(0.2..3.0)),
        Role::Statistic => p.value.iter_mut().for_each(|v| *v = rng.gen_range(-1.0..1.0)),
        _ => {}
    });
}

/// The layout of `config`, validated.
pub fn layout(config: &Config) -> Layout {
    config.validate().expect("test config is valid")
}
