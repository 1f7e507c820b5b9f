//! `din plot` (training curves from `history.json`) and `din explain` (the
//! attention weights of one sample's history against its candidates, the
//! DIN paper's Fig. 5), drawn as SVG or PNG with plotters.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use din::checkpoint::{write_atomic, EpochReport, HISTORY_FILE};
use din::data::Batch;
use din::schema::{EarlyStoppingConfig, Keep, Monitor};
use din::scorer::Scorer;
use din::train::EarlyStopping;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Draw a model's training curves.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// Model directory written by `din train`.
    #[arg(long)]
    model: PathBuf,
    /// The picture to write: `.svg` or `.png`.
    #[arg(long)]
    out: PathBuf,
}

/// Draw the attention weights of one sample's history.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Model directory written by `din train`.
    #[arg(long)]
    model: PathBuf,
    /// Data in the model's input format.
    #[arg(long)]
    data: PathBuf,
    /// The sample: its data row (0-based, not counting a header). The rows
    /// after it with the same history (its page view's other candidates)
    /// are drawn too, up to --candidates.
    #[arg(long, default_value_t = 0)]
    row: usize,
    /// Most candidates drawn.
    #[arg(long, default_value_t = 8)]
    candidates: usize,
    /// The picture to write: `.svg` or `.png`.
    #[arg(long)]
    out: PathBuf,
}

/// The picture formats `--out` may name, by extension.
#[derive(Debug, Clone, Copy)]
enum Format {
    /// Text drawn by the viewer.
    Svg,
    /// An RGB bitmap, text rasterised with the bundled font.
    Png,
}

/// The format `out` names.
fn format_of(out: &Path) -> Result<Format> {
    match out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => bail!("--out {}: name the picture .svg or .png", out.display()),
    }
}

/// Registers the bundled font (DejaVu Sans cut down to Latin-1, 40 KB; see
/// `assets/DejaVuSans-LICENSE.txt`) as plotters' "sans-serif": text is
/// measured with it in both formats and rasterised with it into a PNG, so
/// that no picture depends on the fonts a machine happens to have.
fn register_font() -> Result<()> {
    static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the bundled font cannot be read"))
}

/// An RGB buffer of `size` pixels as a PNG file's bytes.
fn png_bytes(rgb: &[u8], (width, height): (u32, u32)) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("encoding the PNG")?;
    writer.write_image_data(rgb).context("encoding the PNG")?;
    writer.finish().context("encoding the PNG")?;
    Ok(bytes)
}

/// Draws `$body` (a block that draws on `$root` and ends in `Ok(())`) on a
/// white picture of `$size` pixels in the format `$out` names, and writes
/// it atomically. A macro because plotters' SVG and bitmap backends are
/// distinct types, and a closure cannot be generic over them: the body is
/// compiled once per backend.
macro_rules! render {
    ($out:expr, $size:expr, |$root:ident| $body:block) => {{
        let (out, size): (&Path, (u32, u32)) = ($out, $size);
        register_font()?;
        let bytes = match format_of(out)? {
            Format::Svg => {
                let mut svg = String::new();
                {
                    let area = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                    let $root = &area;
                    $root.fill(&WHITE).map_err(drawing)?;
                    (|| -> Result<()> { $body })()?;
                    $root.present().map_err(drawing)?;
                }
                svg.into_bytes()
            }
            Format::Png => {
                let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
                {
                    let area = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
                    let $root = &area;
                    $root.fill(&WHITE).map_err(drawing)?;
                    (|| -> Result<()> { $body })()?;
                    $root.present().map_err(drawing)?;
                }
                png_bytes(&rgb, size)?
            }
        };
        write_atomic(out, &bytes)?;
    }};
}

/// A plotters error as anyhow's.
fn drawing<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

