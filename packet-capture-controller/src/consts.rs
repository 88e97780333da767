//! Names the controller writes into the cluster.

/// The finalizer on every `PacketCaptureConfig` the controller has seen.
pub const FINALIZER: &str = "networking.packet.io/stop-captures";

/// The field manager of the status and the results ConfigMaps.
pub const FIELD_MANAGER: &str = "packet-capture-controller";

/// The label naming the controller on what it creates (results ConfigMaps,
/// the Secrets of its own CA and certificates).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The reporting controller of Events, and the Lease's name.
pub const CONTROLLER_NAME: &str = "packet-capture-controller";

/// Results ConfigMaps are named `<prefix><PacketCaptureConfig name>`.
pub const RESULTS_PREFIX: &str = "packet-capture-results-";

/// Label on results ConfigMaps naming their capture.
pub const CAPTURE_LABEL: &str = "networking.packet.io/capture";

/// The condition summarising a capture.
pub const READY_CONDITION: &str = "Ready";
