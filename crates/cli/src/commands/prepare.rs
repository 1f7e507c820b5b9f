//! `din prepare`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use din::prepare::{prepare, read_log, read_movielens, LogSpec, PrepareOptions, Protocol, SampleFormat};

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// A MovieLens folder: 100K (u.data), 1M (ratings.dat) or latest/20M/25M (ratings.csv), by its files.
    Movielens,
    /// The DIN paper's Amazon review table (header user_id,item_id,time,cate_id).
    Amazon,
    /// Taobao UserBehavior (no header: user,item,category,behavior,timestamp).
    Taobao,
    /// Any delimited log; name the columns with --user-col etc.
    Log,
}

/// Sample file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    /// Tab-separated text with a header: train.tsv, valid.tsv, test.tsv.
    Tsv,
    /// Parquet (int64 ids, list<int64> histories, row groups of 65,536 rows): train.parquet, ...
    Parquet,
}

/// Sample protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProtocolArg {
    /// The DIN paper's: each next behaviour (positive) vs a sampled unseen item (negative).
    NextItem,
    /// Ratings as labels (>= --positive-threshold), histories of earlier positives.
    Rating,
}

/// Turn a raw behaviour log into DIN samples, a config and a vocabulary.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The log file (a folder for --format movielens).
    #[arg(long)]
    input: PathBuf,
    /// Input format.
    #[arg(long, value_enum)]
    format: Format,
    /// Output folder: train.tsv, valid.tsv, test.tsv (or .parquet), config.toml, vocab.json, items.json.
    #[arg(long)]
    out: PathBuf,
    /// Format of the sample files.
    #[arg(long, value_enum, default_value = "tsv")]
    output_format: OutputFormat,
    /// How samples are made.
    #[arg(long, value_enum, default_value = "next-item")]
    protocol: ProtocolArg,
    /// Lowest positive rating/label value for --protocol rating.
    #[arg(long, default_value_t = 4.0)]
    positive_threshold: f32,
    /// --protocol next-item: only ratings (or label values) of at least this
    /// are behaviours, e.g. 4 for MovieLens' positive ratings.
    #[arg(long)]
    min_rating: Option<f32>,
    /// Longest history kept (the most recent behaviours).
    #[arg(long, default_value_t = 50)]
    max_len: usize,
    /// Seed of the negative sampler.
    #[arg(long, default_value_t = 2024)]
    seed: u64,
    /// Cut histories at a gap longer than this many days (a new session).
    #[arg(long)]
    session_gap_days: Option<f64>,
    /// Add the dense feature days_since_prev (ln(1 + days since the last history behaviour)).
    #[arg(long)]
    days_since_prev: bool,
    /// Only these behaviour types enter histories (comma-separated, e.g. cart,fav,buy).
    #[arg(long, value_delimiter = ',')]
    history_behaviors: Option<Vec<String>>,
    /// Also write each sample's history timestamps (column hist_time).
    #[arg(long)]
    history_times: bool,
    /// Each user's last N samples are held out as test (default: 1 for
    /// next-item, the paper's; 10 for rating, so that GAUC is defined).
    #[arg(long)]
    test_per_user: Option<usize>,
    /// Each user's N samples before the test ones are validation (valid.tsv),
    /// on which the generated config stops early and keeps the best epoch
    /// (default: --test-per-user's). 0: no validation file; the config
    /// validates on test.tsv and keeps the last epoch.
    #[arg(long)]
    valid_per_user: Option<usize>,
    /// Give the generated config a user_id embedding. Default: off for
    /// next-item (it overfits; the history says who the user is), on for
    /// rating (it learns each user's rating level).
    #[arg(long, conflicts_with = "no_user_feature")]
    user_feature: bool,
    /// No user_id embedding in the generated config (see --user-feature).
    #[arg(long)]
    no_user_feature: bool,
    /// Next-item protocol: sampled negatives per positive (distinct items
    /// the user never touched), sharing its history like a page view's
    /// candidates.
    #[arg(long, default_value_t = 1)]
    negatives: usize,
    /// Write one line per group of samples that share a user side (a
    /// positive and its negatives): the grouped layout, with the
    /// candidates' values joined by `|` (input.layout = "grouped"). With
    /// --output-format parquet: one sample per row, and the config sets
    /// data.group = true, which stores each group's user side once.
    #[arg(long)]
    grouped: bool,
    /// Embedding width in the generated config.
    #[arg(long, default_value_t = 8)]
    embedding_dim: usize,
    /// Skip malformed rows (and count them) instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// --format log: field delimiter (one character).
    #[arg(long, default_value = ",")]
    delimiter: String,
    /// --format log: column names in file order when the file has no header row.
    #[arg(long, value_delimiter = ',')]
    columns: Option<Vec<String>>,
    /// --format log: user column.
    #[arg(long, default_value = "user_id")]
    user_col: String,
    /// --format log: item column.
    #[arg(long, default_value = "item_id")]
    item_col: String,
    /// --format log: category column.
    #[arg(long, default_value = "category_id")]
    category_col: String,
    /// --format log: the log has no category column (every item gets one category).
    #[arg(long, conflicts_with = "category_col")]
    no_category: bool,
    /// --format log: timestamp column (integer seconds).
    #[arg(long, default_value = "timestamp")]
    time_col: String,
    /// --format log: behaviour-type column.
    #[arg(long)]
    behavior_col: Option<String>,
    /// --format log: label or rating column (for --protocol rating).
    #[arg(long)]
    label_col: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The flag that names a log column of each role.
