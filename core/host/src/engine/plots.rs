//! Plots, each written as SVG and PNG beside the numbers they draw:
//! training curves from a trainer's `trainer_log.jsonl` (as LLaMA-Factory's
//! `plot_loss` draws them: the logged values and their smoothed trend),
//! per-query differences of a run against the baseline (sorted ΔnDCG@10
//! bars, as IR papers show where a gain comes from), and the variants'
//! scores per dataset.
//!
//! Text is drawn with an embedded DejaVu Sans (plotters' ab_glyph
//! backend), so no system font library is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::engine::metrics::Measure;
use crate::engine::report::Results;

/// What drawing a plot can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The backend could not draw or write the file.
    #[error("{}: {message}", path.display())]
    Draw {
        /// The file being written.
        path: PathBuf,
        /// What plotters said.
        message: String,
    },
    /// A log that cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (800, 480);
// matplotlib's first two colours, as LLaMA-Factory's plots use them.
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are DejaVu's own: a failure here is a build defect.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

type DrawResult = Result<(), String>;

/// The range of `values` with a margin, never empty.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1.0) * 0.05 };
    (lo - pad, hi + pad)
}

/// LLaMA-Factory's smoothing of a training curve: an exponential moving
/// average whose weight grows with the number of points.
pub fn smooth(values: &[f64]) -> Vec<f64> {
    let Some(&first) = values.first() else { return Vec::new() };
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * values.len() as f64).exp()) - 0.5);
    let mut last = first;
    values
        .iter()
        .map(|&v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

/// A series of (x, y) points with a name for the legend.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A line chart of `series` (the first two in blue and orange).
pub fn lines(stem: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<Vec<PathBuf>, PlotError> {
    let (x0, x1) = span(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let (y0, y1) = span(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    macro_rules! draw {
        () => {
            |root: &DrawingArea<_, Shift>| -> DrawResult {
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                let mut chart = ChartBuilder::on(root)
                    .caption(title, (FONT, 22))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(64)
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(|e| e.to_string())?;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 16))
                    .light_line_style(WHITE.mix(0.0))
                    .draw()
                    .map_err(|e| e.to_string())?;
                for (i, s) in series.iter().enumerate() {
                    let color = [BLUE, ORANGE, GREEN, RED][i % 4];
                    let line = chart.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2))).map_err(|e| e.to_string())?;
                    line.label(s.name.as_str()).legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
                    if s.points.len() <= 30 {
                        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
                    }
                }
                chart
                    .configure_series_labels()
                    .label_font((FONT, 14))
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK.mix(0.3))
                    .draw()
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        };
    }
    both_with(stem, draw!(), draw!())
}

/// [`both`] with one closure per backend (a closure cannot be generic).
fn both_with<A, B>(stem: &Path, svg_draw: A, png_draw: B) -> Result<Vec<PathBuf>, PlotError>
where
    A: Fn(&DrawingArea<SVGBackend, Shift>) -> DrawResult,
    B: Fn(&DrawingArea<BitMapBackend, Shift>) -> DrawResult,
{
    register_font();
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir).map_err(|source| PlotError::Io { path: dir.to_owned(), source })?;
    }
    let name = stem.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let svg = stem.with_file_name(format!("{name}.svg"));
    let png = stem.with_file_name(format!("{name}.png"));
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        svg_draw(&root).and_then(|_| root.present().map_err(|e| e.to_string())).map_err(|message| PlotError::Draw { path: svg.clone(), message })?;
    }
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        png_draw(&root).and_then(|_| root.present().map_err(|e| e.to_string())).map_err(|message| PlotError::Draw { path: png.clone(), message })?;
    }
    Ok(vec![svg, png])
}

