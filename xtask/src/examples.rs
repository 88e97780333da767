//! The README's example captures, one file each under `examples/`.

use std::path::PathBuf;

use crate::util::root;

/// The examples, by resource name; each is `examples/<name>.yaml`.
pub const EXAMPLES: [&str; 7] = [
    "ip-capture",
    "pod-capture",
    "combined-capture",
    "realtime-capture",
    "custom-filter-capture",
    "high-volume-capture",
    "label-capture",
];

pub fn path(name: &str) -> PathBuf {
    root().join("examples").join(format!("{name}.yaml"))
}
