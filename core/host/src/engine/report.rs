//! Results files and comparison tables.
//!
//! A results JSON holds one run on one dataset: aggregate and per-query
//! values, timings and the configuration that produced it. `rir table`
//! renders any number of them as runs × (dataset, measure), as ranx does:
//! best value in bold, delta against a baseline run, and significance marks
//! from a paired two-sided t-test and a paired randomization test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use comfy_table::{presets::UTF8_FULL_CONDENSED, Attribute, Cell, CellAlignment, Table};
use serde::{Deserialize, Serialize};

use crate::engine::metrics::{Evaluation, Measure};
use crate::engine::stats::{paired_t_test, randomization_test};

/// The `schema` tag of a results file this version reads and writes.
pub const RESULTS_SCHEMA: &str = "rir.results.v1";

/// One evaluated run on one dataset: what `rir eval` writes as
/// `NAME.DATASET.json` and `rir table` compares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// [`RESULTS_SCHEMA`].
    pub schema: String,
    /// Run name shown in tables.
    pub name: String,
    /// The dataset's name.
    pub dataset: String,
    /// The qrels split evaluated on.
    pub split: String,
    /// Per-query and mean values.
    pub evaluation: Evaluation,
    /// Seconds per step (load, encode_corpus, encode_queries, generate, search, evaluate).
    pub timings: BTreeMap<String, f64>,
    /// Everything that produced the run (plugins, their configs, k, index, ...).
    pub config: serde_json::Value,
    /// The rir version that wrote it.
    pub rir_version: String,
    /// When, in seconds since the Unix epoch.
    pub created_unix: u64,
}

/// What reading and comparing results can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A results file that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file that is not a results file of this schema.
    #[error("{}: not a rir results file: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `--baseline` names no run (the name, the runs there are).
    #[error("baseline '{0}' is not one of the runs ({1})")]
    NoBaseline(String, String),
    /// Nothing to compare, or options that do not fit the runs.
    #[error("{0}")]
    Usage(String),
}

impl Results {
    /// Reads a results file; the error names it.
    pub fn read(path: &Path) -> Result<Self, ReportError> {
        let bytes = std::fs::read(path).map_err(|source| ReportError::Io { path: path.into(), source })?;
        Self::from_slice(path, &bytes)
    }

    fn from_slice(path: &Path, bytes: &[u8]) -> Result<Self, ReportError> {
        let r: Results =
            serde_json::from_slice(bytes).map_err(|e| ReportError::Parse { path: path.into(), reason: e.to_string() })?;
        if r.schema != RESULTS_SCHEMA {
            return Err(ReportError::Parse { path: path.into(), reason: format!("schema {:?}, expected {RESULTS_SCHEMA:?}", r.schema) });
        }
        Ok(r)
    }

