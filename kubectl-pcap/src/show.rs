//! What `ls` and `get` print: tables aligned as kubectl aligns them, ages
//! as kubectl writes them, sizes in binary units.

use k8s_openapi::jiff::Timestamp;
use packet_capture_common::crd::{PacketCaptureConfig, Phase, names_no_file};

/// Columns of `ls`, and the extra ones of `ls -o wide`.
pub const LIST_COLUMNS: [&str; 6] = ["NAME", "PHASE", "NODES", "PACKETS", "DROPPED", "AGE"];
pub const WIDE_COLUMNS: [&str; 3] = ["FORMAT", "DURATION", "MESSAGE"];
/// Columns of the per-node table of `get`.
pub const NODE_COLUMNS: [&str; 8] = [
    "NODE", "ADDRESS", "STATUS", "PACKETS", "DROPPED", "FILTERED", "FILE", "SIZE",
];

/// Rows under a header, each column as wide as its widest cell and three
/// spaces apart; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths = widths(header, rows);
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    std::iter::once(&header)
        .chain(rows)
        .map(|row| line(&widths, row) + "\n")
        .collect()
}

/// The width of each column of a table: its widest cell or header.
pub fn widths(header: &[&str], rows: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// One row padded to `widths` (rows printed later under a table, as `-w`
/// prints them, line up with it).
pub fn line(widths: &[usize], row: &[String]) -> String {
    let mut out = String::new();
    let last = row.len().saturating_sub(1);
    for (i, cell) in row.iter().enumerate() {
        out.push_str(cell);
        if i < last {
            let width = widths.get(i).copied().unwrap_or(0);
            let pad = width.saturating_sub(cell.chars().count()) + 3;
            out.extend(std::iter::repeat_n(' ', pad));
        }
    }
    out
}

/// A time span as kubectl's AGE column writes it: `45s`, `3m20s`, `25m`,
/// `5h10m`, `30h`, `3d4h`, `40d`.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    // The larger unit alone, or with the smaller one when it is not zero.
    let two = |big: i64, big_unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small}{small_unit}")
        }
    };
    if s < 120 {
        format!("{s}s")
    } else if s < 600 {
        two(m, "m", s % 60, "s")
    } else if s < 3 * 3600 {
        format!("{m}m")
    } else if s < 8 * 3600 {
        two(h, "h", m % 60, "m")
    } else if s < 48 * 3600 {
        format!("{h}h")
    } else if s < 8 * 86400 {
        two(d, "d", h % 24, "h")
    } else {
        format!("{d}d")
    }
}

/// Bytes in binary units, one decimal past KiB: `512B`, `1.5KiB`, `2.0MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// `Running`, or `-` before the controller has written a phase.
pub fn phase(pcc: &PacketCaptureConfig) -> String {
    pcc.status
        .as_ref()
        .and_then(|s| s.phase)
        .map_or("-".into(), phase_name)
}

pub fn phase_name(phase: Phase) -> String {
    format!("{phase:?}")
}

/// One row of `ls` (with the wide columns when `wide`), its age counted to
/// `now`.
pub fn list_row(pcc: &PacketCaptureConfig, now: Timestamp, wide: bool) -> Vec<String> {
    let status = pcc.status.clone().unwrap_or_default();
    let count = |n: Option<u64>| n.map_or("-".into(), |n| n.to_string());
    let created = pcc
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or("-".into(), |t| age(now.as_second() - t.0.as_second()));
    let mut row = vec![
        pcc.metadata.name.clone().unwrap_or_default(),
        phase(pcc),
        count(status.nodes.map(u64::from)),
        count(status.packets),
        count(status.dropped),
        created,
    ];
    if wide {
        row.push(pcc.spec.output_format.to_string());
        row.push(format!("{}s", pcc.spec.duration));
        row.push(status.message.unwrap_or_default());
    }
    row
}

/// The header of `ls`, with the wide columns when `wide`.
pub fn list_header(wide: bool) -> Vec<&'static str> {
    let mut header = LIST_COLUMNS.to_vec();
    if wide {
        header.extend(WIDE_COLUMNS);
    }
    header
}

