//! tcpdump filter expressions, compiled by libpcap to classic BPF: the one
//! compile that the agent (which runs the program) and the webhook (which
//! refuses what would not compile) share.
//!
//! Names are refused before libpcap sees the expression. libpcap resolves a
//! host name with DNS, and network, service, protocol and Ethernet host
//! names through the C library's /etc files (NSS): a compile could wait on
//! a resolver, tell it which names are captured, and mean one thing in the
//! webhook and another on each node. [`without_names`] reads the expression
//! with libpcap's lexical rules (its `scanner.l`) and follows the qualifiers
//! a word gets (`host`, `net`, `port`, ... inherited across `and`/`or` as
//! its `grammar.y` does); every word that would be looked up is refused with
//! a message that names it. Addresses, CIDRs, numbers and libpcap's own
//! keywords stay; the IP protocol names among those keywords (`ip proto
//! \tcp`), which libpcap would look up in /etc/protocols, are replaced by
//! their numbers. [`compile_async`] compiles on tokio's blocking pool
//! within [`COMPILE_TIMEOUT`].

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// How long a compile may take; libpcap's optimiser needs about a second
/// for 4 KiB of `host a or host b or ...`.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(2);
/// Compiles running at once (each on a blocking thread); more wait.
const CONCURRENT_COMPILES: usize = 4;

/// Why an expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A word that libpcap would resolve by name.
    #[error("{word:?} {kind}")]
    Name { word: String, kind: NameKind },
    /// libpcap refused it; the message is libpcap's.
    #[error("{0}")]
    Libpcap(String),
    #[error("libpcap did not compile it within {0:?}; simplify the expression")]
    TimedOut(Duration),
    /// Every compile slot stayed taken by other filters for the whole
    /// limit: nothing is known of this one yet, so the caller may retry.
    #[error("libpcap was busy compiling other filters for {0:?}; try again")]
    Busy(Duration),
}

/// What a refused word would have been looked up as, and what to write
/// instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Host,
    EthernetHost,
    Network,
    Service,
    ServiceRange,
    Protocol,
    EtherProtocol,
    Gateway,
    /// A word where libpcap takes no name (a typo, or a syntax error):
    /// refused too, in case libpcap would take it as one after all.
    Word,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Host => {
                "is a host name, which libpcap would resolve (DNS, /etc/hosts): use an IP address or a CIDR"
            }
            Self::EthernetHost => {
                "is an Ethernet host name, which libpcap would look up in /etc/ethers: use a MAC address (00:11:22:33:44:55)"
            }
            Self::Network => {
                "is a network name, which libpcap would look up in /etc/networks: use an address with a prefix length (10.0.0.0/8)"
            }
            Self::Service => {
                "is a service name, which libpcap would look up in /etc/services: use the port number"
            }
            Self::ServiceRange => {
                "is not a range of port numbers (1-1024): libpcap would look its names up in /etc/services"
            }
            Self::Protocol => {
                "is a protocol name, which libpcap would look up in /etc/protocols: use the protocol number (or tcp, udp, icmp, icmp6, igmp, igrp, pim, vrrp, carp, sctp, ah, esp)"
            }
            Self::EtherProtocol => {
                "is not one of libpcap's protocol names for this link layer: use the number (ether proto 0x0800)"
            }
            Self::Gateway => {
                "is a host name that gateway resolves (DNS, /etc/hosts, /etc/ethers): write ether host <MAC> and not host <IP> instead"
            }
            Self::Word => {
                "is not a tcpdump keyword here, and names are not allowed: use addresses and numbers"
            }
        })
    }
}

impl From<pcap::Error> for FilterError {
    fn from(e: pcap::Error) -> Self {
        Self::Libpcap(match e {
            pcap::Error::PcapError(msg) => msg,
            other => other.to_string(),
        })
    }
}

/// Compiles `expression` as tcpdump would for an Ethernet interface, with
/// the optimiser on, after [`without_names`]. Blocks: async callers use
/// [`compile_async`].
pub fn compile(expression: &str) -> Result<pcap::BpfProgram, FilterError> {
    compile_for(expression, pcap::Linktype::ETHERNET)
}

/// [`compile`] for interfaces of another link type (`RAW`: frames that
/// start at the IP header).
pub fn compile_for(
    expression: &str,
    link: pcap::Linktype,
) -> Result<pcap::BpfProgram, FilterError> {
    let expression = without_names(expression)?;
    let dead = pcap::Capture::dead(link)?;
    Ok(dead.compile(&expression, true)?)
}

/// [`compile`] on tokio's blocking pool, given up after
/// [`COMPILE_TIMEOUT`].
pub async fn compile_async(expression: &str) -> Result<pcap::BpfProgram, FilterError> {
    compile_within(expression, COMPILE_TIMEOUT).await
}

