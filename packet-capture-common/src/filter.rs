//! tcpdump filter expressions, compiled by libpcap to classic BPF: the one
//! compile that the agent (which runs the program) and the webhook (which
//! refuses what would not compile) share.

/// libpcap refused a filter expression; the message is libpcap's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

impl From<pcap::Error> for FilterError {
    fn from(e: pcap::Error) -> Self {
        Self(match e {
            pcap::Error::PcapError(msg) => msg,
            other => other.to_string(),
        })
    }
}

/// Compiles `expression` as tcpdump would for an Ethernet interface, with
/// the optimiser on.
pub fn compile(expression: &str) -> Result<pcap::BpfProgram, FilterError> {
    let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET)?;
    Ok(dead.compile(expression, true)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpcap_judges_the_expression() {
        assert!(
            !compile("tcp port 80 and not icmp")
                .unwrap()
                .get_instructions()
                .is_empty()
        );
        let err = compile("tcp and and").err().unwrap().to_string();
        assert!(err.contains("syntax error"), "{err}");
        let err = compile("port 99999").err().unwrap().to_string();
        assert!(err.contains("port"), "{err}");
    }
}
