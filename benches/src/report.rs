//! The results as people read them (Markdown tables with ratios) and as machines do (JSON).

use std::fmt::Write;

use serde::Serialize;

use crate::{
    chart::{Bar, BarGroup, grouped_bars},
    l4::{L4Result, System},
    l7::{ChurnResult, L7Result, L7System},
    l7_runtime::RuntimeResult,
    stats::{Sample, paired_ratio, ratio},
    xdp::{TableSwitch, XdpResult},
};

/// Everything one run measured, with where it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: String,
    pub quick: bool,
    pub xdp: Vec<XdpResult>,
    pub table_switch: Option<TableSwitch>,
    pub l4: Vec<L4Result>,
    pub l7_runtime: Vec<RuntimeResult>,
    pub l7: Vec<L7Result>,
    pub l7_churn: Option<ChurnResult>,
    pub scrape: Option<crate::scrape::ScrapeResult>,
    pub tls: Vec<crate::tls::TlsResult>,
    pub tls_providers: Vec<crate::tls_providers::ProviderResult>,
}

impl Report {
    /// Writes one SVG chart per end-to-end section into `dir`; returns the files written.
    pub fn write_charts(&self, dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
        let mut written = Vec::new();
        let mut chart = |name: &str, title: &str, groups: Vec<BarGroup>| -> anyhow::Result<()> {
            if groups.is_empty() {
                return Ok(());
            }
            let path = dir.join(name);
            grouped_bars(&path, title, "requests/s (median, min–max)", &groups)?;
            written.push(path);
            Ok(())
        };
        let bar = |system: &str, sample: &crate::stats::Sample| Bar {
            system: system.to_string(),
            median: sample.median,
            min: sample.min,
            max: sample.max,
        };
        let mut l4: Vec<BarGroup> = Vec::new();
        for result in &self.l4 {
            let case = result.case.name();
            if l4.last().is_none_or(|g| g.case != case) {
                l4.push(BarGroup {
                    case: case.clone(),
                    bars: Vec::new(),
                });
            }
            if let Some(group) = l4.last_mut() {
                group
                    .bars
                    .push(bar(result.system.name(), &result.requests_per_sec));
            }
        }
        chart("chart-l4.svg", "L4: requests/s through each system", l4)?;
        let mut l7: Vec<BarGroup> = Vec::new();
        for result in &self.l7 {
            let case = result.case.name().trim_start_matches("L7, ").to_string();
            if l7.last().is_none_or(|g| g.case != case) {
                l7.push(BarGroup {
                    case,
                    bars: Vec::new(),
                });
            }
            if let Some(group) = l7.last_mut() {
                group
                    .bars
                    .push(bar(result.system.name(), &result.requests_per_sec));
            }
        }
        chart("chart-l7.svg", "L7: requests/s through each proxy", l7)?;
        Ok(written)
    }

    pub fn markdown(&self) -> String {
        let mut md = format!("Machine: {}\n", self.machine);
        if !self.xdp.is_empty() {
            md.push_str(&xdp_table(&self.xdp));
        }
        if let Some(switch) = &self.table_switch {
            let _ = write!(
                md,
                "\nA weight change (Maglev table of {} slots rebuilt and switched in): {} ms.\n",
                switch.slots,
                switch.ms.display(2)
            );
        }
        if !self.l4.is_empty() {
            md.push_str(&l4_tables(&self.l4));
        }
        if !self.l7.is_empty() {
            md.push_str(&l7_tables(&self.l7));
        }
        if let Some(churn) = &self.l7_churn {
            md.push_str(&churn_table(churn));
        }
        if !self.tls.is_empty() {
            md.push_str(&tls_tables(&self.tls));
        }
        if !self.tls_providers.is_empty() {
            md.push_str(&provider_table(&self.tls_providers));
        }
        if !self.l7_runtime.is_empty() {
            md.push_str(&runtime_table(&self.l7_runtime));
        }
        if let Some(scrape) = &self.scrape {
            md.push_str(&crate::scrape::table(scrape));
        }
        md
    }
}

