//! The results of one run: every measurement, every figure beside its
//! baseline, the scaling curves, and their three renderings (terminal
//! table, JSON, SVG charts).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use crate::load::{Latency, Measured};

/// One measurement of one workload against one target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was done, e.g. `artifact get 4 KiB`.
    pub workload: String,
    /// Who did it: `trove`, `in-process store`, `null gRPC`, `redis`, `raw tcp`.
    pub target: String,
    /// Callers in flight (closed loop) or the cap on them (open loop).
    pub concurrency: usize,
    /// Calls completed.
    pub ops: u64,
    /// Calls per second.
    pub ops_per_sec: f64,
    /// Payload MiB per second.
    pub mib_per_sec: f64,
    /// Latency percentiles.
    pub latency: Latency,
}

impl Row {
    /// Summarises a measurement.
    pub fn new(workload: &str, target: &str, concurrency: usize, measured: &Measured) -> Self {
        Row {
            workload: workload.to_owned(),
            target: target.to_owned(),
            concurrency,
            ops: measured.ops,
            ops_per_sec: measured.ops_per_sec(),
            mib_per_sec: measured.bytes_per_sec() / (1024.0 * 1024.0),
            latency: measured.latency(),
        }
    }
}

/// A figure next to the limit it chases.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What is compared, e.g. `small get throughput`.
    pub figure: String,
    /// Unit of both values.
    pub unit: String,
    /// Trove's value.
    pub trove: f64,
    /// Name of the baseline.
    pub baseline: String,
    /// The baseline's value, measured in the same run.
    pub baseline_value: f64,
    /// `trove / baseline_value` (for latencies: `baseline_value / trove`),
    /// so 1.0 means "at the limit" and smaller is further from it.
    pub ratio: f64,
}

/// One series of a scaling curve.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Target the series belongs to.
    pub label: String,
    /// Points in increasing `x`.
    pub points: Vec<Point>,
}

/// One point of a scaling curve.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// The varied parameter.
    pub x: f64,
    /// Calls per second.
    pub ops_per_sec: f64,
    /// Payload MiB per second.
    pub mib_per_sec: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
}

impl Point {
    /// A point from a measurement.
    pub fn new(x: f64, measured: &Measured) -> Self {
        let latency = measured.latency();
        Point {
            x,
            ops_per_sec: measured.ops_per_sec(),
            mib_per_sec: measured.bytes_per_sec() / (1024.0 * 1024.0),
            p50_us: latency.p50_us,
            p99_us: latency.p99_us,
        }
    }
}

/// A scaling curve: one parameter varied, the others fixed.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    /// File-name friendly identifier.
    pub id: String,
    /// Title of the chart.
    pub title: String,
    /// Name of the varied parameter.
    pub x_label: String,
    /// Whether the chart's throughput axis shows MiB/s instead of calls/s.
    pub bytes: bool,
    /// One series per target.
    pub series: Vec<Series>,
}

/// A single number that has no baseline of its own (space, memory).
#[derive(Debug, Clone, Serialize)]
pub struct Fact {
    /// What it is.
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
}

/// The machine the run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model, from /proc/cpuinfo.
    pub cpu: String,
    /// Cores the process may use.
    pub cores: usize,
    /// Physical memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads what Linux tells about the machine (fields stay empty elsewhere).
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `tiny`, `quick` or `full`.
    pub mode: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_at: u64,
    /// Where it ran.
    pub machine: Machine,
    /// Every measurement.
    pub rows: Vec<Row>,
    /// Every figure beside its baseline.
    pub comparisons: Vec<Comparison>,
    /// Scaling curves.
    pub curves: Vec<Curve>,
    /// Space and memory.
    pub facts: Vec<Fact>,
    /// Baselines that could not run, and why.
    pub skipped: Vec<String>,
}

impl Report {
    /// Records a comparison where larger is better.
    pub fn compare(&mut self, figure: &str, unit: &str, trove: f64, baseline: &str, value: f64) {
        self.comparisons.push(Comparison {
            figure: figure.to_owned(),
            unit: unit.to_owned(),
            trove,
            baseline: baseline.to_owned(),
            baseline_value: value,
            ratio: if value > 0.0 { trove / value } else { 0.0 },
        });
    }

    /// Records a comparison where smaller is better (latencies).
    pub fn compare_latency(&mut self, figure: &str, trove_us: u64, baseline: &str, value_us: u64) {
        self.comparisons.push(Comparison {
            figure: figure.to_owned(),
            unit: "µs".to_owned(),
            trove: trove_us as f64,
            baseline: baseline.to_owned(),
            baseline_value: value_us as f64,
            ratio: if trove_us > 0 {
                value_us as f64 / trove_us as f64
            } else {
                0.0
            },
        });
    }

