//! The interfaces of this network namespace, and the ones that come and go:
//! a blocking rtnetlink socket (`netlink-sys`) subscribed to link changes,
//! whose messages `netlink-packet-route` decodes.
//!
//! The socket blocks its own thread (see `capture::links`), so no async
//! runtime is involved.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    Emitable as _, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
    NlasIterator, ParseableParametrized as _,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkHeader, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Room for one datagram: the kernel sends dumps in pieces of at most 32 KiB
/// and notifications of a page.
const RECV_BUFFER: usize = 64 * 1024;

/// An interface as rtnetlink describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `ARPHRD_*` device type.
    pub arphrd: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A new interface, or news of one already known (the caller ignores
    /// what it has already handled).
    Up(Link),
    /// An interface was deleted, or moved to another network namespace
    /// (the kernel says both with `RTM_DELLINK`); or, after notifications
    /// were lost, a listing no longer showed it.
    Gone(Link),
    /// Every interface that existed when the listing was asked for has been
    /// reported: the first time after [`LinkWatcher::new`], and again after
    /// each listing asked for because notifications were lost.
    DumpDone,
}

/// A rtnetlink socket subscribed to link changes.
pub struct LinkWatcher {
    socket: Socket,
    buf: Vec<u8>,
    /// A listing was asked for and its end has not arrived yet.
    dumping: bool,
    /// Notifications were lost: the interfaces must be listed again.
    resync: bool,
    /// The interfaces reported up and not gone, by index.
    known: HashMap<u32, Link>,
    /// Indexes reported up since the last listing was asked for. A listing
    /// names every interface, so at its end a known index missing here is
    /// gone, even if the notification that said so was among those lost.
    confirmed: HashSet<u32>,
}

impl LinkWatcher {
    /// Subscribes, then asks for every existing interface: the answers and
    /// later changes arrive through [`LinkWatcher::next_events`], so no
    /// interface created in between is missed.
    pub fn new() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, libc::RTMGRP_LINK as u32))?;
        let mut watcher = Self {
            socket,
            buf: Vec::with_capacity(RECV_BUFFER),
            dumping: false,
            resync: false,
            known: HashMap::new(),
            confirmed: HashSet::new(),
        };
        watcher.request_dump()?;
        Ok(watcher)
    }

    fn request_dump(&mut self) -> io::Result<()> {
        let mut msg = NetlinkMessage::from(RouteNetlinkMessage::GetLink(LinkMessage::default()));
        msg.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        msg.finalize();
        let mut bytes = vec![0; msg.buffer_len()];
        msg.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        self.dumping = true;
        self.confirmed.clear();
        Ok(())
    }

    /// Blocks until rtnetlink says something, then returns the link events in it.
    ///
    /// When the kernel reports lost notifications (`ENOBUFS`), every
    /// interface is listed again, which the caller sees end with another
    /// [`LinkEvent::DumpDone`]. The listing is asked for only once the
    /// socket's queue is empty: until then the kernel keeps dropping
    /// notifications without saying so again, and a listing already past an
    /// interface would miss its change. (A listing still under way is read
    /// to its end first: the kernel runs one at a time per socket.)
    pub fn next_events(&mut self) -> io::Result<Vec<LinkEvent>> {
        loop {
            let draining = self.resync && !self.dumping;
            let flags = if draining { libc::MSG_DONTWAIT } else { 0 };
            self.buf.clear();
            if let Err(e) = self.socket.recv(&mut self.buf, flags) {
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::ENOBUFS) => self.resync = true,
                    Some(libc::EAGAIN) if draining => {
                        self.resync = false;
                        self.request_dump()?;
                    }
                    _ => return Err(e),
                }
                continue;
            }
            let parsed = parse(&self.buf)?;
            return Ok(self.follow(parsed));
        }
    }

    /// Keeps track of the interfaces `events` report, and adds a departure
    /// before the end of a listing for each known interface it did not
    /// name.
    fn follow(&mut self, events: Vec<LinkEvent>) -> Vec<LinkEvent> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            match &event {
                LinkEvent::Up(link) => {
                    self.known.insert(link.index, link.clone());
                    self.confirmed.insert(link.index);
                }
                LinkEvent::Gone(link) => {
                    self.known.remove(&link.index);
                }
                LinkEvent::DumpDone => {
                    self.dumping = false;
                    let confirmed = &self.confirmed;
                    let stale: Vec<u32> = self
                        .known
                        .keys()
                        .filter(|index| !confirmed.contains(index))
                        .copied()
                        .collect();
                    for index in stale {
                        if let Some(link) = self.known.remove(&index) {
                            out.push(LinkEvent::Gone(link));
                        }
                    }
                }
            }
            out.push(event);
        }
        out
    }
}