/// A ratio cell: `a`'s median over `b`'s, as `1.23×`, or `–` when there is no `b`.
fn ratio_cell(a: &Sample, b: Option<&Sample>) -> String {
    b.map_or("–".to_string(), |b| format!("{:.2}×", ratio(a, b)))
}

/// ns/packet per case, with the ratio to the case's floor and, for established hits, to the
/// "parse + one flow lookup" reference — and for a two-armed hit also to that reference ending
/// in a redirect: the median of the rounds' ratios (the cases run in interleaved rounds), with
/// their spread.
pub fn xdp_table(results: &[XdpResult]) -> String {
    let mut md = String::from(
        "\n### XDP program, ns/packet (BPF_PROG_TEST_RUN)\n\n| case | runs | ns/packet, median (min–max) | × floor | × parse + lookup, median of rounds (min–max) | × parse + lookup + redirect |\n|---|---|---:|---:|---:|---:|\n",
    );
    let find =
        |name: Option<&String>| name.and_then(|name| results.iter().find(|r| &r.case == name));
    let ratio_to = |result: &XdpResult, name: Option<&String>| {
        ratio_cell(
            &result.ns_per_packet,
            find(name).map(|other| &other.ns_per_packet),
        )
    };
    let paired_to = |result: &XdpResult, name: Option<&String>| {
        find(name)
            .map(|other| paired_ratio(&result.ns_per_packet, &other.ns_per_packet))
            .map_or("–".to_string(), |r| {
                format!("{:.2}× ({:.2}–{:.2})", r.median, r.min, r.max)
            })
    };
    for result in results {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            result.case,
            match result.mode {
                crate::xdp::Mode::Repeated => "repeated",
                crate::xdp::Mode::PerCall => "per call",
            },
            result.ns_per_packet.display(1),
            ratio_to(result, Some(&result.floor)),
            paired_to(result, result.reference.as_ref()),
            paired_to(result, result.redirect_reference.as_ref()),
        );
    }
    md
}

/// A row of a per-case table: the system, its rate, and the cells between them and the
/// ratio columns.
struct Row<'a, S> {
    system: S,
    name: &'static str,
    rate: &'a Sample,
    cells: String,
}

/// One Markdown table per case (in order of first appearance): `columns` names the cells
/// after the system, then a ratio column per system in `peers`.
fn per_case_tables<'a, C: PartialEq + Copy, S: PartialEq + Copy>(
    rows: &[(C, String, Row<'a, S>)],
    columns: &str,
    peers: &[(S, &str)],
) -> String {
    let mut md = String::new();
    let mut cases: Vec<C> = rows.iter().map(|(case, _, _)| *case).collect();
    cases.dedup();
    for case in cases {
        let in_case: Vec<&(C, String, Row<'a, S>)> =
            rows.iter().filter(|(c, _, _)| *c == case).collect();
        let title = &in_case[0].1;
        let peer_columns: String = peers
            .iter()
            .map(|(_, name)| format!(" × {name} |"))
            .collect();
        let alignment = "---:|".repeat(columns.matches('|').count() + peers.len());
        let _ = write!(
            md,
            "\n### {title}\n\n| system | req/s, median (min–max) |{columns}{peer_columns}\n|---|---:|{alignment}\n"
        );
        for (_, _, row) in &in_case {
            let ratios: String = peers
                .iter()
                .map(|(peer, _)| {
                    let peer_rate = in_case
                        .iter()
                        .find(|(_, _, r)| r.system == *peer)
                        .map(|(_, _, p)| p.rate);
                    let cell = ratio_cell(row.rate, peer_rate);
                    format!(" {cell} |")
                })
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} |{}{ratios}",
                row.name,
                row.rate.display(0),
                row.cells
            );
        }
    }
    md
}

