//! The report's charts: grouped bars of req/s (median, with a min–max whisker) per case and
//! system, one SVG per section, next to `report.md`. plotters' SVG backend writes labels as
//! SVG text, so no font is needed on the machine.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One bar: a system's median and spread in one case.
#[derive(Debug, Clone)]
pub struct Bar {
    pub system: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The bars of one case, in the same system order for every case.
#[derive(Debug, Clone)]
pub struct BarGroup {
    pub case: String,
    pub bars: Vec<Bar>,
}

/// Writes `groups` as a grouped bar chart titled `title` to `path` (SVG).
pub fn grouped_bars(path: &Path, title: &str, y_label: &str, groups: &[BarGroup]) -> Result<()> {
    let systems: Vec<String> = groups
        .first()
        .map(|g| g.bars.iter().map(|b| b.system.clone()).collect())
        .unwrap_or_default();
    let top = groups
        .iter()
        .flat_map(|g| g.bars.iter().map(|b| b.max.max(b.median)))
        .fold(0.0, f64::max)
        * 1.15;
    let plot = |e| anyhow!("cannot draw {}: {e:?}", path.display());
    let width = 220 + 170 * groups.len() as u32;
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot)?;
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..top.max(1.0))
        .map_err(plot)?;
    // Groups are centred on integers, so integer ticks name them.
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() + 1)
        .x_label_formatter(&|x| {
            let index = x.round();
            if (x - index).abs() < 1e-6 && index >= 0.0 && (index as usize) < groups.len() {
                groups[index as usize].case.clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(plot)?;
    let width = 0.8 / systems.len().max(1) as f64;
    for (i, system) in systems.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        let left = |g: usize| g as f64 - 0.4 + i as f64 * width;
        chart
            .draw_series(groups.iter().enumerate().filter_map(|(g, group)| {
                let bar = group.bars.get(i)?;
                Some(Rectangle::new(
                    [(left(g), 0.0), (left(g) + width * 0.9, bar.median)],
                    color.filled(),
                ))
            }))
            .map_err(plot)?
            .label(system.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(groups.iter().enumerate().filter_map(|(g, group)| {
                let bar = group.bars.get(i)?;
                let middle = left(g) + width * 0.45;
                Some(PathElement::new(
                    [(middle, bar.min), (middle, bar.max)],
                    BLACK,
                ))
            }))
            .map_err(plot)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot)?;
    root.present().map_err(plot)?;
    Ok(())
}

/// The soak's chart: the daemon's resident memory, open descriptors and flow-table entries
/// over the run, one panel each, sharing the time axis (minutes).
pub fn soak(path: &Path, samples: &[crate::soak::SoakSample]) -> Result<()> {
    let plot = |e| anyhow!("cannot draw {}: {e:?}", path.display());
    let root = SVGBackend::new(path, (900, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(plot)?;
    let panels = root.split_evenly((3, 1));
    let minutes = samples.last().map_or(1.0, |s| s.seconds / 60.0).max(0.1);
    type Value = fn(&crate::soak::SoakSample) -> f64;
    let series: [(&str, Value); 3] = [
        ("weir resident memory (MiB)", |s| s.rss_kib as f64 / 1024.0),
        ("weir open descriptors", |s| s.descriptors as f64),
        ("flow-table entries", |s| s.flow_entries as f64),
    ];
    for (panel, (label, value)) in panels.iter().zip(series) {
        let top = samples.iter().map(&value).fold(0.0, f64::max).max(1.0) * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .caption(label, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..minutes, 0.0..top)
            .map_err(plot)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .draw()
            .map_err(plot)?;
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.seconds / 60.0, value(s))),
                &BLUE,
            ))
            .map_err(plot)?;
    }
    root.present().map_err(plot)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bar_and_label_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        let bar = |system: &str, median: f64| Bar {
            system: system.into(),
            median,
            min: median * 0.9,
            max: median * 1.1,
        };
        let groups = vec![
            BarGroup {
                case: "keep-alive".into(),
                bars: vec![bar("weir", 30000.0), bar("HAProxy", 25000.0)],
            },
            BarGroup {
                case: "new connection".into(),
                bars: vec![bar("weir", 12000.0), bar("HAProxy", 10000.0)],
            },
        ];
        grouped_bars(&path, "L7 req/s", "req/s", &groups).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in [
            "L7 req/s",
            "keep-alive",
            "new connection",
            "weir",
            "HAProxy",
        ] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
        // Background, legend box, two legend swatches and four bars at least.
        assert!(svg.matches("<rect").count() >= 8, "{svg}");
    }
}
