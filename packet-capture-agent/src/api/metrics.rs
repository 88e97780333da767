//! `/metrics`: the engine's numbers, read at each scrape, and API requests,
//! in the OpenMetrics text format Prometheus reads.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use packet_capture_common::crd::CaptureState;

use crate::capture::{CaptureStatus, Engine};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Every metric's name starts with this.
pub const PREFIX: &str = "packet_capture_agent";

type RequestLabels = [(&'static str, String); 3];

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    stream_lost: Counter,
}

impl Metrics {
    pub fn new(engine: Engine) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(EngineCollector(engine)));
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by transport, route and status (HTTP status, or the gRPC status sent with the response headers)",
            requests.clone(),
        );
        let stream_lost = Counter::default();
        registry.register(
            "stream_lost_packets",
            "Packets live readers (StreamPackets, /api/v1/captures/{id}/packets) lost because they read too slowly; the capture files have them",
            stream_lost.clone(),
        );
        Self {
            registry,
            requests,
            stream_lost,
        }
    }

    pub fn stream_lost(&self, packets: u64) {
        if packets > 0 {
            self.stream_lost.inc_by(packets);
        }
    }

    pub fn request(&self, transport: &str, route: String, code: String) {
        self.requests
            .get_or_create(&[
                ("transport", transport.to_owned()),
                ("route", route),
                ("code", code),
            ])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // A String takes every write, and the collectors only fail when a
        // write does.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding the metrics");
        }
        out
    }
}

struct EngineCollector(Engine);

impl fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EngineCollector")
    }
}

/// One metric with a sample per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A metric without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn per_capture<'a, M: EncodeMetric>(
    captures: &'a [CaptureStatus],
    value: impl Fn(&CaptureStatus) -> M + 'a,
) -> impl Iterator<Item = ([(&'static str, &'a str); 2], M)> + 'a {
    captures
        .iter()
        .map(move |c| ([("id", c.id.as_str()), ("name", c.name.as_str())], value(c)))
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let engine = &self.0;
        let captures = engine.list("");
        let stats = engine.stats();
        single(
            &mut encoder,
            "build",
            "The agent's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        )?;
        single(
            &mut encoder,
            "backend",
            "The capture backend in use: ebpf or pcap",
            Info::new([("backend", engine.backend())]),
        )?;
        single(
            &mut encoder,
            "interfaces",
            "Interfaces captures are taken on",
            ConstGauge::new(stats.interfaces as i64),
        )?;
        single(
            &mut encoder,
            "written_bytes",
            "Bytes written to capture files since the agent started",
            ConstCounter::new(stats.bytes_written),
        )?;
        single(
            &mut encoder,
            "ring_lost_records",
            "Records the kernel could not put in the ring buffer because it was full",
            ConstCounter::new(stats.ring_lost),
        )?;
        family(
            &mut encoder,
            "captures",
            "Captures known to the agent by state",
            MetricType::Gauge,
            CaptureState::ALL.map(|s| {
                let n = captures.iter().filter(|c| c.state == s).count();
                ([("state", s.as_str())], ConstGauge::new(n as i64))
            }),
        )?;
        family(
            &mut encoder,
            "capture_packets",
            "Packets a capture wrote",
            MetricType::Counter,
            per_capture(&captures, |c| ConstCounter::new(c.packets)),
        )?;
        family(
            &mut encoder,
            "capture_dropped",
            "Packets a capture matched but could not write",
            MetricType::Counter,
            per_capture(&captures, |c| ConstCounter::new(c.dropped)),
        )?;
        family(
            &mut encoder,
            "capture_filtered",
            "Packets that matched a capture's targets but not its filter",
            MetricType::Counter,
            per_capture(&captures, |c| ConstCounter::new(c.filtered)),
        )?;
        family(
            &mut encoder,
            "capture_filtered_in_kernel",
            "Of those, the packets the filter rejected in the kernel (they never reached the agent)",
            MetricType::Counter,
            per_capture(&captures, |c| ConstCounter::new(c.filtered_in_kernel)),
        )?;
        let with_filter: Vec<CaptureStatus> = captures
            .iter()
            .filter(|c| !c.filter_path.is_empty())
            .cloned()
            .collect();
        family(
            &mut encoder,
            "capture_filter_in_kernel",
            "1 when the capture's filter runs in the kernel for every link type, 0 when user space runs it for some (see the capture's filter_path)",
            MetricType::Gauge,
            per_capture(&with_filter, |c| {
                ConstGauge::new(i64::from(c.filter_path == "kernel"))
            }),
        )?;
        family(
            &mut encoder,
            "capture_file_bytes",
            "Bytes written to a capture's file (its compressed size once compressed)",
            MetricType::Gauge,
            per_capture(&captures, |c| ConstGauge::new(c.file_size as i64)),
        )?;
        Ok(())
    }
}