/// Runs `din plot`.
pub fn plot(args: PlotArgs) -> Result<()> {
    format_of(&args.out)?;
    let scorer =
        Scorer::load(&args.model).with_context(|| format!("loading the model from {}", args.model.display()))?;
    let path = args.model.join(HISTORY_FILE);
    let text = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let history: Vec<EpochReport> =
        serde_json::from_slice(&text).with_context(|| format!("{}: not a training history", path.display()))?;
    if history.is_empty() {
        bail!("{}: no epochs to draw", path.display());
    }
    let tc = &scorer.config.train;
    // The epoch the model directory holds: the best by the monitor under
    // keep = "best" (tracked as training tracked it), else the last.
    let monitor = tc.early_stopping.as_ref().map_or(Monitor::ValLogloss, |e| e.monitor);
    let mut tracker = EarlyStopping::new(EarlyStoppingConfig {
        monitor,
        patience: usize::MAX,
        restore_best: false,
    });
    for r in &history {
        if let Some(v) = &r.validation {
            tracker.observe(r.epoch, v);
        }
    }
    let saved = match (tc.keep, tracker.best()) {
        (Keep::Best, Some((e, _))) => e,
        _ => history.len(),
    };
    let epochs = history.len() as f64;
    let points = |value: fn(&EpochReport) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|r| Some((r.epoch as f64, value(r)?)))
            .collect()
    };
    let losses = vec![
        ("train loss", points(|r| Some(r.train_loss))),
        ("validation logloss", points(|r| Some(r.validation.as_ref()?.logloss))),
    ];
    let ranks = vec![
        ("validation AUC", points(|r| r.validation.as_ref()?.auc)),
        ("validation GAUC", points(|r| r.validation.as_ref()?.gauc)),
    ];
    let name = args
        .model
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    render!(&args.out, (1000, 420), |root| {
        let panels = root.split_evenly((1, 2));
        for (panel, (title, series)) in panels.iter().zip([("loss", &losses), ("ranking", &ranks)]) {
            let values: Vec<f64> = series
                .iter()
                .flat_map(|(_, s)| s.iter().map(|p| p.1))
                .filter(|v| v.is_finite())
                .collect();
            let (lo, hi) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
            let pad = ((hi - lo) * 0.1).max(1e-3);
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{name}: {title}"), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                // Headroom above the curves for the legend.
                .build_cartesian_2d(0.5..epochs + 0.5, lo - pad..hi + 5.0 * pad)
                .map_err(drawing)?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .x_labels(history.len().min(20))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(drawing)?;
            for (k, (label, points)) in series.iter().enumerate() {
                if points.is_empty() {
                    continue;
                }
                let color = Palette99::pick(k).to_rgba();
                chart
                    .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                    .map_err(drawing)?
                    .label(*label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(drawing)?;
            }
            let marker = format!("saved (epoch {saved})");
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(saved as f64, lo - pad), (saved as f64, hi + 5.0 * pad)],
                    BLACK.stroke_width(2),
                )))
                .map_err(drawing)?
                .label(marker)
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(drawing)?;
        }
        Ok(())
    });
    println!(
        "drew {} epochs of {} to {} (saved epoch {saved})",
        history.len(),
        args.model.display(),
        args.out.display()
    );
    Ok(())
}