impl std::os::fd::AsRawFd for LinkWatcher {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// Link events in a datagram of netlink messages. An error message (the
/// kernel refusing the listing) is an error.
fn parse(mut buf: &[u8]) -> io::Result<Vec<LinkEvent>> {
    let mut events = Vec::new();
    while let Ok(frame) = NetlinkBuffer::new_checked(buf) {
        let len = frame.length() as usize;
        let event = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf) {
            Ok(msg) => match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                    link(&m.header, m.attributes).map(LinkEvent::Up)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                    link(&m.header, m.attributes).map(LinkEvent::Gone)
                }
                NetlinkPayload::Done(_) => Some(LinkEvent::DumpDone),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                // Acknowledgements and other messages.
                _ => None,
            },
            Err(e) => {
                let event = lenient(frame.message_type(), frame.payload());
                tracing::debug!(error = %e, ?event, "an interface message decoded leniently");
                event
            }
        };
        events.extend(event);
        // Messages are aligned to four bytes within a datagram.
        buf = buf.get((len + 3) & !3..).unwrap_or_default();
    }
    Ok(events)
}

/// A link message netlink-packet-route cannot decode whole (a kernel newer
/// than the crate may send an attribute it misreads): each attribute is
/// decoded on its own and those that fail are skipped, so an interface is
/// never missed for the sake of an attribute the agent does not use.
fn lenient(message_type: u16, payload: &[u8]) -> Option<LinkEvent> {
    let header = LinkHeader::parse(payload).ok()?;
    let attributes = NlasIterator::new(payload.get(header.buffer_len()..)?)
        .filter_map(Result::ok)
        .filter_map(|nla| LinkAttribute::parse_with_param(&nla, header.interface_family).ok())
        .collect();
    let link = link(&header, attributes)?;
    match message_type {
        libc::RTM_NEWLINK => Some(LinkEvent::Up(link)),
        libc::RTM_DELLINK => Some(LinkEvent::Gone(link)),
        _ => None,
    }
}

fn link(header: &LinkHeader, attributes: Vec<LinkAttribute>) -> Option<Link> {
    let name = attributes.into_iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name),
        _ => None,
    })?;
    Some(Link {
        index: header.index,
        name,
        arphrd: header.link_layer_type.into(),
    })
}

/// The addresses on the other end of interface `ifindex` when it is one end
/// of a pair reaching into another network namespace (a pod's veth): what
/// the pod's own interface holds. Empty for any other interface.
///
/// The other namespace is read through its id in this one
/// (`IFA_TARGET_NETNSID`, strict checking): no entering it, no privilege
/// beyond CAP_NET_ADMIN here.
pub fn peer_addresses(ifindex: u32) -> io::Result<Vec<IpAddr>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.set_netlink_get_strict_chk(true)?;
    let mut get = LinkMessage::default();
    get.header.index = ifindex;
    let (mut peer, mut netns) = (None, None);
    for message in ask(&socket, RouteNetlinkMessage::GetLink(get), false)? {
        if let RouteNetlinkMessage::NewLink(m) = message {
            for a in m.attributes {
                match a {
                    LinkAttribute::Link(index) => peer = Some(index),
                    LinkAttribute::LinkNetNsId(id) => netns = Some(id),
                    _ => {}
                }
            }
        }
    }
    let (Some(peer), Some(netns)) = (peer, netns) else {
        return Ok(Vec::new());
    };
    let mut addresses = AddressMessage::default();
    addresses.header.index = peer;
    addresses
        .attributes
        .push(AddressAttribute::TargetNetNsId(netns));
    let mut out = Vec::new();
    for message in ask(&socket, RouteNetlinkMessage::GetAddress(addresses), true)? {
        if let RouteNetlinkMessage::NewAddress(m) = message
            && m.header.index == peer
        {
            out.extend(m.attributes.into_iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(ip),
                _ => None,
            }));
        }
    }
    Ok(out)
}

