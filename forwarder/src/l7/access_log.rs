//! The access log: one line per request (and per refused request, rate-limited) in a file
//! named by `[access_log] path`, as JSON lines or a common-log-like text.
//!
//! Why it is built this way:
//! - **Per-worker buffers**: a worker formats lines into its own buffer and writes the buffer
//!   to the file when it passes [`FLUSH_AT`] or on the worker's 200 ms sweep, so a busy
//!   worker makes one `write` per ~16 KiB of lines, not one per request (nginx's `buffer=`),
//!   and lines reach the file within a fifth of a second.
//! - **One file, appended by every worker**: opened `O_APPEND`, and a buffer only ever holds
//!   whole lines, so the workers' writes interleave by whole lines.
//! - **Reopening** (`weirctl log reopen`, `SIGUSR1`, for logrotate): the daemon opens the
//!   path again and swaps the new file in ([`AccessLog::set`]); a worker's next write goes to
//!   it and the old file closes when the last worker let go of it. The open happens before
//!   the swap, so a path that cannot be opened is reported and the running file stays.
//! - **Time**: the formatted second is cached per worker, and only the milliseconds are
//!   written per line.

use std::{
    cell::RefCell,
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::Write,
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use weir_config::AccessLogFormat;

/// A worker writes its buffered lines once they pass this size.
const FLUSH_AT: usize = 16 * 1024;

/// The log file every worker appends to, swapped by the daemon.
#[derive(Default)]
pub struct AccessLog(ArcSwapOption<LogFile>);

/// An open access log file.
pub struct LogFile {
    file: File,
    path: PathBuf,
    format: AccessLogFormat,
}

impl LogFile {
    /// Opens (creating it, mode 0640) `path` for appending lines in `format`.
    pub fn open(path: &Path, format: AccessLogFormat) -> std::io::Result<LogFile> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)?;
        Ok(LogFile {
            file,
            path: path.to_path_buf(),
            format,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> AccessLogFormat {
        self.format
    }
}

impl AccessLog {
    /// Makes `file` the log (`None`: no access log). Lines buffered by workers go to it.
    pub fn set(&self, file: Option<LogFile>) {
        self.0.store(file.map(Arc::new));
    }

    /// The file being written, if any.
    pub fn current(&self) -> Option<Arc<LogFile>> {
        self.0.load_full()
    }

    /// Whether a file is set. What every request asks: a plain load, which takes no
    /// reference count on the file (the workers would contend for it).
    pub fn is_set(&self) -> bool {
        self.0.load().is_some()
    }

    fn enabled(&self) -> Option<AccessLogFormat> {
        self.0.load().as_ref().map(|file| file.format)
    }
}

/// What one line says. Borrowed from the exchange, serialized as one JSON object.
#[derive(Serialize)]
pub struct Entry<'a> {
    /// Filled in by [`WorkerLog::record`].
    #[serde(skip)]
    pub unix_ms: u64,
    pub client: SocketAddr,
    pub listener: SocketAddr,
    /// `-` when no virtual host serves the Host.
    pub vhost: &'a str,
    pub method: &'a str,
    pub target: &'a str,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub protocol: &'static str,
    pub host: &'a str,
    /// The status sent to the client; 0 when none was (the connection was cut).
    pub status: u16,
    /// The server that answered, when one did.
    pub server: Option<SocketAddr>,
    /// Bytes sent to the client for this request: head and body.
    pub bytes: u64,
    /// From the whole request head to the end of the response.
    pub micros: u64,
    /// Why weir answered itself (refusals, 5xx of its own), when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// Refused requests not logged since the previous refusal line (rate limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unlogged: Option<u64>,
}

/// One worker's side of the log: its buffer of whole lines and its cached time.
#[derive(Default)]
pub struct WorkerLog {
    lines: RefCell<Vec<u8>>,
    clock: RefCell<CachedSecond>,
}

/// The current second, formatted for both formats.
#[derive(Default)]
struct CachedSecond {
    second: u64,
    /// `2026-11-27T02:43:26`
    iso: String,
    /// `27/Nov/2026:02:43:26 +0000`
    common: String,
}

impl CachedSecond {
    fn at(&mut self, second: u64) {
        if self.second == second && !self.iso.is_empty() {
            return;
        }
        let time = time::OffsetDateTime::from_unix_timestamp(second as i64)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let iso =
            time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
        let common = time::macros::format_description!(
            "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
        );
        self.second = second;
        self.iso = time.format(iso).unwrap_or_default();
        self.common = time.format(common).unwrap_or_default();
    }
}

impl WorkerLog {
    /// Adds the line for `entry` when a log is set, writing the buffer out once it is full.
    pub fn record(&self, log: &AccessLog, mut entry: Entry<'_>) {
        let Some(format) = log.enabled() else {
            return;
        };
        entry.unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut clock = self.clock.borrow_mut();
        clock.at(entry.unix_ms / 1000);
        let millis = entry.unix_ms % 1000;
        let mut lines = self.lines.borrow_mut();
        // Writing into a Vec cannot fail.
        let _ = match format {
            AccessLogFormat::Json => {
                let _ = write!(lines, "{{\"time\":\"{}.{millis:03}Z\",", clock.iso);
                let start = lines.len();
                let _ = serde_json::to_writer(&mut *lines, &entry);
                // The entry's own `{`, replaced by the time field's.
                lines.remove(start);
                writeln!(lines)
            }
            AccessLogFormat::Common => {
                let _ = write!(
                    lines,
                    "{} - - [{}] \"{} {} {}\" {} {} vhost={} server=",
                    entry.client.ip(),
                    clock.common,
                    Printable(entry.method),
                    Printable(entry.target),
                    entry.protocol,
                    entry.status,
                    entry.bytes,
                    Printable(entry.vhost),
                );
                let _ = match entry.server {
                    Some(server) => write!(lines, "{server}"),
                    None => write!(lines, "-"),
                };
                let _ = write!(lines, " us={}", entry.micros);
                if let Some(reason) = entry.reason {
                    let _ = write!(lines, " reason=\"{reason}\"");
                }
                writeln!(lines)
            }
        };
        let full = lines.len() >= FLUSH_AT;
        drop(lines);
        if full {
            self.flush(log);
        }
    }

    /// Writes the buffered lines to the current file (dropped if there is none any more).
    pub fn flush(&self, log: &AccessLog) {
        let mut lines = self.lines.borrow_mut();
        if lines.is_empty() {
            return;
        }
        if let Some(file) = log.current()
            && let Err(err) = (&file.file).write_all(&lines)
        {
            tracing::warn!(path = %file.path.display(), %err, "cannot write the access log");
        }
        lines.clear();
    }
}

/// Text from a request, written into the common format with bytes that would break the line
/// (controls, quotes, backslashes, non-ASCII) escaped as `\xHH`. The request line's parser
/// already refuses most of them; this keeps a line one line whatever comes.
struct Printable<'a>(&'a str);

