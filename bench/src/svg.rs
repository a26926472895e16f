//! The `--svg` charts, drawn with plotters' SVG backend, as grouped bars by mode and scenario:
//! first the share of users sent back to the login page (what people feel), then the share of
//! requests answered "please log in", then load spread (busiest backend over the mean).
//!
//! Only the `svg_backend` feature is used: text goes into the SVG as `<text>` elements that the
//! viewer renders, so no font library is needed at build or run time (plotters then sizes text
//! with its built-in estimate, which is all the layout needs).

use std::path::Path;

use std::ops::Range;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::prelude::*;

use crate::report::Row;

/// Width and height of the whole SVG, in pixels: three panels of 480.
const SIZE: (u32, u32) = (1280, 1440);
/// One colour per mode, in the order modes first appear in the rows.
const PALETTE: [RGBColor; 10] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(188, 189, 34),
    RGBColor(31, 119, 180),
    RGBColor(23, 190, 207),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Why the chart could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct ChartError {
    /// The file.
    pub path: String,
    /// plotters' message.
    pub message: String,
}

/// Writes the charts of `rows` to `path`.
pub fn write(path: &Path, rows: &[Row]) -> Result<(), ChartError> {
    draw(path, rows).map_err(|message| ChartError {
        path: path.display().to_string(),
        message,
    })
}

fn draw(path: &Path, rows: &[Row]) -> Result<(), String> {
    let modes = first_seen(rows.iter().map(|r| r.mode.as_str()));
    let scenarios = first_seen(rows.iter().map(|r| r.scenario.as_str()));
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((3, 1));
    let percent_max = |value: fn(&Row) -> f64| rows.iter().map(value).fold(1.0, f64::max);
    let users = |r: &Row| r.users_sent_to_login * 100.0;
    grouped_bars(
        &panels[0],
        "Users sent back to the login page at least once (%)",
        "users %",
        &modes,
        &scenarios,
        rows,
        users,
        percent_max(users) * 1.4,
    )?;
    let requests = |r: &Row| r.session_loss * 100.0;
    grouped_bars(
        &panels[1],
        "Session loss: % of a logged-in user's requests answered \"please log in\"",
        "requests %",
        &modes,
        &scenarios,
        rows,
        requests,
        percent_max(requests) * 1.4,
    )?;
    let load_max = rows
        .iter()
        .map(|r| r.load_max_over_mean)
        .fold(1.0, f64::max);
    grouped_bars(
        &panels[2],
        "Load spread: busiest backend's requests / mean per backend (1 = even)",
        "max / mean",
        &modes,
        &scenarios,
        rows,
        |r| r.load_max_over_mean,
        load_max * 1.4,
    )?;
    root.present().map_err(|e| e.to_string())
}

/// Distinct values in order of first appearance.
fn first_seen<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for value in values {
        if !seen.contains(&value) {
            seen.push(value);
        }
    }
    seen
}

/// One panel: a group of bars per scenario, one bar per mode, and a legend of the modes.
#[allow(clippy::too_many_arguments)] // one call site per panel; a struct would only rename them
fn grouped_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    modes: &[&str],
    scenarios: &[&str],
    rows: &[Row],
    value: impl Fn(&Row) -> f64,
    y_max: f64,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let axis = GroupAxis {
        names: scenarios.iter().map(|s| (*s).to_owned()).collect(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(axis, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    // Each group spans 0.8 of its slot, split evenly among the modes. (The y range has 40%
    // headroom above the tallest bar, where the legend goes.)
    let width = 0.8 / modes.len().max(1) as f64;
    for (m, mode) in modes.iter().enumerate() {
        let color = PALETTE[m % PALETTE.len()];
        let bars = rows.iter().filter(|r| r.mode == *mode).filter_map(|r| {
            let s = scenarios.iter().position(|s| *s == r.scenario)?;
            let x0 = s as f64 + 0.1 + m as f64 * width;
            Some(Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.9, value(r))],
                color.filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(*mode)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// The x axis of grouped bars: group `i` spans `[i, i + 1)`, labelled at its centre with its
/// name.
struct GroupAxis {
    /// One name per group.
    names: Vec<String>,
}

impl Ranged for GroupAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = self.range().end;
        limit.0 + (value / span * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.names.len()).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> Range<f64> {
        0.0..self.names.len().max(1) as f64
    }
}

impl ValueFormatter<f64> for GroupAxis {
    fn format_ext(&self, value: &f64) -> String {
        let index = value.floor().max(0.0) as usize;
        self.names.get(index).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: &str, scenario: &str, loss: f64, load: f64) -> Row {
        Row {
            mode: mode.into(),
            scenario: scenario.into(),
            users: 10,
            users_sent_to_login: (loss * 1.4).min(1.0),
            users_lost_writes: 0.0,
            requests: 100,
            session_loss: loss,
            lost_writes: 0,
            load_max_over_mean: load,
            jain: 1.0,
            p50_ms: 1.0,
            p99_ms: 2.0,
            rps: 50.0,
            errors: 0,
        }
    }

    #[test]
    fn charts_are_written_with_every_mode_and_scenario_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        let rows = [
            row("rr-local", "steady", 0.66, 1.0),
            row("ip-hash", "steady", 0.0, 1.2),
            row("rr-local", "middle-proxy", 0.65, 1.0),
            row("ip-hash", "middle-proxy", 0.0, 3.0),
        ];
        write(&path, &rows).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for name in [
            "rr-local",
            "ip-hash",
            "steady",
            "middle-proxy",
            "Users sent back to the login page",
            "Session loss",
            "Load spread",
        ] {
            assert!(svg.contains(name), "{name} missing");
        }
        // The users panel comes first, above the requests panel.
        assert!(svg.find("Users sent back").unwrap() < svg.find("Session loss").unwrap());
        assert!(svg.matches("<rect").count() >= 12);
    }
}
