//! Running `wrk` and reading its report.
//!
//! wrk runs pinned to the last CPU (`taskset`), so it does not migrate between runs and the
//! systems under test get the same share of the others; a small Lua script adds the 99.9th
//! percentile wrk does not print by itself.

use std::{fs, path::PathBuf, process::Command, sync::OnceLock};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// What one load run measured: a `wrk --latency` run, or a UDP load (`crate::udp`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    pub requests_per_sec: f64,
    pub requests: u64,
    /// Latency percentiles, µs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// wrk: socket errors (connect, read, write, timeout) plus non-2xx/3xx responses. UDP:
    /// requests left unanswered.
    pub errors: u64,
    /// wrk's own line saying which (`connect 0, read 2, write 0, timeout 1`, `non-2xx 5`),
    /// empty when there were none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error_kinds: String,
}

/// Arguments of a `wrk` run against `url`: one thread, `connections` connections, `seconds`
/// long; `close` sends `Connection: close`, so every request opens a new connection.
pub fn args(url: &str, connections: u32, seconds: u32, close: bool) -> Vec<String> {
    let mut args = vec![
        "-t1".to_string(),
        format!("-c{connections}"),
        format!("-d{seconds}s"),
        "--latency".to_string(),
        "-s".to_string(),
        percentile_script().display().to_string(),
    ];
    if close {
        args.extend(["-H".to_string(), "Connection: close".to_string()]);
    }
    args.push(url.to_string());
    args
}

/// The Lua script printing the 99.9th percentile. One file in the temporary directory, the
/// same for every bench process: each writes it once, to a file of its own renamed over it, so
/// a concurrent run never reads half a script and no run leaves one behind per process.
fn percentile_script() -> &'static PathBuf {
    static SCRIPT: OnceLock<PathBuf> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        let path = std::env::temp_dir().join("weir-bench-p999.lua");
        let written = path.with_extension(format!("lua.{}", std::process::id()));
        let script = "done = function(summary, latency, requests)\n  io.write(string.format(\"p99.9 %dus\\n\", latency:percentile(99.9)))\nend\n";
        if fs::write(&written, script).is_ok() {
            let _ = fs::rename(&written, &path);
        }
        path
    })
}

/// `wrk`, pinned to the last CPU, inside network namespace `netns` if given.
pub fn command(netns: Option<&str>) -> Command {
    let last_cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let mut command = match netns {
        Some(name) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", name, "taskset"]);
            command
        }
        None => Command::new("taskset"),
    };
    command.args(["-c", &last_cpu.to_string(), "wrk"]);
    command
}

/// Runs `cmd` (`wrk` with [`args`], possibly in a namespace) and parses its report.
pub fn run(cmd: &mut Command) -> Result<LoadReport> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Parses the text `wrk --latency` prints.
pub fn parse(text: &str) -> Result<LoadReport> {
    let mut report = LoadReport {
        requests_per_sec: f64::NAN,
        requests: 0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        p999_us: f64::NAN,
        errors: 0,
        error_kinds: String::new(),
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => report.requests_per_sec = value.parse()?,
            ["50%", value] => report.p50_us = micros(value)?,
            ["99%", value] => report.p99_us = micros(value)?,
            ["p99.9", value] => report.p999_us = micros(value)?,
            [count, "requests", "in", ..] => report.requests = count.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                report.error_kinds = rest.join(" ");
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        report.errors += n.trim_end_matches(',').parse::<u64>()?;
                    }
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                report.errors += n.parse::<u64>()?;
                report.error_kinds += &format!(" non-2xx {n}");
            }
            _ => {}
        }
    }
    if report.requests_per_sec.is_nan() || report.p99_us.is_nan() {
        bail!("not a wrk --latency report:\n{text}");
    }
    Ok(report)
}

/// `174.00us`, `1.23ms`, `2.00s` → µs.
fn micros(value: &str) -> Result<f64> {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("latency without a unit: {value}")
    };
    Ok(number.parse::<f64>()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEPALIVE: &str = "Running 1s test @ http://127.0.0.1:18080/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    58.55us  175.43us   4.19ms   99.20%
    Req/Sec   124.76k    16.01k  138.51k    90.91%
  Latency Distribution
     50%   50.00us
     75%   55.00us
     90%   66.00us
     99%    1.74ms
  136251 requests in 1.10s, 19.75MB read
Requests/sec: 123883.80
Transfer/sec:     17.96MB
p99.9 2210us
";

    #[test]
    fn parses_rate_count_and_percentiles_in_their_units() {
        let report = parse(KEEPALIVE).unwrap();
        assert_eq!(
            report,
            LoadReport {
                requests_per_sec: 123883.80,
                requests: 136251,
                p50_us: 50.0,
                p99_us: 1740.0,
                p999_us: 2210.0,
                errors: 0,
                error_kinds: String::new(),
            }
        );
    }

    #[test]
    fn counts_socket_errors_and_bad_statuses() {
        let text = KEEPALIVE.replace(
            "Requests/sec:",
            "  Socket errors: connect 3, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 5\nRequests/sec:",
        );
        assert_eq!(parse(&text).unwrap().errors, 11);
    }

    #[test]
    fn refuses_output_that_is_not_a_report() {
        assert!(parse("unable to connect to 198.18.100.12:80 Connection refused").is_err());
        assert!(micros("12").is_err());
        assert_eq!(micros("2.5s").unwrap(), 2.5e6);
    }
}
