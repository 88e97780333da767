//! The aggregated API `pcap.packet.io/v1` that the controller serves (a
//! capture's files and live packets, through the API server): its names
//! and the paths of its requests, for the controller and its clients.

use serde::{Deserialize, Serialize};

/// The aggregated API's group and version.
pub const GROUP: &str = "pcap.packet.io";
pub const VERSION: &str = "v1";
/// The APIService that registers the group with the API server.
pub const API_SERVICE: &str = "v1.pcap.packet.io";

/// The resource of this API: the PacketCaptureConfigs, by name.
pub const CAPTURES: &str = "captures";
/// The subresource every path goes through: the controller relays them to
/// the agents. `proxy` is one of the API server's long-running
/// subresources, so a stream or a large download is not cut at its request
/// timeout (a minute).
pub const RELAY: &str = "proxy";
/// The two as RBAC names them.
pub const RELAY_SUBRESOURCE: &str = "captures/proxy";

/// Percent-encodes one path segment (anything but RFC 3986's unreserved
/// characters), so a name can never reach another path.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn capture_path(capture: &str) -> String {
    format!(
        "/apis/{GROUP}/{VERSION}/{CAPTURES}/{}/{RELAY}",
        segment(capture)
    )
}

/// The path that lists a capture's files.
pub fn files_path(capture: &str) -> String {
    format!("{}/files", capture_path(capture))
}

/// The path of one file of one node.
pub fn file_path(capture: &str, node: &str, file: &str) -> String {
    format!(
        "{}/files/{}/{}",
        capture_path(capture),
        segment(node),
        segment(file)
    )
}

/// The path of the live, merged pcapng stream.
pub fn packets_path(capture: &str) -> String {
    format!("{}/packets", capture_path(capture))
}

/// `GET .../captures/{name}/proxy/files`: each node's files of a capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    pub capture: String,
    #[serde(default)]
    pub nodes: Vec<NodeFiles>,
}

/// One node's files, or why the controller could not ask its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFiles {
    pub node: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    /// Bytes as stored on the node (compressed, for `.gz` and `.zst`).
    pub size: u64,
    /// When it was last written, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbac_names_the_relay_as_paths_do() {
        assert_eq!(RELAY_SUBRESOURCE, format!("{CAPTURES}/{RELAY}"));
    }

    #[test]
    fn paths_encode_each_segment() {
        assert_eq!(
            files_path("web"),
            "/apis/pcap.packet.io/v1/captures/web/proxy/files"
        );
        assert_eq!(
            file_path("web", "worker-1", "web-20250101-120000.pcap.gz"),
            "/apis/pcap.packet.io/v1/captures/web/proxy/files/worker-1/web-20250101-120000.pcap.gz"
        );
        assert_eq!(
            file_path("web", "a/b", "../x y"),
            "/apis/pcap.packet.io/v1/captures/web/proxy/files/a%2Fb/..%2Fx%20y"
        );
        assert_eq!(
            packets_path("web"),
            "/apis/pcap.packet.io/v1/captures/web/proxy/packets"
        );
    }
}