/// One table per case: each system's rate and latency, with ratios to direct and nftables.
pub fn l4_tables(results: &[L4Result]) -> String {
    let rows: Vec<_> = results
        .iter()
        .map(|r| {
            let cells = format!(
                " {:.0} | {:.0} | {:.0} | {:.1} | {} | {} |",
                r.p50_us.median,
                r.p99_us.median,
                r.p999_us.median,
                r.machine_cpu_us_per_request.median,
                r.errors,
                r.syn_retransmits
            );
            let row = Row {
                system: r.system,
                name: r.system.name(),
                rate: &r.requests_per_sec,
                cells,
            };
            (r.case, r.case.name(), row)
        })
        .collect();
    per_case_tables(
        &rows,
        " p50 µs | p99 µs | p99.9 µs | machine CPU µs/req | errors | SYN retransmits |",
        &[
            (System::Direct, "direct"),
            (System::NftablesDnat, "nftables DNAT"),
            (System::HaproxyTcp, "HAProxy TCP"),
        ],
    )
}

/// One table per L7 case: rate, latency and CPU per request, with ratios to HAProxy and nginx.
pub fn l7_tables(results: &[L7Result]) -> String {
    let rows: Vec<_> = results
        .iter()
        .map(|r| {
            let cpu = r
                .cpu_us_per_request
                .as_ref()
                .map_or("–".to_string(), |c| format!("{:.1}", c.median));
            let cells = format!(
                " {:.0} | {:.0} | {:.0} | {cpu} | {} |",
                r.p50_us.median, r.p99_us.median, r.p999_us.median, r.errors
            );
            let row = Row {
                system: r.system,
                name: r.system.name(),
                rate: &r.requests_per_sec,
                cells,
            };
            (r.case, r.case.name(), row)
        })
        .collect();
    per_case_tables(
        &rows,
        " p50 µs | p99 µs | p99.9 µs | CPU µs/req | errors |",
        &[(L7System::Haproxy, "HAProxy"), (L7System::Nginx, "nginx")],
    )
}

/// One table per HTTPS case: rate, p99 and the proxy's CPU per request (or connection), with
/// weir's CPU and rate as multiples of HAProxy's and nginx's.
pub fn tls_tables(results: &[crate::tls::TlsResult]) -> String {
    use crate::tls::TlsSystem;
    let mut md = String::new();
    let mut cases: Vec<_> = results.iter().map(|r| r.case).collect();
    cases.dedup();
    for case in cases {
        let rows: Vec<_> = results.iter().filter(|r| r.case == case).collect();
        let peer = |system: TlsSystem| rows.iter().find(|r| r.system == system);
        let _ = write!(
            md,
            "\n### {}\n\n| system | /s, median (min–max) | p99 µs | CPU µs each, median (min–max) | errors | CPU × HAProxy | CPU × nginx | rate × HAProxy |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
            case.name()
        );
        for row in &rows {
            let times = |system: TlsSystem, rate: bool| {
                if rate {
                    ratio_cell(&row.per_sec, peer(system).map(|p| &p.per_sec))
                } else {
                    ratio_cell(&row.cpu_us, peer(system).map(|p| &p.cpu_us))
                }
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row.system.name(),
                row.per_sec.display(0),
                row.p99_us
                    .as_ref()
                    .map_or("–".to_string(), |p| format!("{:.0}", p.median)),
                row.cpu_us.display(1),
                row.errors,
                times(TlsSystem::Haproxy, false),
                times(TlsSystem::Nginx, false),
                times(TlsSystem::Haproxy, true),
            );
        }
    }
    md
}