/// Vertical bars, one per label (the first, the baseline, in orange), with
/// their values written above them.
pub fn bars(stem: &Path, title: &str, y_label: &str, items: &[(String, f64)]) -> Result<Vec<PathBuf>, PlotError> {
    let n = items.len().max(1) as u32;
    let top = items.iter().map(|i| i.1).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    macro_rules! draw {
        () => {
            |root: &DrawingArea<_, Shift>| -> DrawResult {
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                let mut chart = ChartBuilder::on(root)
                    .caption(title, (FONT, 22))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(64)
                    .build_cartesian_2d((0..n).into_segmented(), 0f64..top)
                    .map_err(|e| e.to_string())?;
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(n as usize)
                    .x_label_formatter(&|x: &SegmentValue<u32>| match x {
                        SegmentValue::CenterOf(i) => items.get(*i as usize).map_or(String::new(), |it| it.0.clone()),
                        _ => String::new(),
                    })
                    .y_desc(y_label)
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 16))
                    .draw()
                    .map_err(|e| e.to_string())?;
                for (i, (_, v)) in items.iter().enumerate() {
                    let color = if i == 0 { ORANGE } else { BLUE };
                    chart
                        .draw_series(Histogram::vertical(&chart).margin(16).style(color.filled()).data([(i as u32, *v)]))
                        .map_err(|e| e.to_string())?;
                }
                chart
                    .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
                        Text::new(format!("{v:.4}"), (SegmentValue::CenterOf(i as u32), *v + top * 0.03), TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom)))
                    }))
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        };
    }
    both_with(stem, draw!(), draw!())
}

/// Per-query differences, sorted from the largest loss to the largest gain:
/// green bars above zero, red below, with how many queries each way.
pub fn deltas(stem: &Path, title: &str, y_label: &str, deltas: &[f64]) -> Result<Vec<PathBuf>, PlotError> {
    let mut d: Vec<f64> = deltas.iter().copied().filter(|v| v.is_finite()).collect();
    d.sort_by(f64::total_cmp);
    let (up, down) = (d.iter().filter(|v| **v > 0.0).count(), d.iter().filter(|v| **v < 0.0).count());
    let lim = d.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3) * 1.1;
    let n = d.len().max(1);
    let subtitle = format!("{up} queries better, {down} worse, {} unchanged", d.len() - up - down);
    macro_rules! draw {
        () => {
            |root: &DrawingArea<_, Shift>| -> DrawResult {
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                let mut chart = ChartBuilder::on(root)
                    .caption(format!("{title} ({subtitle})"), (FONT, 18))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(64)
                    .build_cartesian_2d(0f64..n as f64, -lim..lim)
                    .map_err(|e| e.to_string())?;
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_desc("queries, sorted by difference")
                    .y_desc(y_label)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 16))
                    .draw()
                    .map_err(|e| e.to_string())?;
                chart
                    .draw_series(d.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(i, v)| {
                        let color = if *v > 0.0 { GREEN } else { RED };
                        Rectangle::new([(i as f64, 0.0), (i as f64 + 1.0, *v)], color.filled())
                    }))
                    .map_err(|e| e.to_string())?;
                chart.draw_series(LineSeries::new([(0.0, 0.0), (n as f64, 0.0)], BLACK.stroke_width(1))).map_err(|e| e.to_string())?;
                Ok(())
            }
        };
    }
    both_with(stem, draw!(), draw!())
}

/// Every numeric value of a trainer log, by key, as (x, value) points: the
/// x is `step` (or LLaMA-Factory's `current_steps`), else the line number.
/// Nested objects are flattened (`{"eval": {"loss": ..}}` → `eval_loss`).
pub fn read_trainer_log(path: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Io { path: path.to_owned(), source })?;
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    fn flatten(prefix: &str, v: &serde_json::Value, x: f64, out: &mut BTreeMap<String, Vec<(f64, f64)>>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}_{k}") };
                    flatten(&key, v, x, out);
                }
            }
            serde_json::Value::Number(n) => {
                if let Some(y) = n.as_f64().filter(|y| y.is_finite()) {
                    out.entry(prefix.to_owned()).or_default().push((x, y));
                }
            }
            _ => {}
        }
    }
    for (i, line) in text.lines().enumerate() {
        // A torn last line (a killed trainer) is skipped like any non-JSON line.
        let Ok(serde_json::Value::Object(mut o)) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let x = ["step", "current_steps"].iter().find_map(|k| o.remove(*k)).and_then(|v| v.as_f64()).unwrap_or((i + 1) as f64);
        for k in ["epoch", "total_steps", "elapsed_time", "remaining_time", "percentage"] {
            o.remove(k);
        }
        flatten("", &serde_json::Value::Object(o), x, &mut out);
    }
    Ok(out)
}