/// [`compile_for`] as [`compile_async`] runs [`compile`].
pub async fn compile_async_for(
    expression: &str,
    link: pcap::Linktype,
) -> Result<pcap::BpfProgram, FilterError> {
    compile_within_for(expression, link, COMPILE_TIMEOUT).await
}

static COMPILES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CONCURRENT_COMPILES);

/// [`compile`] on tokio's blocking pool, given up after `limit` once it
/// holds one of the `CONCURRENT_COMPILES` slots ([`FilterError::TimedOut`]),
/// or when no slot came free within `limit` ([`FilterError::Busy`]): the
/// time others' filters take is not held against this one. A compile given
/// up on runs to its end on its thread and keeps its slot until then, so
/// that expressions refused for their time cannot pile up threads.
pub async fn compile_within(
    expression: &str,
    limit: Duration,
) -> Result<pcap::BpfProgram, FilterError> {
    compile_within_for(expression, pcap::Linktype::ETHERNET, limit).await
}

async fn compile_within_for(
    expression: &str,
    link: pcap::Linktype,
    limit: Duration,
) -> Result<pcap::BpfProgram, FilterError> {
    let slot = tokio::time::timeout(limit, COMPILES.acquire())
        .await
        .map_err(|_| FilterError::Busy(limit))?
        .map_err(|e| FilterError::Libpcap(e.to_string()))?;
    let expression = expression.to_owned();
    let compiled = tokio::task::spawn_blocking(move || {
        let compiled = compile_for(&expression, link);
        drop(slot);
        compiled
    });
    tokio::time::timeout(limit, compiled)
        .await
        .map_err(|_| FilterError::TimedOut(limit))?
        .map_err(|e| FilterError::Libpcap(format!("the compile failed: {e}")))?
}

/// `expression` as libpcap may compile it without looking up a name, or
/// the first word it would look up. IP protocol names after `proto` and
/// `protochain` are replaced by their numbers; everything else is kept as
/// written.
pub fn without_names(expression: &str) -> Result<Cow<'_, str>, FilterError> {
    let bytes = expression.as_bytes();
    let mut rewrites: Vec<(usize, usize, u8)> = Vec::new();
    let mut q = Qualifiers::default();
    let mut previous = Token::Other;
    let mut at = 0;
    while let Some((token, start, end)) = next_token(bytes, at) {
        at = end;
        match token {
            Token::Word => {
                // Words end at ASCII bytes; other tokens may be one byte of
                // a longer character, which libpcap refuses later.
                let word = &expression[start..end];
                let escaped = word.starts_with('\\');
                let name = if escaped { &word[1..] } else { word };
                match q.word(previous) {
                    // libpcap's own tables: 802.11 types, LLC, pf.
                    Some(Use::Table) => {}
                    Some(Use::Id(qual)) => match judge(name, qual) {
                        Judgement::Keep => {}
                        Judgement::Number(n) => rewrites.push((start, end, n)),
                        Judgement::Refuse(kind) => {
                            return Err(FilterError::Name {
                                word: name.to_owned(),
                                kind,
                            });
                        }
                    },
                    None => {
                        return Err(FilterError::Name {
                            word: name.to_owned(),
                            kind: NameKind::Word,
                        });
                    }
                }
            }
            _ => q.token(token, previous),
        }
        previous = token;
    }
    if rewrites.is_empty() {
        return Ok(Cow::Borrowed(expression));
    }
    let mut out = String::with_capacity(expression.len());
    let mut copied = 0;
    for (start, end, number) in rewrites {
        out.push_str(&expression[copied..start]);
        out.push_str(&number.to_string());
        copied = end;
    }
    out.push_str(&expression[copied..]);
    Ok(Cow::Owned(out))
}

// ---------------------------------------------------------------------------
// The words: libpcap's scanner.

/// What the scanner makes of a piece of the expression, as far as names go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// `src`, `dst`, `addr1`..`addr4`, `ra`, `ta`.
    Dir,
    /// `host`, `net`, `port`, `portrange`, `gateway`, `proto`, `protochain`.
    Address(Address),
    /// A protocol qualifier (`ether`, `ip`, `tcp`, ...).
    Layer(Layer),
    And,
    Or,
    Not,
    Open,
    Close,
    /// `mask` (of `net a.b.c.d mask e.f.g.h`).
    Mask,
    /// `/` (of `net a.b.c.d/len`).
    Slash,
    /// A keyword whose argument comes from libpcap's own tables (`llc`,
    /// `type`, `subtype`, `dir`, `on`, `ifname`, `rset`, `reason`, `action`).
    Table,
    /// A number, an address (IPv4, IPv6, MAC, ARCnet) or a keyword that
    /// stands for a number (`tcp-syn`, `icmptype`).
    Value,
    /// An identifier (libpcap's `ID`), `\`-escaped or not.
    Word,
    /// Any other keyword, an operator, or a character libpcap refuses.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Address {
    Host,
    Net,
    Port,
    PortRange,
    Gateway,
    Proto,
    ProtoChain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// `link`, `ether`, `ppp`, `slip`, `fddi`, `tr`, `wlan`.
    Link,
    Ip,
    Ip6,
    Iso,
    Other,
}

