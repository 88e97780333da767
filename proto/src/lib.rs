//! The controller-to-agent gRPC contract, generated from
//! `packetcapture/v1/agent.proto`, and the one translation between its enums
//! and the project's own [`CaptureState`], [`OutputFormat`] and
//! [`TargetDirection`].

use packet_capture_common::crd::{CaptureState, OutputFormat, TargetDirection};

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("packetcapture.v1");

    /// The encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("packetcapture_v1_descriptor");
}

/// A wire value this build does not know: an error, never a guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value} is not a known {what}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: i32,
}

impl From<CaptureState> for v1::CaptureState {
    fn from(s: CaptureState) -> Self {
        match s {
            CaptureState::Starting => Self::Starting,
            CaptureState::Running => Self::Running,
            CaptureState::Completed => Self::Completed,
            CaptureState::Failed => Self::Failed,
            CaptureState::Stopped => Self::Stopped,
        }
    }
}

impl TryFrom<v1::CaptureState> for CaptureState {
    type Error = UnknownValue;

    fn try_from(s: v1::CaptureState) -> Result<Self, Self::Error> {
        Ok(match s {
            v1::CaptureState::Starting => Self::Starting,
            v1::CaptureState::Running => Self::Running,
            v1::CaptureState::Completed => Self::Completed,
            v1::CaptureState::Failed => Self::Failed,
            v1::CaptureState::Stopped => Self::Stopped,
            v1::CaptureState::Unspecified => {
                return Err(UnknownValue {
                    what: "capture state",
                    value: s as i32,
                });
            }
        })
    }
}

impl From<OutputFormat> for v1::OutputFormat {
    fn from(f: OutputFormat) -> Self {
        match f {
            OutputFormat::Pcap => Self::Pcap,
            OutputFormat::Pcapng => Self::Pcapng,
            OutputFormat::Text => Self::Text,
            OutputFormat::Stdout => Self::Stdout,
            OutputFormat::Stream => Self::Stream,
        }
    }
}

impl From<v1::OutputFormat> for OutputFormat {
    /// `UNSPECIFIED` is pcap, as the proto documents.
    fn from(f: v1::OutputFormat) -> Self {
        match f {
            v1::OutputFormat::Unspecified | v1::OutputFormat::Pcap => Self::Pcap,
            v1::OutputFormat::Pcapng => Self::Pcapng,
            v1::OutputFormat::Text => Self::Text,
            v1::OutputFormat::Stdout => Self::Stdout,
            v1::OutputFormat::Stream => Self::Stream,
        }
    }
}

impl From<TargetDirection> for v1::Direction {
    fn from(d: TargetDirection) -> Self {
        match d {
            TargetDirection::Both => Self::Both,
            TargetDirection::Ingress => Self::Ingress,
            TargetDirection::Egress => Self::Egress,
        }
    }
}

impl From<v1::Direction> for TargetDirection {
    fn from(d: v1::Direction) -> Self {
        match d {
            v1::Direction::Both => Self::Both,
            v1::Direction::Ingress => Self::Ingress,
            v1::Direction::Egress => Self::Egress,
        }
    }
}

impl v1::Capture {
    /// The capture's state; a value this build does not know is an error.
    pub fn capture_state(&self) -> Result<CaptureState, UnknownValue> {
        v1::CaptureState::try_from(self.state)
            .map_err(|_| UnknownValue {
                what: "capture state",
                value: self.state,
            })
            .and_then(CaptureState::try_from)
    }
}

impl v1::CaptureSpec {
    /// The spec's output format; a value this build does not know is an error.
    pub fn format(&self) -> Result<OutputFormat, UnknownValue> {
        v1::OutputFormat::try_from(self.output_format)
            .map(OutputFormat::from)
            .map_err(|_| UnknownValue {
                what: "output format",
                value: self.output_format,
            })
    }

    /// The spec's direction; a value this build does not know is an error.
    pub fn target_direction(&self) -> Result<TargetDirection, UnknownValue> {
        v1::Direction::try_from(self.direction)
            .map(TargetDirection::from)
            .map_err(|_| UnknownValue {
                what: "direction",
                value: self.direction,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_format_goes_both_ways() {
        for s in CaptureState::ALL {
            let wire = v1::Capture {
                state: v1::CaptureState::from(s).into(),
                ..Default::default()
            };
            assert_eq!(wire.capture_state(), Ok(s));
        }
        for f in OutputFormat::ALL {
            let wire = v1::CaptureSpec {
                output_format: v1::OutputFormat::from(f).into(),
                ..Default::default()
            };
            assert_eq!(wire.format(), Ok(f));
        }
        for d in TargetDirection::ALL {
            let wire = v1::CaptureSpec {
                direction: v1::Direction::from(d).into(),
                ..Default::default()
            };
            assert_eq!(wire.target_direction(), Ok(d));
        }
    }

    #[test]
    fn unknown_wire_values_are_errors() {
        let c = |state| v1::Capture {
            state,
            ..Default::default()
        };
        assert_eq!(
            c(0).capture_state().unwrap_err().to_string(),
            "0 is not a known capture state"
        );
        assert_eq!(
            c(42).capture_state().unwrap_err().to_string(),
            "42 is not a known capture state"
        );
        let spec = v1::CaptureSpec {
            output_format: 9,
            ..Default::default()
        };
        assert_eq!(
            spec.format().unwrap_err().to_string(),
            "9 is not a known output format"
        );
        assert_eq!(v1::CaptureSpec::default().format(), Ok(OutputFormat::Pcap));
    }
}