/// A training directory as a reader knows it: the stage's folder (not a
/// trainer's `model` subfolder), without the `.partial` it has while the
/// stage runs.
fn run_name(dir: &Path) -> String {
    let name = |d: &Path| d.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let mut n = name(dir);
    if n == "model" {
        n = dir.parent().map(name).unwrap_or(n);
    }
    n.strip_suffix(".partial").map(str::to_owned).unwrap_or(n)
}

/// An axis label: whole numbers without ".0", others to at most four
/// decimals without trailing zeros, and never "-0".
fn tick(v: f64) -> String {
    let s = if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.4}").trim_end_matches('0').trim_end_matches('.').to_owned() };
    if s == "-0" { "0".into() } else { s }
}

/// Draws every curve of `dir/trainer_log.jsonl` that has at least two
/// points and is not constant, as `dir/training_KEY.{svg,png}`: the loss
/// with its smoothed trend, the others as logged. Returns the files
/// written (none when there is no log).
pub fn training_curves(dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let log = dir.join("trainer_log.jsonl");
    if !log.is_file() {
        return Ok(Vec::new());
    }
    let mut written = Vec::new();
    for (key, points) in read_trainer_log(&log)? {
        let constant = points.windows(2).all(|w| w[0].1 == w[1].1);
        if points.len() < 2 || constant {
            continue;
        }
        let file = crate::util::paths::sanitize(&key);
        let mut series = vec![Series { name: "original".into(), points: points.clone() }];
        if key == "loss" || key.ends_with("_loss") {
            let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
            let trend = smooth(&ys);
            series.push(Series { name: "smoothed".into(), points: points.iter().zip(trend).map(|(p, y)| (p.0, y)).collect() });
        }
        let title = format!("training {key} of {}", run_name(dir));
        written.extend(lines(&dir.join(format!("training_{file}")), &title, "step", &key, &series)?);
    }
    Ok(written)
}

