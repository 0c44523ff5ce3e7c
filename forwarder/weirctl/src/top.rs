//! `weirctl top`: every server of every pool, refreshed each second, busiest first.
//!
//! It asks the daemon for the server list (the same report `server list` prints) once a
//! second and turns the counters into rates by difference with the previous sample: packets
//! per second for an L4 server, requests per second for a vhost's. Read-only, like the
//! dashboard; `q`, Esc or Ctrl-C quits. Drawn with ratatui, which restores the terminal on
//! the way out, panics included.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::Constraint,
    style::{Modifier, Style},
    widgets::{Block, Row, Table},
};
use weir_config::control::{HealthState, Request, Response, ServerReport};
use weir_control::Client;

use crate::{Failure, ask, unexpected};

/// How often the view is refreshed.
const REFRESH: Duration = Duration::from_secs(1);

/// A server's row: what `server list` reports, with its rate since the last sample.
struct Line {
    report: ServerReport,
    /// Packets/s (L4) or requests/s (L7); `None` on the first sample.
    rate: Option<f64>,
}

/// Runs the view until the user quits; the daemon going away ends it with that failure.
pub fn run(client: &mut Client) -> Result<(), Failure> {
    let mut terminal = ratatui::init();
    let result = view(&mut terminal, client);
    ratatui::restore();
    result
}

fn view(terminal: &mut DefaultTerminal, client: &mut Client) -> Result<(), Failure> {
    let mut previous: HashMap<(String, SocketAddr), (u64, Instant)> = HashMap::new();
    loop {
        let servers = match ask(client, Request::ServerList { vip: None })? {
            Response::Servers(servers) => servers,
            _ => return Err(unexpected()),
        };
        let lines = sample(servers, &mut previous, Instant::now());
        terminal
            .draw(|frame| frame.render_widget(table(&lines), frame.area()))
            .map_err(Failure::Terminal)?;
        if quit_within(REFRESH).map_err(Failure::Terminal)? {
            return Ok(());
        }
    }
}

/// Each server's line, with its rate since its previous sample (kept in `previous`, keyed by
/// pool and address), busiest first.
fn sample(
    servers: Vec<ServerReport>,
    previous: &mut HashMap<(String, SocketAddr), (u64, Instant)>,
    now: Instant,
) -> Vec<Line> {
    let mut lines: Vec<Line> = servers
        .into_iter()
        .map(|report| {
            let count = report.l7.map_or(report.traffic.packets, |l7| l7.requests);
            let key = (report.vip.clone(), report.address);
            let rate = previous.get(&key).map(|&(before, at)| {
                count.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64()
            });
            previous.insert(key, (count, now));
            Line { report, rate }
        })
        .collect();
    // Busiest first; equal rates (idle servers) by pool and address, so rows stay put.
    lines.sort_by(|a, b| {
        b.rate
            .unwrap_or(0.0)
            .total_cmp(&a.rate.unwrap_or(0.0))
            .then_with(|| a.report.vip.cmp(&b.report.vip))
            .then_with(|| a.report.address.cmp(&b.report.address))
    });
    lines
}

/// Waits up to `wait` for a key; whether it asks to quit.
fn quit_within(wait: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
        {
            let ctrl_c =
                key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                return Ok(true);
            }
        }
    }
}

fn table(lines: &[Line]) -> Table<'_> {
    let header = Row::new([
        "POOL", "SERVER", "ADMIN", "HEALTH", "RATE", "ERRORS", "ACTIVE", "WEIGHT",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = lines.iter().map(|line| {
        let r = &line.report;
        let unit = if r.l7.is_some() { "req/s" } else { "pkt/s" };
        let rate = line
            .rate
            .map_or_else(|| "…".to_string(), |rate| format!("{rate:.0} {unit}"));
        // L7: connect failures, resets and timeouts plus 5xx answers; L4 sees no errors.
        let errors = r.l7.map_or_else(
            || "-".to_string(),
            |l7| (l7.failures + l7.responses[4]).to_string(),
        );
        Row::new([
            r.vip.clone(),
            r.address.to_string(),
            r.admin.name().to_string(),
            match r.health {
                HealthState::Unchecked => "-",
                HealthState::Healthy => "up",
                HealthState::Unhealthy => "down",
            }
            .to_string(),
            rate,
            errors,
            r.active_flows.to_string(),
            r.weight.to_string(),
        ])
    });
    Table::new(
        rows,
        [
            Constraint::Min(12),
            Constraint::Min(22),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(14),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
        ],
    )
    .header(header)
    .block(Block::bordered().title(" weirctl top — busiest first · q quits "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(pool: &str, address: &str, packets: u64) -> ServerReport {
        serde_json::from_value(serde_json::json!({
            "vip": pool, "address": address, "weight": 100, "admin": "ready",
            "health": "unchecked", "active_flows": 0,
            "traffic": { "packets": packets, "bytes": 0, "new_flows": 0 }
        }))
        .unwrap()
    }

    #[test]
    fn rates_come_from_the_previous_sample_and_the_busiest_comes_first() {
        let mut previous = HashMap::new();
        let start = Instant::now();
        let first = sample(
            vec![
                server("web", "198.18.11.2:80", 100),
                server("web", "198.18.11.3:80", 100),
            ],
            &mut previous,
            start,
        );
        assert!(
            first.iter().all(|l| l.rate.is_none()),
            "no rate from one sample"
        );
        let second = sample(
            vec![
                server("web", "198.18.11.2:80", 300),
                server("web", "198.18.11.3:80", 1100),
            ],
            &mut previous,
            start + Duration::from_secs(2),
        );
        let rows: Vec<_> = second
            .iter()
            .map(|l| (l.report.address.to_string(), l.rate))
            .collect();
        assert_eq!(
            rows,
            [
                ("198.18.11.3:80".to_string(), Some(500.0)),
                ("198.18.11.2:80".to_string(), Some(100.0)),
            ]
        );
    }
}