/// scanner.l's keywords (its rules before `ID`, which win a tie).
fn keyword(word: &str) -> Option<Token> {
    use Token::*;
    Some(match word {
        "dst" | "src" | "address1" | "addr1" | "address2" | "addr2" | "address3" | "addr3"
        | "address4" | "addr4" | "ra" | "ta" => Dir,
        "host" => Address(self::Address::Host),
        "net" => Address(self::Address::Net),
        "port" => Address(self::Address::Port),
        "portrange" => Address(self::Address::PortRange),
        "gateway" => Address(self::Address::Gateway),
        "proto" => Address(self::Address::Proto),
        "protochain" => Address(self::Address::ProtoChain),
        "link" | "ether" | "ppp" | "slip" | "fddi" | "tr" | "wlan" => Layer(self::Layer::Link),
        "ip" => Layer(self::Layer::Ip),
        "ip6" => Layer(self::Layer::Ip6),
        "iso" => Layer(self::Layer::Iso),
        "arp" | "rarp" | "sctp" | "tcp" | "udp" | "icmp" | "igmp" | "igrp" | "pim" | "vrrp"
        | "carp" | "radio" | "icmp6" | "ah" | "esp" | "atalk" | "aarp" | "decnet" | "lat"
        | "sca" | "moprc" | "mopdl" | "esis" | "es-is" | "isis" | "is-is" | "l1" | "l2" | "iih"
        | "lsp" | "snp" | "csnp" | "psnp" | "clnp" | "stp" | "ipx" | "netbeui" => {
            Layer(self::Layer::Other)
        }
        "and" | "&&" => And,
        "or" | "||" => Or,
        "not" => Not,
        "mask" => Mask,
        "llc" | "type" | "subtype" | "direction" | "dir" | "on" | "ifname" | "rset" | "ruleset"
        | "reason" | "action" => Table,
        "less" | "greater" | "byte" | "broadcast" | "multicast" | "len" | "length" | "inbound"
        | "outbound" | "ifindex" | "vlan" | "mpls" | "pppoed" | "pppoes" | "geneve" | "vxlan"
        | "batadv" | "lane" | "metac" | "bcc" | "oam" | "oamf4" | "oamf4ec" | "oamf4sc" | "sc"
        | "ilmic" | "vpi" | "vci" | "connectmsg" | "metaconnect" | "rnr" | "rulenum" | "srnr"
        | "subrulenum" | "fisu" | "lssu" | "lsu" | "msu" | "hfisu" | "hlssu" | "hmsu" | "sio"
        | "opc" | "dpc" | "sls" | "hsio" | "hopc" | "hdpc" | "hsls" => Other,
        "icmptype"
        | "icmpcode"
        | "icmp-echoreply"
        | "icmp-unreach"
        | "icmp-sourcequench"
        | "icmp-redirect"
        | "icmp-echo"
        | "icmp-routeradvert"
        | "icmp-routersolicit"
        | "icmp-timxceed"
        | "icmp-paramprob"
        | "icmp-tstamp"
        | "icmp-tstampreply"
        | "icmp-ireq"
        | "icmp-ireqreply"
        | "icmp-maskreq"
        | "icmp-maskreply"
        | "icmp6type"
        | "icmp6code"
        | "icmp6-destinationunreach"
        | "icmp6-packettoobig"
        | "icmp6-timeexceeded"
        | "icmp6-parameterproblem"
        | "icmp6-echo"
        | "icmp6-echoreply"
        | "icmp6-multicastlistenerquery"
        | "icmp6-multicastlistenerreportv1"
        | "icmp6-multicastlistenerdone"
        | "icmp6-routersolicit"
        | "icmp6-routeradvert"
        | "icmp6-neighborsolicit"
        | "icmp6-neighboradvert"
        | "icmp6-redirect"
        | "icmp6-routerrenum"
        | "icmp6-nodeinformationquery"
        | "icmp6-nodeinformationresponse"
        | "icmp6-ineighbordiscoverysolicit"
        | "icmp6-ineighbordiscoveryadvert"
        | "icmp6-multicastlistenerreportv2"
        | "icmp6-homeagentdiscoveryrequest"
        | "icmp6-homeagentdiscoveryreply"
        | "icmp6-mobileprefixsolicit"
        | "icmp6-mobileprefixadvert"
        | "icmp6-certpathsolicit"
        | "icmp6-certpathadvert"
        | "icmp6-multicastrouteradvert"
        | "icmp6-multicastroutersolicit"
        | "icmp6-multicastrouterterm"
        | "tcpflags"
        | "tcp-fin"
        | "tcp-syn"
        | "tcp-rst"
        | "tcp-push"
        | "tcp-ack"
        | "tcp-urg"
        | "tcp-ece"
        | "tcp-cwr" => Value,
        _ => return None,
    })
}

