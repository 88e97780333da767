//! The packet-capture controller: reconciles `PacketCaptureConfig`s into
//! captures on the nodes' agents, reports their progress in the status, and
//! serves the validating webhook.
//!
//! The modules are layered: a module uses only modules of a lower layer
//! (the `layering` test reads this table and checks every `crate::` path).
//!
//! | layer | module | role |
//! |---|---|---|
//! | 0 | `test_objects` | Pods, Nodes and caches for the tests |
//! | 1 | [`error`] | the error type |
//! | 1 | [`consts`] | names the controller writes into the cluster |
//! | 1 | [`backoff`] | capped, jittered exponential backoff |
//! | 1 | [`targets`] | pods and addresses to a per-node list of target IPs |
//! | 1 | [`node`] | one node's progress, and the rules of its outcome |
//! | 1 | [`pki`] | X.509: a CA, the certificates it issues, when to replace them |
//! | 1 | [`slots`] | a bound on agent calls in flight, stops before starts |
//! | 2 | [`config`] | flags, the settings ConfigMap, retry and time limits |
//! | 2 | [`metrics`] | Prometheus metrics and the `/metrics` `/healthz` `/readyz` server |
//! | 2 | [`status`] | phase, message, conditions and counters from the nodes' progress |
//! | 2 | [`results`] | the results ConfigMap written when a capture ends |
//! | 2 | [`events`] | Events, each announcement once per generation |
//! | 2 | [`access`] | whose traffic a capture's creator may capture |
//! | 3 | [`webhook`] | the validating and mutating admission webhooks over TLS |
//! | 2 | [`leader`] | Lease-based leader election |
//! | 2 | [`uninstall`] | deleting every capture before the chart goes (a Helm pre-delete hook) |
//! | 3 | [`install_check`] | a capture of its own pod, end to end (the chart's `helm test`) |
//! | 2 | [`issuer`] | the controller's own CA in a Secret, issuing certificates into Secrets |
//! | 4 | [`certs`] | the webhook's serving certificate: files, a Secret, or self-managed |
//! | 3 | [`agents`] | agent discovery, one gRPC client per agent, bearer token, retries |
//! | 4 | [`agent_certs`] | signing the agents' serving certificates, trusting their CA |
//! | 4 | [`tracker`] | one `WatchCapture` task per node capture, feeding the status |
//! | 4 | [`plan`] | what a reconcile does, decided without calling anyone |
//! | 5 | [`act`] | the agent calls a plan asks for, recorded in the tracker |
//! | 5 | [`aggregated`] | the aggregated API `pcap.packet.io`: files and live packets through the API server |
//! | 5 | [`report`] | status, Events and results ConfigMap of a reconcile |
//! | 6 | [`controller`] | `reconcile` inside the finalizer, the `Controller` and its watches |
//! | 7 | [`app`] | the process: health, webhook, leader election, controller |

pub mod access;
pub mod act;
pub mod agent_certs;
pub mod agents;
pub mod aggregated;
pub mod app;
pub mod backoff;
pub mod certs;
pub mod config;
pub mod consts;
pub mod controller;
pub mod error;
pub mod events;
pub mod install_check;
pub mod issuer;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod pki;
pub mod plan;
pub mod report;
pub mod results;
pub mod slots;
pub mod status;
pub mod targets;
#[cfg(test)]
mod test_objects;
pub mod tracker;
pub mod uninstall;
pub mod webhook;

pub use app::run;
pub use error::{Error, Result};

#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};

    /// Each module's layer, from the table above.
    fn layers() -> BTreeMap<String, u32> {
        include_str!("lib.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! | "))
            .filter_map(|row| {
                let mut cells = row.split(" | ");
                let layer = cells.next()?.parse().ok()?;
                let module = cells.next()?.trim_matches(['[', ']', '`']);
                Some((module.to_string(), layer))
            })
            .collect()
    }

    /// The modules a source file names through `crate::`, including those
    /// in `use crate::{a, b::c}` groups.
    fn uses(source: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (i, _) in source.match_indices("crate::") {
            let rest = &source[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                out.extend(group.split(',').filter_map(first_segment));
            } else if let Some(module) = first_segment(rest) {
                out.insert(module);
            }
        }
        out
    }

    fn first_segment(path: &str) -> Option<String> {
        let name: String = path
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // `crate::Error` and the like are re-exports of `error`.
        match name.chars().next() {
            Some(c) if c.is_uppercase() => Some("error".into()),
            Some(_) => Some(name),
            None => None,
        }
    }

    #[test]
    fn no_module_uses_one_of_its_layer_or_above() {
        let layers = layers();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let module = path.file_stem().unwrap().to_str().unwrap().to_string();
            if ["lib", "main"].contains(&module.as_str()) {
                continue;
            }
            let layer = *layers
                .get(&module)
                .unwrap_or_else(|| panic!("{module} is not in the table of lib.rs"));
            let source = std::fs::read_to_string(&path).unwrap();
            for used in uses(&source) {
                let below = layers
                    .get(&used)
                    .unwrap_or_else(|| panic!("{module} uses {used}, which is not in the table"));
                assert!(
                    *below < layer,
                    "{module} (layer {layer}) uses {used} (layer {below})"
                );
            }
            checked += 1;
        }
        assert_eq!(
            checked,
            layers.len(),
            "every module in the table has a file"
        );
    }

    #[test]
    fn paths_are_read_as_the_compiler_reads_them() {
        let found = uses("use crate::a::X;\nuse crate::{b, c::D};\nlet e = crate::Error::Io;");
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["a", "b", "c", "error"]
        );
    }
}