    /// Like `read`, but `None` for a file that is no results file (a
    /// `stage.json`, a run file, a table): JSON without results' schema, or
    /// not JSON and not named `.json`. A `.json` file that fails to parse, or a
    /// results file of another schema version, is still an error.
    pub fn read_if_results(path: &Path) -> Result<Option<Self>, ReportError> {
        let bytes = std::fs::read(path).map_err(|source| ReportError::Io { path: path.into(), source })?;
        let schema = serde_json::from_slice::<serde_json::Value>(&bytes).map(|v| v.get("schema").and_then(|s| s.as_str()).map(str::to_owned));
        match schema {
            Ok(Some(s)) if s.starts_with("rir.results") => Self::from_slice(path, &bytes).map(Some),
            Ok(_) => Ok(None),
            Err(_) if path.extension().is_some_and(|e| e == "json") => Self::from_slice(path, &bytes).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Where this run sits in the experiment that made it (`rir run`).
    fn variant_index(&self) -> Option<u64> {
        self.config["experiment"]["variant_index"].as_u64()
    }

    /// Writes atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), ReportError> {
        let tmp = path.with_extension("json.partial");
        let err = |source| ReportError::Io { path: path.into(), source };
        let bytes = serde_json::to_vec_pretty(self).expect("serialisable");
        crate::util::files::replace_with(path, &tmp, |w| std::io::Write::write_all(w, &bytes)).map_err(err)
    }
}

/// The results files among `paths`: a directory (an eval stage's, or one
/// of a glob over run folders) gives the files in it, sorted. Also returns
/// the files that were no results files, for a note.
pub fn collect(paths: &[PathBuf]) -> Result<(Vec<Results>, Vec<PathBuf>), ReportError> {
    let (mut results, mut skipped) = (Vec::new(), Vec::new());
    for p in paths {
        let files = if p.is_dir() {
            let io = |source| ReportError::Io { path: p.clone(), source };
            let mut v: Vec<PathBuf> = std::fs::read_dir(p).map_err(io)?.flatten().map(|e| e.path()).filter(|f| f.is_file()).collect();
            v.sort();
            v
        } else {
            vec![p.clone()]
        };
        for f in files {
            match Results::read_if_results(&f)? {
                Some(r) => results.push(r),
                None => skipped.push(f),
            }
        }
    }
    Ok((results, skipped))
}

/// Runs of one experiment in the order it lists its variants (its first is
/// the default baseline), whatever order a shell glob gave the files.
/// `false` (nothing moved) when they are not all from one `rir run`.
pub fn order_by_variant(results: &mut [Results]) -> bool {
    let one = results.windows(2).all(|w| w[0].config["experiment"]["name"] == w[1].config["experiment"]["name"]);
    if !one || results.iter().any(|r| r.variant_index().is_none()) {
        return false;
    }
    results.sort_by_key(|r| (r.variant_index(), r.dataset.clone()));
    true
}

/// How a comparison is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A comfy-table for the terminal, marks and colours included.
    Terminal,
    /// A GitHub-flavoured Markdown table.
    Markdown,
    /// A LaTeX tabular (booktabs), best values in bold.
    Latex,
    /// One row per run and column, p-values included.
    Csv,
    /// The [`Comparison`] as JSON.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "terminal" | "term" => Ok(Format::Terminal),
            "md" | "markdown" => Ok(Format::Markdown),
            "latex" | "tex" => Ok(Format::Latex),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            _ => Err(format!("unknown format {s:?} (terminal, md, latex, csv, json)")),
        }
    }
}

/// What a comparison table shows and how it tests.
#[derive(Debug, Clone)]
pub struct TableOptions {
    /// Run name to compare against; the first run when None.
    pub baseline: Option<String>,
    /// Significance level for both tests.
    pub alpha: f64,
    /// Measures to show; every measure the runs share when empty.
    pub measures: Vec<Measure>,
    /// Iterations of the paired randomization test.
    pub randomization_iterations: usize,
    /// Show each cell's difference from the baseline.
    pub show_delta: bool,
    /// Correction for comparing several runs against one baseline.
    pub correction: Correction,
}

impl Default for TableOptions {
    fn default() -> Self {
        Self { baseline: None, alpha: 0.05, measures: vec![], randomization_iterations: 10_000, show_delta: true, correction: Correction::Holm }
    }
}

/// Multiple-comparison correction of the p-values in one column (one
/// dataset and measure: every run against the baseline), as ranx offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Correction {
    /// Holm–Bonferroni step-down (controls the family-wise error, less conservative).
    #[default]
    Holm,
    /// Bonferroni: each p-value times the number of comparisons.
    Bonferroni,
    /// No correction.
    None,
}

impl std::str::FromStr for Correction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "holm" => Ok(Correction::Holm),
            "bonferroni" => Ok(Correction::Bonferroni),
            "none" => Ok(Correction::None),
            o => Err(format!("unknown correction {o:?} (holm | bonferroni | none)")),
        }
    }
}

impl Correction {
    /// Adjusted p-values, in the order given (None stays None).
    pub fn adjust(self, ps: &[Option<f64>]) -> Vec<Option<f64>> {
        let idx: Vec<usize> = (0..ps.len()).filter(|&i| ps[i].is_some()).collect();
        let m = idx.len() as f64;
        let mut out = ps.to_vec();
        match self {
            Correction::None => {}
            Correction::Bonferroni => {
                for &i in &idx {
                    out[i] = ps[i].map(|p| (p * m).min(1.0));
                }
            }
            Correction::Holm => {
                let mut order = idx.clone();
                order.sort_by(|&a, &b| ps[a].unwrap_or(1.0).total_cmp(&ps[b].unwrap_or(1.0)));
                let mut running: f64 = 0.0;
                for (rank, &i) in order.iter().enumerate() {
                    let adj = ((m - rank as f64) * ps[i].unwrap_or(1.0)).min(1.0);
                    running = running.max(adj);
                    out[i] = Some(running);
                }
            }
        }
        out
    }