/// Sends one request (a listing with `dump`) and returns the answers.
fn ask(
    socket: &Socket,
    request: RouteNetlinkMessage,
    dump: bool,
) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut msg = NetlinkMessage::from(request);
    msg.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    msg.finalize();
    let mut bytes = vec![0; msg.buffer_len()];
    msg.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    let mut answers = Vec::new();
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0)?;
        let mut rest = &buf[..];
        while let Ok(frame) = NetlinkBuffer::new_checked(rest) {
            let len = frame.length() as usize;
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest) {
                Ok(m) => match m.payload {
                    NetlinkPayload::InnerMessage(inner) => {
                        answers.push(inner);
                        if !dump {
                            return Ok(answers);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                },
                // An answer the crate cannot decode is of no use here.
                Err(e) => tracing::debug!(error = %e, "an rtnetlink answer left out"),
            }
            rest = rest.get((len + 3) & !3..).unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{DoneMessage, NetlinkHeader};
    use netlink_packet_route::link::LinkLayerType;

    use super::*;

    /// A datagram of `messages` as the kernel would send it.
    fn datagram(messages: Vec<NetlinkPayload<RouteNetlinkMessage>>) -> Vec<u8> {
        let mut out = Vec::new();
        for payload in messages {
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), payload);
            msg.finalize();
            let mut bytes = vec![0; msg.buffer_len()];
            msg.serialize(&mut bytes);
            bytes.resize((bytes.len() + 3) & !3, 0);
            out.extend(bytes);
        }
        out
    }

    fn link_message(index: u32, arphrd: LinkLayerType, name: &str) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.link_layer_type = arphrd;
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m
    }

    #[test]
    fn decodes_new_and_deleted_links_and_the_end_of_a_listing() {
        let buf = datagram(vec![
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link_message(
                3,
                LinkLayerType::Ether,
                "eth0",
            ))),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link_message(
                7,
                LinkLayerType::None,
                "wg0",
            ))),
            NetlinkPayload::Done(DoneMessage::default()),
        ]);
        assert_eq!(
            parse(&buf).unwrap(),
            [
                LinkEvent::Up(Link {
                    index: 3,
                    name: "eth0".into(),
                    arphrd: 1
                }),
                LinkEvent::Gone(Link {
                    index: 7,
                    name: "wg0".into(),
                    arphrd: 65534
                }),
                LinkEvent::DumpDone,
            ]
        );
        // A cut datagram yields what is whole in it.
        assert_eq!(parse(&buf[..10]).unwrap(), []);
    }

    #[test]
    fn an_attribute_the_crate_cannot_decode_does_not_hide_the_interface() {
        let mut buf = datagram(vec![NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(link_message(9, LinkLayerType::Ether, "eth9")),
        )]);
        // IFLA_MTU (4) must hold four bytes; one with two fails the strict
        // decoding of the whole message.
        let bad_mtu = [6u8, 0, 4, 0, 0xdc, 0x05, 0, 0];
        buf.extend_from_slice(&bad_mtu);
        let len = buf.len() as u32;
        buf[..4].copy_from_slice(&len.to_ne_bytes());
        assert!(NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).is_err());
        assert_eq!(
            parse(&buf).unwrap(),
            [LinkEvent::Up(Link {
                index: 9,
                name: "eth9".into(),
                arphrd: 1
            })]
        );
    }

    #[test]
    fn a_refusal_is_an_error() {
        let mut refusal = netlink_packet_core::ErrorMessage::default();
        refusal.code = std::num::NonZeroI32::new(-libc::EPERM);
        let buf = datagram(vec![NetlinkPayload::Error(refusal)]);
        let err = parse(&buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn a_listing_after_lost_notifications_says_what_went_meanwhile() {
        let mut w = LinkWatcher::new().unwrap();
        let link = |index, name: &str| Link {
            index,
            name: name.into(),
            arphrd: 1,
        };
        let first = vec![
            LinkEvent::Up(link(2, "eth0")),
            LinkEvent::Up(link(3, "eth1")),
            LinkEvent::DumpDone,
        ];
        assert_eq!(w.follow(first.clone()), first);
        // A notification, then lost ones (eth1 deleted, eth2 come and
        // gone), then the listing asked for again: eth1 is not in it.
        assert_eq!(
            w.follow(vec![LinkEvent::Up(link(2, "wan0"))]),
            [LinkEvent::Up(link(2, "wan0"))]
        );
        w.request_dump().unwrap();
        assert_eq!(
            w.follow(vec![LinkEvent::Up(link(2, "wan0")), LinkEvent::DumpDone]),
            [
                LinkEvent::Up(link(2, "wan0")),
                LinkEvent::Gone(link(3, "eth1")),
                LinkEvent::DumpDone
            ]
        );
    }

    #[test]
    fn lists_this_namespaces_interfaces() {
        // Loopback exists in every namespace, and a dump needs no privilege.
        let mut w = LinkWatcher::new().unwrap();
        let mut seen = Vec::new();
        let mut done = false;
        while !done {
            for e in w.next_events().unwrap() {
                match e {
                    LinkEvent::Up(l) => seen.push(l),
                    LinkEvent::DumpDone => done = true,
                    LinkEvent::Gone(_) => {}
                }
            }
        }
        let lo = seen.iter().find(|l| l.name == "lo").unwrap();
        assert_eq!(lo.arphrd, 772);
    }
}