    /// Records a fact.
    pub fn fact(&mut self, name: &str, value: f64, unit: &str) {
        self.facts.push(Fact {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
        });
    }

    /// The terminal rendering: comparisons first, then every measurement.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "\nmachine: {} | {} cores | {:.1} GiB | Linux {} | mode {}",
            m.cpu, m.cores, m.memory_gib, m.kernel, self.mode
        );
        let _ = writeln!(
            out,
            "\n{:<44} {:>12} {:<22} {:>12} {:>7}",
            "figure", "trove", "baseline", "baseline", "ratio"
        );
        for c in &self.comparisons {
            let _ = writeln!(
                out,
                "{:<44} {:>12} {:<22} {:>12} {:>7.3}",
                format!("{} ({})", c.figure, c.unit),
                human(c.trove),
                c.baseline,
                human(c.baseline_value),
                c.ratio
            );
        }
        let _ = writeln!(
            out,
            "\n{:<34} {:<18} {:>5} {:>11} {:>10} {:>9} {:>9} {:>9}",
            "workload", "target", "conc", "ops/s", "MiB/s", "p50 µs", "p99 µs", "p99.9 µs"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{:<34} {:<18} {:>5} {:>11} {:>10.1} {:>9} {:>9} {:>9}",
                r.workload,
                r.target,
                r.concurrency,
                human(r.ops_per_sec),
                r.mib_per_sec,
                r.latency.p50_us,
                r.latency.p99_us,
                r.latency.p999_us
            );
        }
        if !self.facts.is_empty() {
            let _ = writeln!(out);
            for f in &self.facts {
                let _ = writeln!(out, "{:<52} {:>14} {}", f.name, human(f.value), f.unit);
            }
        }
        for s in &self.skipped {
            let _ = writeln!(out, "skipped: {s}");
        }
        out
    }

    /// Writes `report.json` and one SVG chart per curve into `dir`.
    pub fn write(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", json.display()))?;
        let mut written = vec![json];
        for curve in &self.curves {
            let path = dir.join(format!("{}.svg", curve.id));
            draw(curve, &path).with_context(|| format!("draw {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Numbers with thousands separators, or three significant digits below 100.
fn human(value: f64) -> String {
    if value.abs() >= 100.0 {
        let digits = format!("{value:.0}");
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 && c != '-' {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{value:.3}")
    }
}

/// Two panels: throughput (top) and p99 latency (bottom), log-scaled x.
fn draw(curve: &Curve, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(380);
    let xs = curve
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.x));
    let x_min = xs.clone().fold(f64::INFINITY, f64::min).max(1e-9);
    let x_max = xs.fold(0.0f64, f64::max).max(x_min * 2.0);
    let throughput = |p: &Point| {
        if curve.bytes {
            p.mib_per_sec
        } else {
            p.ops_per_sec
        }
    };
    let y_max = curve
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(throughput))
        .fold(0.0f64, f64::max)
        * 1.1;
    let p99_max = curve
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.p99_us as f64))
        .fold(1.0f64, f64::max)
        * 1.2;
    let y_label = if curve.bytes { "MiB/s" } else { "calls/s" };

    let mut chart = ChartBuilder::on(&top)
        .caption(format!("{}: throughput", curve.title), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_max.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc(curve.x_label.as_str())
        .y_desc(y_label)
        .draw()?;
    for (i, series) in curve.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = series.points.iter().map(|p| (p.x, throughput(p))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    let mut chart = ChartBuilder::on(&bottom)
        .caption(format!("{}: p99 latency", curve.title), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min..x_max).log_scale(), (1.0..p99_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(curve.x_label.as_str())
        .y_desc("p99 µs")
        .draw()?;
    for (i, series) in curve.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = series
            .points
            .iter()
            .map(|p| (p.x, p.p99_us.max(1) as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_readable() {
        assert_eq!(human(1234567.0), "1,234,567");
        assert_eq!(human(100.0), "100");
        assert_eq!(human(0.5), "0.500");
    }

    #[test]
    fn ratios_point_the_same_way_for_throughput_and_latency() {
        let mut report = Report {
            mode: "tiny".into(),
            started_at: 0,
            machine: Machine::describe(),
            rows: vec![],
            comparisons: vec![],
            curves: vec![],
            facts: vec![],
            skipped: vec![],
        };
        report.compare("throughput", "ops/s", 50.0, "limit", 100.0);
        report.compare_latency("p99", 200, "limit", 100);
        assert_eq!(report.comparisons[0].ratio, 0.5);
        assert_eq!(report.comparisons[1].ratio, 0.5);
    }
}