    fn legend(self, m: usize) -> String {
        let s = if m == 1 { "" } else { "s" };
        match self {
            Correction::None => "uncorrected".into(),
            Correction::Bonferroni => format!("Bonferroni-corrected over {m} comparison{s}"),
            Correction::Holm => format!("Holm–Bonferroni-corrected over {m} comparison{s}"),
        }
    }
}

/// One cell of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CellValue {
    /// The run's mean.
    pub value: f64,
    /// value − the baseline's (None for the baseline itself).
    pub delta: Option<f64>,
    /// Two-sided paired t-test p-value against the baseline.
    pub p_t_test: Option<f64>,
    /// Two-sided paired randomization test p-value against the baseline.
    pub p_randomization: Option<f64>,
    /// The p-values after the table's correction (what the marks use).
    pub p_t_test_adjusted: Option<f64>,
    /// The randomization test's p-value after the correction.
    pub p_randomization_adjusted: Option<f64>,
    /// The best value of its column.
    pub best: bool,
    /// Queries the mean is over.
    pub queries: usize,
}

/// The computed comparison, before rendering.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Run names, in row order.
    pub runs: Vec<String>,
    /// The baseline's name.
    pub baseline: String,
    /// The significance level.
    pub alpha: f64,
    /// The correction applied.
    pub correction: Correction,
    /// Comparisons per column the correction covered (runs besides the baseline).
    pub comparisons: usize,
    /// Column keys: (dataset, measure).
    pub columns: Vec<(String, String)>,
    /// rows[run][column]; None where a run lacks that dataset or measure.
    pub cells: Vec<Vec<Option<CellValue>>>,
}

/// Compares every run with the baseline on every (dataset, measure) they
/// share: means, differences, both paired tests and the correction.
pub fn compare(results: &[Results], opts: &TableOptions) -> Result<Comparison, ReportError> {
    if results.is_empty() {
        return Err(ReportError::Usage("no results to compare".into()));
    }
    let mut runs: Vec<String> = Vec::new();
    for r in results {
        if !runs.contains(&r.name) {
            runs.push(r.name.clone());
        }
    }
    let baseline = opts.baseline.clone().unwrap_or_else(|| runs[0].clone());
    if !runs.contains(&baseline) {
        return Err(ReportError::NoBaseline(baseline, runs.join(", ")));
    }
    let mut datasets: Vec<String> = Vec::new();
    for r in results {
        if !datasets.contains(&r.dataset) {
            datasets.push(r.dataset.clone());
        }
    }
    let measures: Vec<Measure> = if opts.measures.is_empty() {
        let mut m: Vec<Measure> = Vec::new();
        for r in results {
            for x in &r.evaluation.measures {
                if !m.contains(x) {
                    m.push(*x);
                }
            }
        }
        m
    } else {
        opts.measures.clone()
    };
    let find = |run: &str, ds: &str| results.iter().find(|r| r.name == run && r.dataset == ds);
    let mut columns = Vec::new();
    let mut comparisons = 0;
    let mut cells = vec![Vec::new(); runs.len()];
    for ds in &datasets {
        for m in &measures {
            columns.push((ds.clone(), m.to_string()));
            let base = find(&baseline, ds);
            let mut col: Vec<Option<CellValue>> = runs
                .iter()
                .map(|run| {
                    let r = find(run, ds)?;
                    let value = *r.evaluation.aggregate.get(m)?;
                    let mut cell = CellValue {
                        value,
                        delta: None,
                        p_t_test: None,
                        p_randomization: None,
                        p_t_test_adjusted: None,
                        p_randomization_adjusted: None,
                        best: false,
                        queries: r.evaluation.per_query.len(),
                    };
                    if let Some(b) = base.filter(|b| b.name != r.name) {
                        if let Some(bv) = b.evaluation.aggregate.get(m) {
                            cell.delta = Some(value - bv);
                            let (xs, ys) = paired(r, b, m);
                            if !xs.is_empty() {
                                cell.p_t_test = Some(paired_t_test(&xs, &ys));
                                cell.p_randomization = Some(randomization_test(&xs, &ys, opts.randomization_iterations, 0x5EED));
                            }
                        }
                    }
                    Some(cell)
                })
                .collect();
            // The correction runs over this column's comparisons with the baseline.
            let pt: Vec<Option<f64>> = col.iter().map(|c| c.as_ref().and_then(|c| c.p_t_test)).collect();
            let pr: Vec<Option<f64>> = col.iter().map(|c| c.as_ref().and_then(|c| c.p_randomization)).collect();
            let (at, ar) = (opts.correction.adjust(&pt), opts.correction.adjust(&pr));
            comparisons = comparisons.max(pt.iter().flatten().count());
            for (i, c) in col.iter_mut().enumerate() {
                if let Some(c) = c {
                    c.p_t_test_adjusted = at[i];
                    c.p_randomization_adjusted = ar[i];
                }
            }
            let best = col.iter().flatten().map(|c| c.value).fold(f64::NEG_INFINITY, f64::max);
            for c in col.iter_mut().flatten() {
                c.best = c.value == best;
            }
            for (i, c) in col.into_iter().enumerate() {
                cells[i].push(c);
            }
        }
    }
    Ok(Comparison { runs, baseline, alpha: opts.alpha, correction: opts.correction, comparisons, columns, cells })
}