/// Runs `din explain`.
pub fn explain(args: ExplainArgs) -> Result<()> {
    format_of(&args.out)?;
    let scorer =
        Scorer::load(&args.model).with_context(|| format!("loading the model from {}", args.model.display()))?;
    // With the labels when the file has them, to mark the clicked candidate.
    let data = match scorer.read(&args.data, true) {
        Ok(d) => d,
        Err(_) => scorer.read(&args.data, false)?,
    };
    let layout = &scorer.layout;
    if args.row >= data.len() {
        bail!(
            "--row {}: {} has {} data rows (0 to {})",
            args.row,
            args.data.display(),
            data.len(),
            data.len().saturating_sub(1)
        );
    }
    let (target, hist) = layout.pairs[0];
    let history = data.batch.history(hist, args.row).to_vec();
    if history.is_empty() {
        bail!(
            "--row {}: line {} has an empty history ({}): nothing to attend to; pick another row",
            args.row,
            data.lines[args.row],
            layout.sequences[hist].name
        );
    }
    // The row and the following ones with the same history: its candidates.
    let rows: Vec<usize> = (args.row..data.len())
        .take_while(|&r| data.batch.history(hist, r) == history.as_slice())
        .take(args.candidates.max(1))
        .collect();
    let batch = Batch::gather(&data.batch, &rows);
    let (scores, weights) = scorer.model.predict_with_weights(&batch);
    let n = history.len();
    // Raw ids when the model has a vocabulary.
    let table = &layout.tables[layout.sequences[hist].table].name;
    let target_table = &layout.tables[layout.sparse[target].table].name;
    let raw = |table: &str, id: u32| -> String {
        scorer
            .assets
            .vocab
            .as_ref()
            .and_then(|v| v.raw(table, id))
            .map_or_else(|| id.to_string(), str::to_string)
    };
    let behaviours: Vec<String> = history.iter().map(|&id| raw(table, id)).collect();
    let candidates: Vec<String> = rows
        .iter()
        .zip(&scores)
        .map(|(&r, p)| {
            let clicked = data.batch.labels.get(r) == Some(&1.0);
            format!(
                "{} (p {p:.3}){}",
                raw(target_table, data.batch.sparse_id(target, r)),
                if clicked { ", clicked" } else { "" }
            )
        })
        .collect();
    let max = weights.iter().map(|w| w.abs()).fold(f32::MIN_POSITIVE, f32::max);
    let width = (160 + 36 * n as u32).clamp(480, 2400);
    let height = 140 + 34 * rows.len() as u32;
    let title = format!(
        "attention of {} (line {}) over {}",
        args.data.file_name().unwrap_or_default().to_string_lossy(),
        data.lines[args.row],
        layout.sequences[hist].name
    );
    render!(&args.out, (width, height), |root| {
        let k = rows.len();
        let mut chart = ChartBuilder::on(root)
            .caption(&title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(70)
            .y_label_area_size(190)
            .build_cartesian_2d((0..n as i32).into_segmented(), (0..k as i32).into_segmented())
            .map_err(drawing)?;
        // Segment i is drawn at its centre; row 0 at the top.
        let centre = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => Some(*i as usize),
            _ => None,
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n)
            .y_labels(k)
            .x_desc(format!(
                "history, oldest first ({table} ids); weights as scored (no softmax: they need not sum to 1)"
            ))
            .x_label_formatter(&|x| centre(x).and_then(|i| behaviours.get(i).cloned()).unwrap_or_default())
            .y_label_formatter(&|y| {
                centre(y)
                    .and_then(|i| candidates.get((k - 1).checked_sub(i)?).cloned())
                    .unwrap_or_default()
            })
            .draw()
            .map_err(drawing)?;
        // Red for positive weights, blue for negative, by |w| / max |w|.
        let cell = |c: usize, t: usize| {
            let w = weights[c * n + t] / max;
            let fade = (255.0 * (1.0 - w.abs().min(1.0))) as u8;
            let color = if w >= 0.0 {
                RGBColor(255, fade, fade)
            } else {
                RGBColor(fade, fade, 255)
            };
            let y = (k - 1 - c) as i32;
            Rectangle::new(
                [
                    (SegmentValue::Exact(t as i32), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(t as i32 + 1), SegmentValue::Exact(y + 1)),
                ],
                color.filled(),
            )
        };
        let all = || (0..k).flat_map(|c| (0..n).map(move |t| (c, t)));
        chart.draw_series(all().map(|(c, t)| cell(c, t))).map_err(drawing)?;
        chart
            .draw_series(all().map(|(c, t)| {
                let y = (k - 1 - c) as i32;
                Text::new(
                    format!("{:.2}", weights[c * n + t]),
                    (SegmentValue::CenterOf(t as i32), SegmentValue::CenterOf(y)),
                    ("sans-serif", 10)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )
            }))
            .map_err(drawing)?;
        Ok(())
    });
    println!(
        "drew the attention of {} candidates over {n} behaviours to {}",
        rows.len(),
        args.out.display()
    );
    Ok(())
}
