//! The interfaces of this network namespace, and the ones that come and go,
//! from rtnetlink (`RTM_NEWLINK`/`RTM_DELLINK`).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_ROUTE: i32 = 0;
const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

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
    Gone(Link),
    /// Every interface that existed at the start has been reported.
    DumpDone,
}

/// A rtnetlink socket subscribed to link changes.
pub struct LinkWatcher {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl LinkWatcher {
    /// Subscribes, then asks for every existing interface: the answers and
    /// later changes arrive through [`LinkWatcher::next_events`], so no
    /// interface created in between is missed.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_LINK;
        // SAFETY: addr is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let watcher = Self {
            fd,
            buf: vec![0; 64 * 1024],
        };
        watcher.request_dump()?;
        Ok(watcher)
    }

    fn request_dump(&self) -> io::Result<()> {
        let mut msg = [0u8; NLMSG_HDR + IFINFOMSG];
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        msg[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
        msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
        msg[NLMSG_HDR] = libc::AF_UNSPEC as u8;
        // SAFETY: sending a buffer we own to our socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Blocks until rtnetlink says something, then returns the link events in it.
    pub fn next_events(&mut self) -> io::Result<Vec<LinkEvent>> {
        loop {
            // SAFETY: receiving into a buffer we own, within its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The kernel dropped notifications: ask for the whole
                    // list again rather than miss an interface.
                    Some(libc::ENOBUFS) => {
                        self.request_dump()?;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            return Ok(parse(&self.buf[..n as usize]));
        }
    }
}

impl AsRawFd for LinkWatcher {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Link events in a buffer of netlink messages.
fn parse(mut buf: &[u8]) -> Vec<LinkEvent> {
    let mut events = Vec::new();
    while let [l0, l1, l2, l3, k0, k1, ..] = *buf {
        let len = u32::from_ne_bytes([l0, l1, l2, l3]) as usize;
        let kind = u16::from_ne_bytes([k0, k1]);
        if len < NLMSG_HDR || len > buf.len() {
            break;
        }
        let body = &buf[NLMSG_HDR..len];
        match kind {
            RTM_NEWLINK | RTM_DELLINK => {
                if let Some(link) = parse_link(body) {
                    events.push(if kind == RTM_NEWLINK {
                        LinkEvent::Up(link)
                    } else {
                        LinkEvent::Gone(link)
                    });
                }
            }
            NLMSG_DONE => events.push(LinkEvent::DumpDone),
            // Acknowledgements and other messages.
            _ => {}
        }
        buf = buf.get((len + 3) & !3..).unwrap_or_default();
    }
    events
}

fn parse_link(body: &[u8]) -> Option<Link> {
    let info = body.get(..IFINFOMSG)?;
    let arphrd = u16::from_ne_bytes(info[2..4].try_into().ok()?);
    let index = i32::from_ne_bytes(info[4..8].try_into().ok()?);
    let mut attrs = &body[IFINFOMSG..];
    let mut name = None;
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes(attrs[0..2].try_into().ok()?));
        let kind = u16::from_ne_bytes(attrs[2..4].try_into().ok()?);
        if len < 4 || len > attrs.len() {
            break;
        }
        if kind == IFLA_IFNAME {
            let raw = &attrs[4..len];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            name = Some(String::from_utf8_lossy(&raw[..end]).into_owned());
        }
        let next = (len + 3) & !3;
        attrs = attrs.get(next..).unwrap_or_default();
    }
    Some(Link {
        index: u32::try_from(index).ok()?,
        name: name?,
        arphrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, index: i32, arphrd: u16, name: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let alen = 4 + name.len() + 1;
        attr.extend_from_slice(&(alen as u16).to_ne_bytes());
        attr.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        attr.extend_from_slice(name.as_bytes());
        attr.push(0);
        attr.resize((attr.len() + 3) & !3, 0);
        let mut info = vec![0u8; IFINFOMSG];
        info[2..4].copy_from_slice(&arphrd.to_ne_bytes());
        info[4..8].copy_from_slice(&index.to_ne_bytes());
        let len = NLMSG_HDR + info.len() + attr.len();
        let mut msg = Vec::new();
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend(info);
        msg.extend(attr);
        msg
    }

    #[test]
    fn parses_new_and_deleted_links() {
        let mut buf = message(RTM_NEWLINK, 3, 1, "eth0");
        buf.extend(message(RTM_DELLINK, 7, 65534, "wg0"));
        assert_eq!(
            parse(&buf),
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
            ]
        );
        assert_eq!(parse(&buf[..10]), []);
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
