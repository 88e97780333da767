//! The controller-to-agent gRPC contract, generated from
//! `packetcapture/v1/agent.proto`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("packetcapture.v1");

    /// The encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("packetcapture_v1_descriptor");
}