/// Per-query values of measure `m` for the queries both runs evaluated.
fn paired(a: &Results, b: &Results, m: &Measure) -> (Vec<f64>, Vec<f64>) {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for (q, va) in &a.evaluation.per_query {
        if let (Some(x), Some(y)) = (va.get(m), b.evaluation.per_query.get(q).and_then(|vb| vb.get(m))) {
            xs.push(*x);
            ys.push(*y);
        }
    }
    (xs, ys)
}

/// Marks: `ᵗ` t-test and `ʳ` randomization test significant at alpha, after
/// the table's correction.
fn marks(c: &CellValue, alpha: f64) -> String {
    let mut s = String::new();
    if c.p_t_test_adjusted.is_some_and(|p| p < alpha) {
        s.push('ᵗ');
    }
    if c.p_randomization_adjusted.is_some_and(|p| p < alpha) {
        s.push('ʳ');
    }
    s
}

/// Renders a comparison in one format.
pub fn render(c: &Comparison, format: Format, show_delta: bool) -> String {
    let text = |cell: &Option<CellValue>| -> String {
        match cell {
            None => "-".into(),
            Some(v) => {
                let mut s = format!("{:.4}{}", v.value, marks(v, c.alpha));
                if let (true, Some(d)) = (show_delta, v.delta) {
                    s.push_str(&format!(" ({d:+.4})"));
                }
                s
            }
        }
    };
    // With one run there is nothing to compare, so no legend.
    let legend = if c.runs.len() > 1 {
        format!(
            "baseline: {}; ᵗ paired t-test, ʳ paired randomization test, p < {} against the baseline ({}); best in bold\n",
            c.baseline,
            c.alpha,
            c.correction.legend(c.comparisons)
        )
    } else {
        String::new()
    };
    match format {
        Format::Terminal => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            let mut header = vec![Cell::new("run")];
            header.extend(c.columns.iter().map(|(d, m)| Cell::new(format!("{d}\n{m}")).set_alignment(CellAlignment::Center)));
            t.set_header(header);
            for (i, run) in c.runs.iter().enumerate() {
                let mut row = vec![Cell::new(run)];
                for cell in &c.cells[i] {
                    let mut x = Cell::new(text(cell)).set_alignment(CellAlignment::Right);
                    if cell.as_ref().is_some_and(|v| v.best) {
                        x = x.add_attribute(Attribute::Bold);
                    }
                    row.push(x);
                }
                t.add_row(row);
            }
            format!("{t}\n{legend}")
        }
        Format::Markdown => {
            let mut s = String::from("| run |");
            for (d, m) in &c.columns {
                s.push_str(&format!(" {d} {m} |"));
            }
            s.push_str("\n|---|");
            s.push_str(&"---:|".repeat(c.columns.len()));
            s.push('\n');
            for (i, run) in c.runs.iter().enumerate() {
                s.push_str(&format!("| {run} |"));
                for cell in &c.cells[i] {
                    let t = text(cell);
                    if cell.as_ref().is_some_and(|v| v.best) {
                        s.push_str(&format!(" **{t}** |"));
                    } else {
                        s.push_str(&format!(" {t} |"));
                    }
                }
                s.push('\n');
            }
            if !legend.is_empty() {
                s.push_str(&format!("\n{legend}"));
            }
            s
        }
        Format::Latex => {
            let esc = |x: &str| x.replace('_', "\\_").replace('&', "\\&").replace('%', "\\%").replace('#', "\\#");
            let latex_cell = |cell: &Option<CellValue>| -> String {
                match cell {
                    None => "-".into(),
                    Some(v) => {
                        let mut num = format!("{:.4}", v.value);
                        if v.best {
                            num = format!("\\textbf{{{num}}}");
                        }
                        let m = marks(v, c.alpha).replace('ᵗ', "t").replace('ʳ', "r");
                        if !m.is_empty() {
                            num.push_str(&format!("$^{{{m}}}$"));
                        }
                        if let (true, Some(d)) = (show_delta, v.delta) {
                            num.push_str(&format!(" ({d:+.4})"));
                        }
                        num
                    }
                }
            };
            let mut s = format!("\\begin{{tabular}}{{l{}}}\n\\toprule\nrun", "r".repeat(c.columns.len()));
            for (d, m) in &c.columns {
                s.push_str(&format!(" & {} {}", esc(d), esc(m)));
            }
            s.push_str(" \\\\\n\\midrule\n");
            for (i, run) in c.runs.iter().enumerate() {
                s.push_str(&esc(run));
                for cell in &c.cells[i] {
                    s.push_str(&format!(" & {}", latex_cell(cell)));
                }
                s.push_str(" \\\\\n");
            }
            s.push_str("\\bottomrule\n\\end{tabular}\n");
            if !legend.is_empty() {
                s.push_str(&format!("% {}", legend.replace('ᵗ', "t").replace('ʳ', "r")));
            }
            s
        }
        Format::Csv => {
            let mut s = String::from("run,dataset,measure,value,delta,p_t_test,p_randomization,p_t_test_adjusted,p_randomization_adjusted,best\n");
            let opt = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
            for (i, run) in c.runs.iter().enumerate() {
                for ((d, m), cell) in c.columns.iter().zip(&c.cells[i]) {
                    if let Some(v) = cell {
                        s.push_str(&format!(
                            "{},{},{},{},{},{},{},{},{},{}\n",
                            csv_field(run),
                            csv_field(d),
                            m,
                            v.value,
                            opt(v.delta),
                            opt(v.p_t_test),
                            opt(v.p_randomization),
                            opt(v.p_t_test_adjusted),
                            opt(v.p_randomization_adjusted),
                            v.best
                        ));
                    }
                }
            }
            s
        }
        Format::Json => serde_json::to_string_pretty(c).expect("serialisable") + "\n",
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::Correction;

    #[test]
    fn holm_and_bonferroni_adjust_as_statsmodels_does() {
        let p = [Some(0.01), Some(0.04), None, Some(0.03), Some(0.005)];
        let close = |a: &[Option<f64>], b: &[Option<f64>]| a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => (x - y).abs() < 1e-12,
            (None, None) => true,
            _ => false,
        });
        // statsmodels.stats.multitest.multipletests(p, method="holm" | "bonferroni")
        assert!(close(&Correction::Holm.adjust(&p), &[Some(0.03), Some(0.06), None, Some(0.06), Some(0.02)]), "{:?}", Correction::Holm.adjust(&p));
        assert!(close(&Correction::Bonferroni.adjust(&p), &[Some(0.04), Some(0.16), None, Some(0.12), Some(0.02)]));
        assert_eq!(Correction::None.adjust(&p), p.to_vec());
        assert_eq!(Correction::Holm.adjust(&[Some(0.9), Some(0.8)]), [Some(1.0), Some(1.0)]);
    }
}
