//! The eBPF backend: loads the embedded programs and attaches them to the TC
//! ingress and egress hooks of interfaces.

use std::collections::HashMap;

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use packet_capture_common::abi::counter;

/// The object `build.rs` compiled from `packet-capture-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/packet-capture"));

const INGRESS: &str = "tc_ingress";
const EGRESS: &str = "tc_egress";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
}

/// The attachments on one interface.
struct Attachment {
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

/// The loaded programs and what they are attached to. Dropping it detaches
/// every program.
pub struct Kernel {
    ebpf: Ebpf,
    attached: HashMap<String, Attachment>,
}

impl Kernel {
    /// Loads the programs into the kernel (the verifier runs here).
    pub fn load() -> Result<Self, Error> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        for name in [INGRESS, EGRESS] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            attached: HashMap::new(),
        })
    }

    /// Attaches both programs to `iface`. Ingress goes first in the chain and
    /// egress last, where tcpdump's taps are, so both see what tcpdump sees;
    /// the programs never change a packet's fate.
    pub fn attach(&mut self, iface: &str) -> Result<(), Error> {
        if self.attached.contains_key(iface) {
            return Ok(());
        }
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            // Pre-TCX kernels need a clsact qdisc; one that exists is shared.
            if let Err(e) = tc::qdisc_add_clsact(iface)
                && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(Error::Program {
                    name: INGRESS,
                    source: e.into(),
                });
            }
        }
        let attach = |ebpf: &mut Ebpf, name: &'static str, kind, order| {
            let program = classifier(ebpf, name)?;
            let result = if tcx {
                program.attach_with_options(iface, kind, TcAttachOptions::TcxOrder(order))
            } else {
                program.attach(iface, kind)
            };
            result.map_err(|source| Error::Program { name, source })
        };
        let ingress = attach(
            &mut self.ebpf,
            INGRESS,
            TcAttachType::Ingress,
            LinkOrder::first(),
        )?;
        let egress = match attach(
            &mut self.ebpf,
            EGRESS,
            TcAttachType::Egress,
            LinkOrder::last(),
        ) {
            Ok(link) => link,
            Err(e) => {
                // Nothing half-attached: undo the ingress side.
                let _ = classifier(&mut self.ebpf, INGRESS).map(|p| p.detach(ingress));
                return Err(e);
            }
        };
        self.attached
            .insert(iface.to_owned(), Attachment { ingress, egress });
        Ok(())
    }

    /// Detaches both programs from `iface`. An interface that is gone has
    /// lost its attachments with it; that is not an error.
    pub fn detach(&mut self, iface: &str) {
        let Some(a) = self.attached.remove(iface) else {
            return;
        };
        for (name, link) in [(INGRESS, a.ingress), (EGRESS, a.egress)] {
            if let Ok(program) = classifier(&mut self.ebpf, name)
                && let Err(e) = program.detach(link)
            {
                tracing::debug!(iface, program = name, error = %e, "detach");
            }
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// The value of one of the programs' counters, summed over CPUs.
    pub fn counter(&self, index: u32) -> Result<u64, Error> {
        const NAME: &str = "COUNTERS";
        let map = self.ebpf.map(NAME).ok_or(Error::Missing(NAME))?;
        let counters = PerCpuArray::<_, u64>::try_from(map)
            .map_err(|source| Error::Map { name: NAME, source })?;
        let values = counters
            .get(&index, 0)
            .map_err(|source| Error::Map { name: NAME, source })?;
        Ok(values.iter().sum())
    }

    /// Packets the programs have looked at.
    pub fn packets_seen(&self) -> Result<u64, Error> {
        self.counter(counter::SEEN)
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::Missing(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}