/// ring and aws-lc-rs side by side: the server's handshakes and record throughput.
pub fn provider_table(results: &[crate::tls_providers::ProviderResult]) -> String {
    let mut md = String::from(
        "\n### rustls crypto providers (server time only, in memory)\n\n| provider | certificate | full handshakes/s | seal MB/s | open MB/s | handshakes × ring |\n|---|---|---:|---:|---:|---:|\n",
    );
    for row in results {
        let ring = results
            .iter()
            .find(|r| r.provider == "ring" && r.key == row.key)
            .map(|r| &r.handshakes_per_sec);
        let ring = ratio_cell(&row.handshakes_per_sec, ring);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {ring} |",
            row.provider,
            row.key,
            row.handshakes_per_sec.display(0),
            row.seal_mb_per_sec.display(0),
            row.open_mb_per_sec.display(0),
        );
    }
    md
}

/// The change-under-load run: rates steady and changing, errors, and the dip.
pub fn churn_table(churn: &ChurnResult) -> String {
    format!(
        "\n### Change under load: weir L7, {} ({} pool changes, one a second)\n\n| load | req/s, median (min–max) | errors |\n|---|---:|---:|\n| steady pool | {} | {} |\n| a change every second | {} | {} |\n\nThroughput dip while changing: {:.1}%.\n",
        case_words(&churn.case),
        churn.changes,
        churn.steady_requests_per_sec.display(0),
        churn.steady_errors,
        churn.changing_requests_per_sec.display(0),
        churn.changing_errors,
        churn.dip() * 100.0
    )
}

fn case_words(case: &crate::l7::L7Case) -> String {
    case.name().trim_start_matches("L7, ").to_string()
}