/// The next token at or after `at` (blanks skipped): flex's rule, the
/// longest match, the earlier rule on a tie. `None` at the end.
fn next_token(s: &[u8], mut at: usize) -> Option<(Token, usize, usize)> {
    while at < s.len() && matches!(s[at], b' ' | b'\r' | b'\n' | b'\t') {
        at += 1;
    }
    if at == s.len() {
        return None;
    }
    let rest = &s[at..];
    let id = id_len(rest);
    // (length, token) in the order of scanner.l's rules.
    let keyword = (id > 0)
        .then(|| std::str::from_utf8(&rest[..id]).ok().and_then(keyword))
        .flatten();
    let two = rest.get(..2);
    let candidates = [
        match (keyword, two) {
            (Some(k), _) => (id, k),
            (None, Some(b"&&")) => (2, Token::And),
            (None, Some(b"||")) => (2, Token::Or),
            _ => (0, Token::Other),
        },
        match rest[0] {
            b'(' => (1, Token::Open),
            b')' => (1, Token::Close),
            b'!' => (1, Token::Not),
            b'/' => (1, Token::Slash),
            b'+' | b'-' | b'*' | b'%' | b':' | b'[' | b']' | b'<' | b'>' | b'&' | b'|' | b'^'
            | b'=' => (1, Token::Other),
            _ => (0, Token::Other),
        },
        match two {
            Some(b">=" | b"<=" | b"!=" | b"==" | b"<<" | b">>") => (2, Token::Other),
            _ => (0, Token::Other),
        },
        (aid_len(rest), Token::Value),
        (mac_len(rest), Token::Value),
        (number_len(rest), Token::Value),
        (ipv4_len(rest), Token::Value),
        (ipv6_len(rest), Token::Value),
        (bogus_mac_len(rest), Token::Value),
        (id, Token::Word),
        (escaped_len(rest), Token::Word),
        (1, Token::Other),
    ];
    let (len, token) =
        candidates.iter().fold(
            (0, Token::Other),
            |best, &c| if c.0 > best.0 { c } else { best },
        );
    Some((token, at, at + len))
}

fn hex_run(s: &[u8]) -> usize {
    s.iter().take_while(|b| b.is_ascii_hexdigit()).count()
}

fn digit_run(s: &[u8]) -> usize {
    s.iter().take_while(|b| b.is_ascii_digit()).count()
}

/// `[A-Za-z0-9]([-_.A-Za-z0-9]*[.A-Za-z0-9])?`
fn id_len(s: &[u8]) -> usize {
    if !s.first().is_some_and(u8::is_ascii_alphanumeric) {
        return 0;
    }
    let run = s
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        .count();
    s[..run]
        .iter()
        .rposition(|&b| b.is_ascii_alphanumeric() || b == b'.')
        .map_or(1, |last| last + 1)
}

/// `\\[^ !()\n\t]+`
fn escaped_len(s: &[u8]) -> usize {
    if s.first() != Some(&b'\\') {
        return 0;
    }
    let run = s[1..]
        .iter()
        .take_while(|b| !matches!(b, b' ' | b'!' | b'(' | b')' | b'\n' | b'\t'))
        .count();
    if run == 0 { 0 } else { 1 + run }
}

/// `N`: `[0-9]+|(0X|0x)[0-9A-Fa-f]+`
fn number_len(s: &[u8]) -> usize {
    let decimal = digit_run(s);
    let hex = match s {
        [b'0', b'x' | b'X', rest @ ..] => match hex_run(rest) {
            0 => 0,
            n => 2 + n,
        },
        _ => 0,
    };
    decimal.max(hex)
}

/// `N.N`, `N.N.N` or `N.N.N.N`.
fn ipv4_len(s: &[u8]) -> usize {
    let (parts, len) = dotted(s, 4);
    if parts >= 2 { len } else { 0 }
}