impl std::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0.bytes() {
            if byte.is_ascii_graphic() && byte != b'"' && byte != b'\\' {
                f.write_char(byte as char)?;
            } else {
                write!(f, "\\x{byte:02X}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>() -> Entry<'a> {
        Entry {
            unix_ms: 0,
            client: "198.18.0.2:40000".parse().unwrap(),
            listener: "198.18.100.11:80".parse().unwrap(),
            vhost: "site",
            method: "GET",
            target: "/a \"b\"",
            protocol: "HTTP/1.1",
            host: "site.test",
            status: 200,
            server: Some("198.18.1.2:8080".parse().unwrap()),
            bytes: 1234,
            micros: 456,
            reason: None,
            unlogged: None,
        }
    }

    #[test]
    fn lines_are_json_objects_or_common_log_text_with_the_request_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::default();
        let worker = WorkerLog::default();
        worker.record(&log, entry());
        worker.flush(&log);
        assert!(!path.exists(), "no log set: nothing written");

        log.set(Some(LogFile::open(&path, AccessLogFormat::Json).unwrap()));
        worker.record(&log, entry());
        log.set(Some(LogFile::open(&path, AccessLogFormat::Common).unwrap()));
        worker.flush(&log);
        worker.record(&log, entry());
        worker.flush(&log);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let json: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(json["status"], 200);
        assert_eq!(json["target"], "/a \"b\"");
        assert_eq!(json["server"], "198.18.1.2:8080");
        assert!(json["time"].as_str().unwrap().ends_with('Z'), "{json}");
        assert!(json.get("reason").is_none());
        assert!(
            lines[1].starts_with("198.18.0.2 - - ["),
            "common format: {}",
            lines[1]
        );
        assert!(
            lines[1].contains(
                "\"GET /a\\x20\\x22b\\x22 HTTP/1.1\" 200 1234 vhost=site server=198.18.1.2:8080 us=456"
            ),
            "{}",
            lines[1]
        );
    }
}