/// What `get` prints: the capture's phase and message, when it started and
/// ended, and a row per node (sorted by node name), followed by what the
/// nodes said of themselves.
pub fn details(pcc: &PacketCaptureConfig, now: Timestamp) -> String {
    let status = pcc.status.clone().unwrap_or_default();
    let when = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().map(|t| {
            format!(
                "{} ({} ago)",
                t.0.strftime("%Y-%m-%dT%H:%M:%SZ"),
                age(now.as_second() - t.0.as_second())
            )
        })
    };
    let mut out = String::new();
    let mut line = |label: &str, value: Option<String>| {
        if let Some(v) = value {
            out.push_str(&format!("{label:<10}{v}\n"));
        }
    };
    line("Name:", pcc.metadata.name.clone());
    line("Phase:", Some(phase(pcc)));
    line("Message:", status.message.clone());
    line("Started:", when(&status.start_time));
    line("Ended:", when(&status.completion_time));
    line(
        "Capture:",
        Some(format!(
            "{} for {}s, at most {} packets per node",
            pcc.spec.output_format, pcc.spec.duration, pcc.spec.max_packets
        )),
    );

    let mut nodes: Vec<_> = status.capture_files.iter().collect();
    nodes.sort_by(|a, b| (&a.1.node, a.0).cmp(&(&b.1.node, b.0)));
    if !nodes.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .map(|(address, n)| {
                let file = if names_no_file(&n.output_file) {
                    "-".to_string()
                } else {
                    n.output_file
                        .rsplit('/')
                        .next()
                        .unwrap_or(&n.output_file)
                        .to_string()
                };
                vec![
                    n.node.clone(),
                    address.to_string(),
                    n.status.to_string(),
                    n.packets.to_string(),
                    n.dropped.to_string(),
                    n.filtered.to_string(),
                    file,
                    size(n.file_size),
                ]
            })
            .collect();
        out.push_str(&table(&NODE_COLUMNS, &rows));
        for (_, n) in nodes.iter().filter(|(_, n)| n.message.is_some()) {
            out.push_str(&format!(
                "{}: {}\n",
                n.node,
                n.message.as_deref().unwrap_or_default()
            ));
        }
    }
    if let Some(omitted) = status.capture_files_omitted {
        out.push_str(&format!(
            "{omitted} more nodes are not listed (only those that need attention are, \
             past 100 nodes; the results ConfigMaps list every node)\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use packet_capture_common::crd::{
        CaptureState, NodeCapture, PacketCaptureConfigSpec, PacketCaptureConfigStatus,
    };

    #[test]
    fn ages_read_as_kubectl_writes_them() {
        for (s, want) in [
            (-3, "0s"),
            (45, "45s"),
            (119, "119s"),
            (200, "3m20s"),
            (240, "4m"),
            (1500, "25m"),
            (18600, "5h10m"),
            (108000, "30h"),
            (273600, "3d4h"),
            (3456000, "40d"),
        ] {
            assert_eq!(age(s), want, "{s}");
        }
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(size(512), "512B");
        assert_eq!(size(1536), "1.5KiB");
        assert_eq!(size(2_097_152), "2.0MiB");
    }

    #[test]
    fn columns_line_up() {
        let t = table(
            &["NAME", "PHASE"],
            &[
                vec!["a-long-name".into(), "Running".into()],
                vec!["b".into(), "Completed".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME          PHASE\na-long-name   Running\nb             Completed\n"
        );
    }

    fn capture() -> PacketCaptureConfig {
        let mut pcc = PacketCaptureConfig::new("web", PacketCaptureConfigSpec::default());
        let created: Timestamp = "2025-01-01T12:00:00Z".parse().unwrap();
        pcc.metadata.creation_timestamp = Some(Time(created));
        let node = |name: &str, status, packets, message: Option<&str>| NodeCapture {
            status,
            output_file: "/var/lib/packet-captures/web-20250101-120000.pcapng".into(),
            file_size: 2048,
            node: name.into(),
            packets,
            dropped: 1,
            filtered: 2,
            filter_path: None,
            message: message.map(String::from),
            pods: vec![],
        };
        pcc.status = Some(PacketCaptureConfigStatus {
            phase: Some(Phase::Failed),
            message: Some("1 of 2 nodes failed".into()),
            start_time: Some(Time(created)),
            nodes: Some(2),
            packets: Some(30),
            dropped: Some(2),
            capture_files: [
                (
                    "10.0.1.101".to_string(),
                    node("worker-2", CaptureState::Failed, 0, Some("no such device")),
                ),
                (
                    "10.0.1.100".to_string(),
                    node("worker-1", CaptureState::Completed, 30, None),
                ),
            ]
            .into(),
            ..Default::default()
        });
        pcc
    }

    #[test]
    fn a_list_row_has_every_column() {
        let now: Timestamp = "2025-01-01T12:05:00Z".parse().unwrap();
        assert_eq!(
            list_row(&capture(), now, false),
            ["web", "Failed", "2", "30", "2", "5m"]
        );
        let wide = list_row(&capture(), now, true);
        assert_eq!(wide.len(), list_header(true).len());
        assert_eq!(wide[6..], ["pcap", "60s", "1 of 2 nodes failed"]);
    }

    #[test]
    fn details_show_each_node_and_what_went_wrong() {
        let now: Timestamp = "2025-01-01T12:05:00Z".parse().unwrap();
        let d = details(&capture(), now);
        assert!(d.contains("Phase:    Failed\n"), "{d}");
        assert!(
            d.contains("Started:  2025-01-01T12:00:00Z (5m ago)\n"),
            "{d}"
        );
        let rows: Vec<&str> = d.lines().skip_while(|l| !l.starts_with("NODE")).collect();
        assert!(rows[0].starts_with("NODE       ADDRESS"), "{d}");
        assert!(
            rows[1].starts_with("worker-1   10.0.1.100   completed   30"),
            "{d}"
        );
        assert!(
            rows[1].ends_with("web-20250101-120000.pcapng   2.0KiB"),
            "{d}"
        );
        assert!(rows[2].starts_with("worker-2   10.0.1.101   failed"), "{d}");
        assert_eq!(rows[3], "worker-2: no such device");
    }
}