/// Up to `max` numbers joined by dots: how many, and their length.
fn dotted(s: &[u8], max: usize) -> (usize, usize) {
    let mut len = number_len(s);
    if len == 0 {
        return (0, 0);
    }
    let mut parts = 1;
    while parts < max && s.get(len) == Some(&b'.') {
        match number_len(&s[len + 1..]) {
            0 => break,
            n => {
                len += 1 + n;
                parts += 1;
            }
        }
    }
    (parts, len)
}

/// `$` and one or two hex digits (an ARCnet address).
fn aid_len(s: &[u8]) -> usize {
    match s {
        [b'$', rest @ ..] => match hex_run(rest).min(2) {
            0 => 0,
            n => 1 + n,
        },
        _ => 0,
    }
}

/// A MAC address: six groups of one or two hex digits joined by `:`, `-`
/// or `.`; three of four joined by `.`; or twelve hex digits.
fn mac_len(s: &[u8]) -> usize {
    let groups = |sep: u8| {
        let mut len = 0;
        for i in 0..6 {
            let run = hex_run(&s[len..]);
            if run == 0 || (i < 5 && (run > 2 || s.get(len + run) != Some(&sep))) {
                return 0;
            }
            len += run.min(2) + usize::from(i < 5);
        }
        len
    };
    let quads = || {
        let mut len = 0;
        for i in 0..3 {
            if hex_run(&s[len..]) < 4
                || (i < 2 && (hex_run(&s[len..]) != 4 || s.get(len + 4) != Some(&b'.')))
            {
                return 0;
            }
            len += 4 + usize::from(i < 2);
        }
        len
    };
    let twelve = if hex_run(s) >= 12 { 12 } else { 0 };
    [groups(b':'), groups(b'-'), groups(b'.'), quads(), twelve]
        .into_iter()
        .max()
        .unwrap_or(0)
}

/// `{B}:+({B}:+)+`: what libpcap calls a bogus Ethernet address.
fn bogus_mac_len(s: &[u8]) -> usize {
    let mut len = 0;
    let mut groups = 0;
    loop {
        let run = hex_run(&s[len..]);
        if run == 0 || run > 2 {
            break;
        }
        let colons = s[len + run..].iter().take_while(|&&b| b == b':').count();
        if colons == 0 {
            break;
        }
        len += run + colons;
        groups += 1;
    }
    if groups >= 2 { len } else { 0 }
}

/// The longest IPv6 address at the start of `s` in the forms scanner.l
/// lists: eight groups of one to four hex digits, or fewer around one `::`,
/// the last two groups possibly written as `N.N.N.N`.
fn ipv6_len(s: &[u8]) -> usize {
    let fits = |groups: usize, compressed: bool| {
        if compressed { groups <= 7 } else { groups == 8 }
    };
    let mut best = 0;
    let mut at = 0;
    let mut groups = 0;
    let mut compressed = false;
    if s.starts_with(b"::") {
        compressed = true;
        at = 2;
        best = 2;
    }
    loop {
        // The last 32 bits as N.N.N.N, after a separator.
        if at > 0 && (if compressed { groups <= 5 } else { groups == 6 }) {
            let (parts, len) = dotted(&s[at..], 4);
            if parts == 4 {
                best = best.max(at + len);
            }
        }
        let run = hex_run(&s[at..]);
        if run == 0 {
            break;
        }
        groups += 1;
        if groups > 8 {
            break;
        }
        if fits(groups, compressed) {
            best = best.max(at + run.min(4));
        }
        if run > 4 {
            break;
        }
        at += run;
        if !compressed && s[at..].starts_with(b"::") {
            compressed = true;
            at += 2;
            if fits(groups, compressed) {
                best = best.max(at);
            }
        } else if s.get(at) == Some(&b':') && s.get(at + 1) != Some(&b':') {
            at += 1;
        } else {
            break;
        }
    }
    best
}

// ---------------------------------------------------------------------------
// The qualifiers a word gets: libpcap's grammar.

/// The qualifiers of an identifier: its protocol layer and address kind
/// (`None`: given none, as `host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Qual {
    layer: Option<Layer>,
    address: Option<Address>,
}

/// How a word is taken where it stands.
enum Use {
    /// The argument of a keyword that takes one of libpcap's own names.
    Table,
    /// An identifier with these qualifiers.
    Id(Qual),
}

