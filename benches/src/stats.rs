//! Repeated measurements and how they are summarised: the median, with the spread shown.

use serde::Serialize;

/// The values of one measurement repeated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub values: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Sample {
    /// Summarises `values` (at least one).
    pub fn new(values: Vec<f64>) -> Sample {
        assert!(!values.is_empty(), "a sample needs a value");
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Sample {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            values,
        }
    }

    /// `median (min–max)` with `digits` decimals.
    pub fn display(&self, digits: usize) -> String {
        if self.values.len() == 1 {
            format!("{:.digits$}", self.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}–{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

/// `a / b` of medians, for "x× the peer" columns.
pub fn ratio(a: &Sample, b: &Sample) -> f64 {
    a.median / b.median
}

/// `a / b` round by round, for samples measured in interleaved rounds (value `i` of both
/// taken side by side): a slow phase of the machine then divides out instead of landing on
/// one side of the ratio.
pub fn paired_ratio(a: &Sample, b: &Sample) -> Sample {
    assert_eq!(
        a.values.len(),
        b.values.len(),
        "paired samples have one value per round"
    );
    Sample::new(a.values.iter().zip(&b.values).map(|(a, b)| a / b).collect())
}

/// Seconds the whole machine has spent busy (every CPU, everything but idle and iowait),
/// from `/proc/stat`: the difference over a run is the CPU the run cost.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().unwrap_or_default();
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, t)| t)
        .sum();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64);
    Ok(busy as f64 / per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_of_odd_and_even_samples() {
        let odd = Sample::new(vec![3.0, 1.0, 2.0]);
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = Sample::new(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(even.median, 2.5);
        assert_eq!(
            even.values,
            vec![4.0, 1.0, 3.0, 2.0],
            "values keep run order"
        );
        assert_eq!(even.display(1), "2.5 (1.0–4.0)");
        assert_eq!(Sample::new(vec![7.25]).display(1), "7.2");
    }

    #[test]
    fn ratio_of_medians() {
        let a = Sample::new(vec![10.0, 30.0, 20.0]);
        let b = Sample::new(vec![5.0, 5.0, 100.0]);
        assert_eq!(ratio(&a, &b), 4.0);
    }
}
