//! The project's chores as a library: the `cargo xtask` binary runs them,
//! and the tests in `xtask/tests/` check the chart, the manifests and the
//! local control plane with the same code.

pub mod bench;
pub mod chart;
pub mod cluster;
pub mod cluster_checks;
pub mod crdgen;
pub mod cross;
pub mod demo;
pub mod ebpf;
pub mod examples;
pub mod images;
pub mod manifests;
pub mod setup;
pub mod util;