/// The plots of a comparison, under `dir`: per dataset, the runs' `measure`
/// as bars (`variants.DATASET`) and, for every run but the baseline, its
/// per-query difference from the baseline (`delta.RUN.DATASET`). The
/// baseline is the run named, else the first. Returns the files written.
pub fn comparison(results: &[Results], baseline: Option<&str>, measure: &Measure, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let base_name = baseline.map(str::to_owned).or_else(|| results.first().map(|r| r.name.clone())).unwrap_or_default();
    let mut datasets: Vec<&str> = Vec::new();
    for r in results {
        if !datasets.contains(&r.dataset.as_str()) {
            datasets.push(&r.dataset);
        }
    }
    let safe = crate::util::paths::sanitize;
    let mut written = Vec::new();
    for ds in datasets {
        let runs: Vec<&Results> = results.iter().filter(|r| r.dataset == ds).collect();
        let items: Vec<(String, f64)> = runs.iter().filter_map(|r| r.evaluation.aggregate.get(measure).map(|v| (r.name.clone(), *v))).collect();
        if items.is_empty() {
            continue;
        }
        written.extend(bars(&dir.join(format!("variants.{}", safe(ds))), &format!("{ds}: {measure}"), &measure.to_string(), &items)?);
        let Some(base) = runs.iter().find(|r| r.name == base_name) else { continue };
        for r in runs.iter().filter(|r| r.name != base_name) {
            let d: Vec<f64> = r
                .evaluation
                .per_query
                .iter()
                .filter_map(|(q, m)| Some(m.get(measure)? - base.evaluation.per_query.get(q)?.get(measure)?))
                .collect();
            if d.is_empty() {
                continue;
            }
            let title = format!("{ds}: {} vs {base_name}", r.name);
            written.extend(deltas(&dir.join(format!("delta.{}.{}", safe(&r.name), safe(ds))), &title, &format!("Δ{measure}"), &d)?);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_llamafactorys() {
        // LLaMA-Factory's smooth([1, 0, 0]): weight 1.8 * (1 / (1 + e^-0.15) - 0.5).
        let w = 1.8 * (1.0 / (1.0 + (-0.15f64).exp()) - 0.5);
        let s = smooth(&[1.0, 0.0, 0.0]);
        assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - w).abs() < 1e-12 && (s[2] - w * w).abs() < 1e-12, "{s:?}");
        assert!(smooth(&[]).is_empty());
    }

    /// Axis labels read as written numbers; titles name the stage, not its
    /// temporary folder or a trainer's `model` subfolder.
    #[test]
    fn ticks_and_titles_read_cleanly() {
        assert_eq!([tick(3.0), tick(-0.0), tick(-1e-9), tick(0.25), tick(1.0 / 3.0), tick(250.0)], ["3", "0", "0", "0.25", "0.3333", "250"]);
        assert_eq!(run_name(Path::new("/r/scifact/rlrf-train-r1-abc.partial")), "rlrf-train-r1-abc");
        assert_eq!(run_name(Path::new("/r/scifact/rlgf-train-r1-abc/model")), "rlgf-train-r1-abc");
    }

    #[test]
    fn plots_are_written_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let log = "{\"step\": 1, \"loss\": 0.69, \"accuracy\": 0.5, \"learning_rate\": 1e-5}\n\
                   {\"step\": 0, \"eval\": {\"loss\": 0.7}}\n\
                   {\"step\": 2, \"loss\": 0.60, \"accuracy\": 0.5, \"learning_rate\": 1e-5}\n\
                   {\"step\": 3, \"loss\": 0.52, \"accuracy\": 0.75, \"learning_rate\": 1e-5}\n\
                   {\"step\": 3, \"eval\": {\"loss\": 0.65}}\n{\"step\": 4, \"lo";
        std::fs::write(dir.path().join("trainer_log.jsonl"), log).unwrap();
        let curves = read_trainer_log(&dir.path().join("trainer_log.jsonl")).unwrap();
        assert_eq!(curves["loss"], vec![(1.0, 0.69), (2.0, 0.60), (3.0, 0.52)]);
        assert_eq!(curves["eval_loss"], vec![(0.0, 0.7), (3.0, 0.65)]);
        let files = training_curves(dir.path()).unwrap();
        let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
        // The constant learning rate is not drawn.
        assert_eq!(names, ["training_accuracy.svg", "training_accuracy.png", "training_eval_loss.svg", "training_eval_loss.png", "training_loss.svg", "training_loss.png"]);
        let svg = std::fs::read_to_string(dir.path().join("training_loss.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("smoothed") && svg.contains("original"), "{svg}");
        let png = std::fs::read(dir.path().join("training_loss.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

        let f = bars(&dir.path().join("variants"), "SciFact nDCG@10", "nDCG@10", &[("base".into(), 0.6451), ("both".into(), 0.6601)]).unwrap();
        assert!(std::fs::read_to_string(&f[0]).unwrap().contains("0.6601"));
        let f = deltas(&dir.path().join("delta"), "both vs base", "ΔnDCG@10", &[0.1, -0.2, 0.0, 0.3]).unwrap();
        assert!(std::fs::read_to_string(&f[0]).unwrap().contains("2 queries better, 1 worse, 1 unchanged"));
    }
}