fn flag(role: &str) -> &'static str {
    match role {
        "user" => "--user-col",
        "item" => "--item-col",
        "category" => "--category-col, or pass --no-category for a log without one",
        "time" => "--time-col",
        "behavior" => "--behavior-col",
        _ => "--label-col",
    }
}

/// Names the flag for each missing column.
fn with_flags(e: din::Error) -> anyhow::Error {
    match e {
        din::Error::MissingLogColumns { path, missing, header } => {
            let list: Vec<String> = missing
                .iter()
                .map(|(role, c)| format!("`{c}` (the {role} column; set it with {})", flag(role)))
                .collect();
            anyhow::anyhow!(
                "{}: the log has no column {}; its columns are: {header}",
                path.display(),
                list.join(", ")
            )
        }
        other => other.into(),
    }
}

/// Runs `din prepare`.
pub fn run(args: Args) -> Result<()> {
    let log = match args.format {
        Format::Movielens => read_movielens(&args.input, args.skip_bad_rows)?,
        Format::Amazon => read_log(&LogSpec::amazon(args.input.clone()), args.skip_bad_rows)?,
        Format::Taobao => read_log(&LogSpec::taobao(args.input.clone()), args.skip_bad_rows)?,
        Format::Log => {
            let [delimiter] = args.delimiter.as_bytes() else {
                bail!(
                    "--delimiter must be exactly one ASCII character, got {:?}",
                    args.delimiter
                );
            };
            let spec = LogSpec {
                path: args.input.clone(),
                delimiter: *delimiter,
                header: args.columns.is_none(),
                columns: args.columns.clone().unwrap_or_default(),
                user: args.user_col.clone(),
                item: args.item_col.clone(),
                category: (!args.no_category).then(|| args.category_col.clone()),
                time: args.time_col.clone(),
                behavior: args.behavior_col.clone(),
                value: args.label_col.clone(),
            };
            if args.protocol == ProtocolArg::Rating && spec.value.is_none() {
                bail!("--protocol rating needs the rating or label column: name it with --label-col");
            }
            if args.min_rating.is_some() && spec.value.is_none() {
                bail!("--min-rating needs the rating or label column: name it with --label-col");
            }
            read_log(&spec, args.skip_bad_rows).map_err(with_flags)?
        }
    };
    let test_per_user = args.test_per_user.unwrap_or(match args.protocol {
        ProtocolArg::NextItem => 1,
        ProtocolArg::Rating => 10,
    });
    let options = PrepareOptions {
        protocol: match args.protocol {
            ProtocolArg::NextItem => Protocol::NextItem,
            ProtocolArg::Rating => Protocol::Rating {
                threshold: args.positive_threshold,
            },
        },
        max_len: args.max_len,
        seed: args.seed,
        session_gap_days: args.session_gap_days,
        days_since_prev: args.days_since_prev,
        history_behaviors: args.history_behaviors.clone(),
        history_times: args.history_times,
        embedding_dim: args.embedding_dim,
        min_value: args.min_rating,
        test_per_user,
        valid_per_user: args.valid_per_user.unwrap_or(test_per_user),
        user_feature: args.user_feature || (args.protocol == ProtocolArg::Rating && !args.no_user_feature),
        negatives: args.negatives,
        grouped: args.grouped,
        format: match args.output_format {
            OutputFormat::Tsv => SampleFormat::Tsv,
            OutputFormat::Parquet => SampleFormat::Parquet,
        },
    };
    if let Some(g) = options.session_gap_days {
        if !(g.is_finite() && g > 0.0) {
            bail!("--session-gap-days must be a positive number of days, got {g}");
        }
    }
    let report = prepare(&log, &options, &args.out)?;
    for skipped in log.skipped.iter().take(5) {
        eprintln!("skipped: {skipped}");
    }
    if log.skipped.len() > 5 {
        eprintln!("skipped: ... and {} more malformed rows", log.skipped.len() - 5);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "read {} behaviours ({} malformed rows skipped): {} users, {} items, {} categories",
            report.events, report.skipped_rows, report.users, report.items, report.categories
        );
        if report.category_conflicts > 0 {
            println!(
                "{} behaviours name another category than their item's first one; they are given the first (the category is a function of the item)",
                report.category_conflicts
            );
        }
        if report.short_users > 0 {
            println!(
                "users left out (fewer than two behaviours, nothing to predict): {}",
                report.short_users
            );
        }
        if report.below_min_value > 0 {
            println!(
                "behaviours dropped (rated below --min-rating): {}",
                report.below_min_value
            );
        }
        println!(
            "wrote {} training, {} validation and {} test samples ({} positive) to {}",
            report.train_samples,
            report.valid_samples,
            report.test_samples,
            report.positives,
            args.out.display()
        );
        let q = report.history_len_quantiles;
        println!(
            "history length: mean {:.2}, p10 {}, p25 {}, median {}, p75 {}, p90 {}, max {}; {} samples with an empty history",
            report.mean_history_len, q[0], q[1], q[2], q[3], q[4], q[5], report.empty_histories
        );
        let training = if report.valid_samples > 0 {
            format!(
                "validates on {}, stops early, keeps the best epoch",
                report.validation.display()
            )
        } else {
            "validates on the test file and keeps the last epoch".to_string()
        };
        let user = if report.user_feature {
            "on"
        } else {
            "off: --user-feature turns it on"
        };
        println!(
            "config: {} ({training}; user_id embedding {user})",
            report.config.display()
        );
        println!("next:\n  {}\n  {}", report.train_command, report.evaluate_command);
    }
    Ok(())
}