/// The grammar's qualifier bookkeeping (`$<blk>0.q`): a head (`ether src
/// host`, `ip proto`) qualifies the identifier after it; `and`, `or`,
/// `not` and `(` pass on the qualifiers of the term before, so that in
/// `port 53 or http` the `http` is a port. `None` stands for the grammar's
/// `qerr`: after `tcp`, `vlan 100` or `ip[0] = 4` an identifier is an error.
#[derive(Default)]
struct Qualifiers {
    /// A protocol keyword that may start a head.
    layer: Option<Layer>,
    /// The head being read.
    head: Option<Qual>,
    /// The qualifiers of the last term (or identifier).
    last: Option<Qual>,
    /// The qualifiers an identifier gets after `and`, `or`, `not`, `(`.
    passed: Option<Qual>,
    /// What each open parenthesis passes on, and its term gets.
    parens: Vec<Option<Qual>>,
    /// `src or dst`: the `or` belongs to the head.
    in_dir: bool,
}

impl Qualifiers {
    /// How a word after `previous` is taken: `None` where libpcap takes no
    /// identifier.
    fn word(&mut self, previous: Token) -> Option<Use> {
        if previous == Token::Table {
            return Some(Use::Table);
        }
        let qual = match previous {
            Token::Dir | Token::Address(_) => self.head.take(),
            Token::And | Token::Or | Token::Not | Token::Open => self.passed,
            _ => None,
        };
        self.layer = None;
        self.last = qual;
        qual.map(Use::Id)
    }

    fn token(&mut self, token: Token, previous: Token) {
        match token {
            Token::Layer(layer) => {
                self.layer = Some(layer);
                self.head = None;
                self.last = None;
            }
            Token::Dir => {
                if !(self.in_dir && self.head.is_some()) {
                    self.head = Some(Qual {
                        layer: self.layer.take(),
                        address: None,
                    });
                }
                self.in_dir = false;
            }
            Token::Address(address) => {
                let layer = match (previous, self.head) {
                    (Token::Dir, Some(head)) => head.layer,
                    _ => self.layer.take(),
                };
                self.head = Some(Qual {
                    layer,
                    address: Some(address),
                });
            }
            Token::And | Token::Or if previous == Token::Dir => {
                // `src or dst host`, or `src and dst` closing a term.
                self.in_dir = true;
                self.passed = self.head.or(self.last);
            }
            Token::And | Token::Or => {
                self.passed = self.last;
                self.head = None;
                self.layer = None;
            }
            Token::Not => {
                if let Some(head) = self.head.take() {
                    self.passed = Some(head);
                }
            }
            Token::Open => {
                let passed = self.head.take().or(self.passed);
                self.parens.push(passed);
                self.passed = passed;
                self.layer = None;
            }
            Token::Close => {
                self.last = self.parens.pop().flatten();
                self.head = None;
                self.layer = None;
            }
            // An address after a head: the identifier and what continues it.
            Token::Value if matches!(previous, Token::Dir | Token::Address(_)) => {
                self.last = self.head.take();
                self.layer = None;
            }
            Token::Value
                if matches!(previous, Token::And | Token::Or | Token::Not | Token::Open) =>
            {
                self.last = self.passed;
                self.layer = None;
            }
            Token::Mask | Token::Slash => {}
            Token::Value if matches!(previous, Token::Mask | Token::Slash) => {}
            _ => {
                self.head = None;
                self.layer = None;
                self.last = None;
            }
        }
        if !matches!(token, Token::Dir | Token::And | Token::Or) {
            self.in_dir = false;
        }
    }
}

enum Judgement {
    Keep,
    Number(u8),
    Refuse(NameKind),
}

/// IP protocol names that are libpcap keywords, by number: what
/// `ip proto \tcp` means without /etc/protocols.
const IP_PROTOCOLS: [(&str, u8); 14] = [
    ("ip", 0),
    ("icmp", 1),
    ("igmp", 2),
    ("tcp", 6),
    ("igrp", 9),
    ("udp", 17),
    ("ip6", 41),
    ("esp", 50),
    ("ah", 51),
    ("icmp6", 58),
    ("pim", 103),
    ("vrrp", 112),
    ("carp", 112),
    ("sctp", 132),
];

/// libpcap's built-in protocol names for `ether proto` (its `eproto_db`
/// and `llc_db`), and for `iso proto`.
const LINK_PROTOCOLS: [&str; 25] = [
    "aarp",
    "pup",
    "xns",
    "ip",
    "ip6",
    "arp",
    "rarp",
    "sprite",
    "mopdl",
    "moprc",
    "decnet",
    "lat",
    "sca",
    "lanbridge",
    "vexp",
    "vprod",
    "atalk",
    "atalkarp",
    "loopback",
    "decdts",
    "decdns",
    "iso",
    "stp",
    "ipx",
    "netbeui",
];
const ISO_PROTOCOLS: [&str; 3] = ["esis", "isis", "clnp"];