/// The runtimes side by side, each compared with the other at the same worker count.
pub fn runtime_table(results: &[RuntimeResult]) -> String {
    let mut md = String::from(
        "\n### L7 runtime: minimal proxy loop, keep-alive (loopback, nginx upstream)\n\n| runtime | workers | req/s, median (min–max) | p50 µs | p99 µs | errors | × the other runtime |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in results {
        let other = results
            .iter()
            .find(|r| r.workers == row.workers && r.runtime != row.runtime)
            .map(|o| &o.requests_per_sec);
        let other = ratio_cell(&row.requests_per_sec, other);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {} | {} |",
            row.runtime,
            row.workers,
            row.requests_per_sec.display(0),
            row.p50_us.median,
            row.p99_us.median,
            row.errors,
            other
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{l4::L4Case, stats::Sample, xdp::Mode};

    #[test]
    fn xdp_rows_carry_the_ratio_to_their_floor() {
        let result = |case: &str, floor: &str, values: Vec<f64>| XdpResult {
            case: case.into(),
            mode: Mode::Repeated,
            floor: floor.into(),
            reference: None,
            redirect_reference: None,
            ns_per_packet: Sample::new(values),
        };
        let table = xdp_table(&[
            result("floor", "floor", vec![10.0, 12.0, 11.0]),
            // Measured in the same rounds as the hit: the ratio is taken round by round.
            result("lookup", "floor", vec![15.0, 13.0, 14.0]),
            result("lookup + redirect", "floor", vec![20.0, 20.0, 20.0]),
            XdpResult {
                reference: Some("lookup".into()),
                ..result("hit", "floor", vec![22.0, 20.0, 21.0])
            },
            XdpResult {
                reference: Some("lookup".into()),
                redirect_reference: Some("lookup + redirect".into()),
                ..result("redirected hit", "floor", vec![22.0, 20.0, 21.0])
            },
        ]);
        assert!(
            table.contains("| floor | repeated | 11.0 (10.0–12.0) | 1.00× | – | – |"),
            "{table}"
        );
        assert!(
            table.contains("| hit | repeated | 21.0 (20.0–22.0) | 1.91× | 1.50× (1.47–1.54) | – |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| redirected hit | repeated | 21.0 (20.0–22.0) | 1.91× | 1.50× (1.47–1.54) | 1.05× (1.00–1.10) |"
            ),
            "{table}"
        );
    }

    #[test]
    fn l7_tables_compare_each_system_with_haproxy_and_nginx() {
        let case = crate::l7::L7Case {
            close: false,
            large: true,
            workers: 1,
        };
        let row = |system, rate: f64, cpu: Option<f64>| L7Result {
            case,
            system,
            requests_per_sec: Sample::new(vec![rate, rate * 1.1, rate * 0.9]),
            p50_us: Sample::new(vec![100.0]),
            p99_us: Sample::new(vec![300.0]),
            p999_us: Sample::new(vec![900.0]),
            cpu_us_per_request: cpu.map(|c| Sample::new(vec![c])),
            errors: 0,
        };
        let table = l7_tables(&[
            row(L7System::Direct, 4000.0, None),
            row(L7System::Weir, 2600.0, Some(12.5)),
            row(L7System::Haproxy, 2000.0, Some(20.0)),
            row(L7System::Nginx, 1300.0, Some(25.0)),
        ]);
        assert!(
            table.contains("### L7, keep-alive, 64 KiB responses"),
            "{table}"
        );
        assert!(
            table.contains("| system | req/s, median (min–max) | p50 µs | p99 µs | p99.9 µs | CPU µs/req | errors | × HAProxy | × nginx |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"),
            "{table}"
        );
        assert!(
            table.contains(
                "| weir L7 | 2600 (2340–2860) | 100 | 300 | 900 | 12.5 | 0 | 1.30× | 2.00× |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| direct to upstream | 4000 (3600–4400) | 100 | 300 | 900 | – | 0 | 2.00× | 3.08× |"
            ),
            "{table}"
        );
    }

    #[test]
    fn the_churn_table_reports_errors_and_the_dip() {
        let churn = ChurnResult {
            case: crate::l7::L7Case {
                close: false,
                large: false,
                workers: 1,
            },
            steady_requests_per_sec: Sample::new(vec![1000.0, 1100.0, 900.0]),
            changing_requests_per_sec: Sample::new(vec![950.0]),
            steady_errors: 0,
            changing_errors: 0,
            changes: 15,
        };
        let table = churn_table(&churn);
        assert!(
            table.contains("keep-alive, 5-byte responses (15 pool changes"),
            "{table}"
        );
        assert!(
            table.contains("| steady pool | 1000 (900–1100) | 0 |"),
            "{table}"
        );
        assert!(
            table.contains("| a change every second | 950 | 0 |"),
            "{table}"
        );
        assert!(table.contains("dip while changing: 5.0%"), "{table}");
    }

    #[test]
    fn l4_tables_compare_each_system_with_direct_and_nftables() {
        let case = L4Case {
            ipv6: false,
            close: true,
            large: false,
            udp: false,
        };
        let row = |system, rate: f64| L4Result {
            case,
            system,
            requests_per_sec: Sample::new(vec![rate]),
            p50_us: Sample::new(vec![100.0]),
            p99_us: Sample::new(vec![400.0]),
            p999_us: Sample::new(vec![800.0]),
            machine_cpu_us_per_request: Sample::new(vec![50.0]),
            errors: 0,
            syn_retransmits: 2,
        };
        let table = l4_tables(&[
            row(System::Direct, 1000.0),
            row(System::WeirNat, 950.0),
            row(System::NftablesDnat, 500.0),
        ]);
        assert!(
            table.contains("### IPv4, new connection per request, 5-byte responses"),
            "{table}"
        );
        assert!(
            table.contains("| system | req/s, median (min–max) | p50 µs | p99 µs | p99.9 µs | machine CPU µs/req | errors | SYN retransmits | × direct | × nftables DNAT | × HAProxy TCP |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"),
            "{table}"
        );
        assert!(
            table.contains(
                "| weir NAT (XDP) | 950 | 100 | 400 | 800 | 50.0 | 0 | 2 | 0.95× | 1.90× | – |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| direct to server | 1000 | 100 | 400 | 800 | 50.0 | 0 | 2 | 1.00× | 2.00× | – |"
            ),
            "{table}"
        );
    }
}
