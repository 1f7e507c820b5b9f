//! One module per subcommand.

pub mod bench;
pub mod distributed;
pub mod evaluate;
pub mod export;
pub mod plot;
pub mod predict;
pub mod prepare;
pub mod serve;
pub mod train;

use din::metrics::Metrics;

/// One line of metrics for people.
pub fn format_metrics(prefix: &str, m: &Metrics) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"));
    format!(
        "{prefix}logloss {:.4}  {prefix}auc {}  {prefix}gauc {}",
        m.logloss,
        opt(m.auc),
        opt(m.gauc)
    )
}

/// `--layout`: how a data file's lines map to samples, overriding the
/// model's `input.layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutArg {
    /// One sample per line.
    Flat,
    /// One group (a user side and its candidates) per line.
    Grouped,
}

impl From<LayoutArg> for din::schema::InputLayout {
    fn from(l: LayoutArg) -> Self {
        match l {
            LayoutArg::Flat => din::schema::InputLayout::Flat,
            LayoutArg::Grouped => din::schema::InputLayout::Grouped,
        }
    }
}

/// Applies `--precision` to a loaded model (which scores in its own
/// `model.precision` otherwise), and says which kernel scores when it is
/// not plain fp32.
pub fn apply_precision(scorer: &mut din::scorer::Scorer, precision: Option<din::model::Precision>) {
    if let Some(precision) = precision {
        scorer.set_precision(precision);
    }
    let precision = scorer.config.model.precision;
    if precision != din::model::Precision::Fp32 {
        eprintln!(
            "precision {precision}: {}",
            din::model::bf16::describe_choice(precision, scorer.model.kernel())
        );
    }
}