/// What libpcap does with identifier `name` qualified by `qual`.
fn judge(name: &str, qual: Qual) -> Judgement {
    match (qual.address, qual.layer) {
        (Some(Address::Proto | Address::ProtoChain), None | Some(Layer::Ip | Layer::Ip6)) => {
            IP_PROTOCOLS
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map_or(Judgement::Refuse(NameKind::Protocol), |&(_, number)| {
                    Judgement::Number(number)
                })
        }
        (Some(Address::Proto | Address::ProtoChain), Some(Layer::Link)) => {
            if LINK_PROTOCOLS.contains(&name) {
                Judgement::Keep
            } else {
                Judgement::Refuse(NameKind::EtherProtocol)
            }
        }
        (Some(Address::Proto | Address::ProtoChain), Some(Layer::Iso)) => {
            if ISO_PROTOCOLS.contains(&name) {
                Judgement::Keep
            } else {
                Judgement::Refuse(NameKind::EtherProtocol)
            }
        }
        (Some(Address::Proto | Address::ProtoChain), Some(Layer::Other)) => {
            Judgement::Refuse(NameKind::Protocol)
        }
        (Some(Address::PortRange), _) => {
            // libpcap reads `%d-%d` before it looks names up.
            let numbers = name.split_once('-').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit())
            });
            if numbers {
                Judgement::Keep
            } else {
                Judgement::Refuse(NameKind::ServiceRange)
            }
        }
        (Some(Address::Port), _) => Judgement::Refuse(NameKind::Service),
        (Some(Address::Net), _) => Judgement::Refuse(NameKind::Network),
        (Some(Address::Gateway), _) => Judgement::Refuse(NameKind::Gateway),
        (Some(Address::Host) | None, Some(Layer::Link)) => {
            Judgement::Refuse(NameKind::EthernetHost)
        }
        (Some(Address::Host) | None, _) => Judgement::Refuse(NameKind::Host),
    }
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
        // Characters of more than one byte are libpcap's to refuse, where
        // they stand and after a word.
        for expression in ["tcp and é", "é", "port 80 ü", "ip proto \\tcp é"] {
            let err = compile(expression).err().unwrap();
            assert!(
                matches!(err, FilterError::Libpcap(_)),
                "{expression}: {err}"
            );
        }
    }

    #[test]
    fn words_are_cut_as_libpcaps_scanner_cuts_them() {
        // (input, token, length): the longest match, the earlier rule on a tie.
        for (input, token, len) in [
            ("host", Token::Address(Address::Host), 4),
            ("hosts", Token::Word, 5),
            ("tcp-syn", Token::Value, 7),
            ("tcp-foo", Token::Word, 7),
            ("1-1024", Token::Word, 6),
            ("1.2.3.4", Token::Value, 7),
            ("1.2.3.4.5", Token::Word, 9),
            ("10.0.0.0/8", Token::Value, 8),
            ("0x1f)", Token::Value, 4),
            ("fd00::1 ", Token::Value, 7),
            ("fd00::12345", Token::Value, 10),
            ("::ffff:10.0.0.1", Token::Value, 15),
            ("1:2:3:4:5:6:7:8", Token::Value, 15),
            ("00:11:22:33:44:55", Token::Value, 17),
            ("0011.2233.4455", Token::Value, 14),
            ("deadbeefcafe", Token::Value, 12),
            ("$1f", Token::Value, 3),
            ("\\tcp)", Token::Word, 4),
            ("example.com.", Token::Word, 12),
            ("&&", Token::And, 2),
            ("!=", Token::Other, 2),
            ("!", Token::Not, 1),
            ("é", Token::Other, 1),
        ] {
            let got = next_token(input.as_bytes(), 0).unwrap();
            assert_eq!((got.0, got.2), (token, len), "{input:?}");
        }
    }

    #[test]
    fn numbers_addresses_and_keywords_are_accepted() {
        // (expression, what libpcap compiles when it differs)
        for (expression, compiled) in [
            ("", None),
            ("tcp[tcpflags] & tcp-syn != 0", None),
            ("icmp[icmptype] == icmp-echo", None),
            ("ip proto \\tcp", Some("ip proto 6")),
            ("ip6 proto \\icmp6", Some("ip6 proto 58")),
            ("proto \\udp or \\tcp", Some("proto 17 or 6")),
            ("protochain \\TCP", Some("protochain 6")),
            ("ether proto \\ip", None),
            ("ether proto \\arp or \\rarp", None),
            ("port 53", None),
            ("port 0x35", None),
            ("host 10.0.0.1", None),
            ("host 10.0.0.1 or 10.0.0.2", None),
            ("net 10.0.0.0/8", None),
            ("net 10.0.0.0 mask 255.0.0.0", None),
            ("ip and not net 192.168.0.0/16", None),
            ("host fd00::1", None),
            ("host ::ffff:10.0.0.1", None),
            ("ip6 net fd00::/8", None),
            ("ether host 00:11:22:33:44:55", None),
            ("ether src 00-11-22-33-44-55", None),
            ("src or dst host 10.0.0.1", None),
            ("vlan 100", None),
            ("vlan and (tcp port 443)", None),
            ("portrange 1-1024", None),
            ("udp portrange 1000-2000 or 3000-4000", None),
            ("tcp port 80 and not icmp", None),
            ("(tcp or udp) and not port 22", None),
            ("greater 1000 and less 1500", None),
            ("ip[2:2] > 576", None),
            ("tcp[13] & 2 != 0", None),
            ("ether broadcast or ether multicast", None),
        ] {
            let got = without_names(expression).unwrap_or_else(|e| panic!("{expression:?}: {e}"));
            assert_eq!(got, compiled.unwrap_or(expression), "{expression:?}");
            compile(expression).unwrap_or_else(|e| panic!("{expression:?}: {e}"));
        }
    }

    #[test]
    fn names_are_refused_with_the_word() {
        use NameKind::*;
        for (expression, word, kind) in [
            ("host example.com", "example.com", Host),
            ("src host foo", "foo", Host),
            ("dst foo", "foo", Host),
            ("not host db", "db", Host),
            ("host (a or b)", "a", Host),
            ("host 10.0.0.1 or example.com", "example.com", Host),
            ("host 1.2.3.4.5", "1.2.3.4.5", Host),
            ("host 1e100", "1e100", Host),
            ("host \\10.0.0.1", "10.0.0.1", Host),
            ("ip6 host ip6-localhost", "ip6-localhost", Host),
            ("ether host foo", "foo", EthernetHost),
            ("ether src or dst foo", "foo", EthernetHost),
            ("net loopback", "loopback", Network),
            ("src or dst net corp", "corp", Network),
            ("net 10.0.0.0/8 or internal", "internal", Network),
            ("port http", "http", Service),
            ("udp port domain", "domain", Service),
            ("tcp port 80 or http", "http", Service),
            ("port 1-1024", "1-1024", Service),
            ("portrange ftp-data-http", "ftp-data-http", ServiceRange),
            ("portrange 1024-http", "1024-http", ServiceRange),
            ("ip proto \\ospf", "ospf", Protocol),
            ("proto \\gre", "gre", Protocol),
            ("protochain \\foo", "foo", Protocol),
            ("ether proto \\foo", "foo", EtherProtocol),
            ("gateway foo", "foo", Gateway),
            ("ip gateway router", "router", Gateway),
            ("tcp and foo", "foo", Word),
            ("HOST foo", "HOST", Word),
        ] {
            let err = without_names(expression).unwrap_err();
            assert_eq!(
                err,
                FilterError::Name {
                    word: word.into(),
                    kind
                },
                "{expression:?}"
            );
            assert!(
                err.to_string().starts_with(&format!("{word:?} ")),
                "{expression:?}: {err}"
            );
            assert_eq!(compile(expression).err(), Some(err), "{expression:?}");
        }
    }

    #[test]
    fn messages_say_what_to_write_instead() {
        let err = without_names("port http").unwrap_err().to_string();
        assert_eq!(
            err,
            "\"http\" is a service name, which libpcap would look up in /etc/services: use the port number"
        );
    }

    /// `host a or host b or ...`: libpcap's optimiser takes a while.
    fn slow_expression() -> String {
        (0..150)
            .map(|i| format!("host 10.{}.{}.1", i / 250, i % 250))
            .collect::<Vec<_>>()
            .join(" or ")
    }

    #[tokio::test]
    async fn compiles_off_the_async_threads_within_a_time_limit() {
        assert!(compile_async("tcp").await.is_ok());
        assert_eq!(
            compile_async("port http").await.err().unwrap(),
            FilterError::Name {
                word: "http".into(),
                kind: NameKind::Service
            }
        );
        let limit = Duration::from_millis(10);
        let err = compile_within(&slow_expression(), limit)
            .await
            .err()
            .unwrap();
        assert_eq!(err, FilterError::TimedOut(limit));
        assert_eq!(
            err.to_string(),
            "libpcap did not compile it within 10ms; simplify the expression"
        );
        assert!(compile_async(&slow_expression()).await.is_ok());

        // Other filters holding every slot: this one is not refused as
        // too slow, but told to come back.
        let taken = COMPILES
            .acquire_many(CONCURRENT_COMPILES as u32)
            .await
            .unwrap();
        let err = compile_within("tcp", limit).await.err().unwrap();
        assert_eq!(err, FilterError::Busy(limit));
        drop(taken);
        assert!(compile_within("tcp", COMPILE_TIMEOUT).await.is_ok());
    }
}
