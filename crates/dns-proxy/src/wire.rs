//! The DNS wire format. This is the only module that touches `hickory-proto`; everything it
//! hands out is our own plain data, so hickory's API churn stays here.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};

/// The largest DNS message the proxy accepts (the TCP length prefix's limit).
pub const MAX_MESSAGE_LEN: usize = 65_535;

/// Length of the fixed DNS header.
const HEADER_LEN: usize = 12;

/// At most this many CNAME hops are followed in one answer (resolvers give up around 8–16).
const MAX_CNAME_HOPS: usize = 16;

/// The EDNS payload size advertised in replies the proxy makes itself (the DNS flag day value).
const EDNS_PAYLOAD: u16 = 1232;

/// Response codes the proxy uses.
pub mod rcode {
    /// No error.
    pub const NOERROR: u16 = 0;
    /// Format error: the query could not be understood.
    pub const FORMERR: u16 = 1;
    /// Server failure: upstream unreachable or timed out, or learning failed.
    pub const SERVFAIL: u16 = 2;
    /// Name error (NXDOMAIN): the optional answer to a denied query.
    pub const NXDOMAIN: u16 = 3;
    /// Not implemented: an opcode other than QUERY.
    pub const NOTIMP: u16 = 4;
    /// Refused: the default answer to a denied query.
    pub const REFUSED: u16 = 5;

    /// A short name for a response code, as flows show it.
    pub fn name(code: u16) -> String {
        match code {
            NOERROR => "NOERROR".into(),
            FORMERR => "FORMERR".into(),
            SERVFAIL => "SERVFAIL".into(),
            NXDOMAIN => "NXDOMAIN".into(),
            NOTIMP => "NOTIMP".into(),
            REFUSED => "REFUSED".into(),
            other => format!("RCODE{other}"),
        }
    }
}

/// Record types and classes the proxy looks at.
pub mod rtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// Canonical name.
    pub const CNAME: u16 = 5;
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// The Internet class.
    pub const CLASS_IN: u16 = 1;
}

/// A DNS message reduced to what the proxy needs. Names are lower-cased and fully qualified
/// (trailing dot), as policy matching wants them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMessage {
    /// The message ID.
    pub id: u16,
    /// QR: whether this is a response.
    pub is_response: bool,
    /// The opcode (0 = QUERY).
    pub opcode: u8,
    /// The response code, including EDNS's extended bits.
    pub rcode: u16,
    /// TC: the answer was truncated.
    pub truncated: bool,
    /// Whether the message carries an EDNS OPT record.
    pub has_edns: bool,
    /// The question section.
    pub questions: Vec<Question>,
    /// The answer section (other sections are never learned from, so they are not kept).
    pub answers: Vec<AnswerRecord>,
}

/// One question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Question {
    /// The name, lower-cased, with the trailing dot.
    pub name: String,
    /// QTYPE.
    pub qtype: u16,
    /// QCLASS.
    pub qclass: u16,
}

/// One answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerRecord {
    /// The owner name, lower-cased, with the trailing dot.
    pub name: String,
    /// The record's class.
    pub class: u16,
    /// Time to live, seconds.
    pub ttl: u32,
    /// What the record says.
    pub data: AnswerData,
}

/// The part of a record's data the proxy uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// A CNAME target, lower-cased, with the trailing dot.
    Cname(String),
    /// Any other record type (by number).
    Other(u16),
}

/// Why bytes are not a DNS message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Longer than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes exceeds the 65535-byte limit")]
    TooLong(usize),
    /// Shorter than the 12-byte header.
    #[error("message of {0} bytes is shorter than a DNS header")]
    TooShort(usize),
    /// The header is there but the rest does not decode (truncated record, bad name,
    /// compression-pointer loop, bad counts, ...).
    #[error("malformed DNS message: {0}")]
    Malformed(String),
}

/// Parses one DNS message. **This is the proxy's parsing entry point**, the one the
/// `dns_message` fuzz target drives: every byte string yields `Ok` or `Err`, never a panic.
pub fn parse_message(bytes: &[u8]) -> Result<DnsMessage, ParseError> {
    decode(bytes).map(|(m, _)| m)
}

/// Parses and keeps hickory's message too (to build replies that echo the question).
pub(crate) fn decode(bytes: &[u8]) -> Result<(DnsMessage, Message), ParseError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(ParseError::TooLong(bytes.len()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(ParseError::TooShort(bytes.len()));
    }
    let msg = Message::from_vec(bytes).map_err(|e| ParseError::Malformed(e.to_string()))?;
    Ok((summarise(&msg), msg))
}

/// Reads a query of the common shape without hickory: one question whose name has only
/// letters, digits, `-` (not leading) and `_` in uncompressed labels, no answer or authority records, and
/// either no additional record or one empty EDNS OPT record, ending exactly at the end of
/// the bytes. Anything else is `None`, and the caller uses [`decode`]; where it is `Some`, it
/// equals [`parse_message`]'s result (a property test checks this). Saves a full message
/// decode per forwarded query.
pub(crate) fn quick_query(bytes: &[u8]) -> Option<DnsMessage> {
    let b = |i: usize| bytes.get(i).copied();
    let be16 = |i: usize| Some(u16::from_be_bytes([b(i)?, b(i + 1)?]));
    if bytes.len() > MAX_MESSAGE_LEN {
        return None;
    }
    let id = be16(0)?;
    let (flags_hi, flags_lo) = (b(2)?, b(3)?);
    // QR clear, opcode QUERY.
    if flags_hi & 0xf8 != 0 {
        return None;
    }
    let (qd, an, ns, ar) = (be16(4)?, be16(6)?, be16(8)?, be16(10)?);
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    let (name, mut at) = plain_name(bytes, HEADER_LEN, &mut Vec::new())?;
    let (qtype, qclass) = (be16(at)?, be16(at + 2)?);
    at += 4;
    let mut rcode = u16::from(flags_lo & 0x0f);
    let has_edns = ar == 1;
    if has_edns {
        // Root owner name, type OPT, payload size, extended rcode, version, flags, no options.
        if b(at)? != 0 || be16(at + 1)? != 41 || be16(at + 9)? != 0 {
            return None;
        }
        rcode |= u16::from(b(at + 5)?) << 4;
        at += 11;
    }
    if at != bytes.len() {
        return None;
    }
    Some(DnsMessage {
        id,
        is_response: false,
        opcode: 0,
        rcode,
        truncated: flags_hi & 0x02 != 0,
        has_edns,
        questions: vec![Question {
            name,
            qtype,
            qclass,
        }],
        answers: Vec::new(),
    })
}

/// Reads a name of plain labels (see [`quick_query`]) at `at`, ending in a root label or in
/// a compression pointer to the start of a name in `known` (offset, name); returns it
/// lower-cased with the trailing dot and the offset after it. `None` for anything else.
fn plain_name(
    bytes: &[u8],
    mut at: usize,
    known: &mut Vec<(usize, String)>,
) -> Option<(String, usize)> {
    let start = at;
    let mut name = String::with_capacity(64);
    // (offset, position in `name`) of each label read here: each starts a suffix a later
    // pointer may name.
    let mut starts: Vec<(usize, usize)> = Vec::new();
    loop {
        let len = usize::from(*bytes.get(at)?);
        if len != 0 && len <= 63 {
            starts.push((at, name.len()));
        }
        at += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 == 0xc0 {
            // A pointer: only to a name already read whole, so it always points backwards.
            let target = ((len & 0x3f) << 8) | usize::from(*bytes.get(at)?);
            at += 1;
            let (_, suffix) = known.iter().find(|(o, _)| *o == target)?;
            name.push_str(suffix);
            if name.len() > 254 {
                return None;
            }
            remember(known, &starts, &name);
            return Some((name, at));
        }
        // Extended label types: leave them to hickory.
        if len > 63 {
            return None;
        }
        let label = bytes.get(at..at + len)?;
        // hickory escapes some characters when it prints a name (a leading `-`, for one);
        // only labels it prints as they are take the quick way.
        let plain = |c: &u8| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_';
        if label.first().is_none_or(|c| *c == b'-') || !label.iter().all(plain) {
            return None;
        }
        name.extend(label.iter().map(|c| char::from(c.to_ascii_lowercase())));
        name.push('.');
        at += len;
        // The wire form of a name is at most 255 bytes.
        if at - start > 255 {
            return None;
        }
    }
    if name.is_empty() {
        return None;
    }
    remember(known, &starts, &name);
    Some((name, at))
}

/// Records the names starting at each label of `name` (see [`plain_name`]).
fn remember(known: &mut Vec<(usize, String)>, starts: &[(usize, usize)], name: &str) {
    for &(offset, pos) in starts {
        if known.iter().all(|(o, _)| *o != offset)
            && let Some(suffix) = name.get(pos..)
        {
            known.push((offset, suffix.to_owned()));
        }
    }
}

/// Reads an answer of the common shape without hickory: a QUERY response with one question
/// (as [`quick_query`] reads it), answer records of type A, AAAA or CNAME in class IN whose
/// names are plain labels or compression pointers to names read before, no authority
/// records, and either no additional record or one empty EDNS OPT record, ending exactly at
/// the end of the bytes. Anything else is `None` (use [`parse_message`]); where it is `Some`
/// it equals [`parse_message`]'s result (a property test checks this). Saves a full decode
/// per answer.
pub(crate) fn quick_answer(bytes: &[u8]) -> Option<DnsMessage> {
    let b = |i: usize| bytes.get(i).copied();
    let be16 = |i: usize| Some(u16::from_be_bytes([b(i)?, b(i + 1)?]));
    let be32 = |i: usize| Some(u32::from_be_bytes([b(i)?, b(i + 1)?, b(i + 2)?, b(i + 3)?]));
    if bytes.len() > MAX_MESSAGE_LEN {
        return None;
    }
    let id = be16(0)?;
    let (flags_hi, flags_lo) = (b(2)?, b(3)?);
    // QR set, opcode QUERY.
    if flags_hi & 0xf8 != 0x80 {
        return None;
    }
    let (qd, an, ns, ar) = (be16(4)?, be16(6)?, be16(8)?, be16(10)?);
    if qd != 1 || ns != 0 || ar > 1 || an > 64 {
        return None;
    }
    let mut known: Vec<(usize, String)> = Vec::with_capacity(4);
    let (qname, mut at) = plain_name(bytes, HEADER_LEN, &mut known)?;
    let (qtype, qclass) = (be16(at)?, be16(at + 2)?);
    at += 4;
    let mut answers = Vec::with_capacity(usize::from(an));
    for _ in 0..an {
        let (name, next) = plain_name(bytes, at, &mut known)?;
        at = next;
        let (ty, class, ttl, rdlen) = (be16(at)?, be16(at + 2)?, be32(at + 4)?, be16(at + 8)?);
        at += 10;
        let end = at + usize::from(rdlen);
        let rdata = bytes.get(at..end)?;
        if class != rtype::CLASS_IN {
            return None;
        }
        let data = match (ty, rdata.len()) {
            (rtype::A, 4) => AnswerData::A(Ipv4Addr::new(
                *rdata.first()?,
                *rdata.get(1)?,
                *rdata.get(2)?,
                *rdata.get(3)?,
            )),
            (rtype::AAAA, 16) => {
                AnswerData::Aaaa(Ipv6Addr::from(<[u8; 16]>::try_from(rdata).ok()?))
            }
            (rtype::CNAME, _) => {
                let (target, after) = plain_name(bytes, at, &mut known)?;
                if after != end {
                    return None;
                }
                AnswerData::Cname(target)
            }
            _ => return None,
        };
        at = end;
        answers.push(AnswerRecord {
            name,
            class,
            ttl,
            data,
        });
    }
    let mut rcode = u16::from(flags_lo & 0x0f);
    let has_edns = ar == 1;
    if has_edns {
        if b(at)? != 0 || be16(at + 1)? != 41 || be16(at + 9)? != 0 {
            return None;
        }
        rcode |= u16::from(b(at + 5)?) << 4;
        at += 11;
    }
    if at != bytes.len() {
        return None;
    }
    Some(DnsMessage {
        id,
        is_response: true,
        opcode: 0,
        rcode,
        truncated: flags_hi & 0x02 != 0,
        has_edns,
        questions: vec![Question {
            name: qname,
            qtype,
            qclass,
        }],
        answers,
    })
}

/// The quick readers the proxy tries before the full decode (a query's shape, then an
/// answer's). Where this is `Some` it must equal [`parse_message`]'s result: the
/// `dns_message` fuzz target and property tests check that.
pub fn parse_quick(bytes: &[u8]) -> Option<DnsMessage> {
    quick_query(bytes).or_else(|| quick_answer(bytes))
}

/// Parses an answer from upstream: [`quick_answer`], else the full decode.
pub(crate) fn parse_answer(bytes: &[u8]) -> Result<DnsMessage, ParseError> {
    match quick_answer(bytes) {
        Some(m) => Ok(m),
        None => parse_message(bytes),
    }
}

fn name_string(name: &hickory_proto::rr::Name) -> String {
    let mut s = name.to_ascii();
    s.make_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

fn summarise(msg: &Message) -> DnsMessage {
    let md = &msg.metadata;
    DnsMessage {
        id: md.id,
        is_response: md.message_type == MessageType::Response,
        opcode: u8::from(md.op_code),
        rcode: u16::from(md.response_code),
        truncated: md.truncation,
        has_edns: msg.edns.is_some(),
        questions: msg
            .queries
            .iter()
            .map(|q| Question {
                name: name_string(q.name()),
                qtype: u16::from(q.query_type()),
                qclass: u16::from(q.query_class()),
            })
            .collect(),
        answers: msg
            .answers
            .iter()
            .map(|r| AnswerRecord {
                name: name_string(&r.name),
                class: u16::from(r.dns_class),
                ttl: r.ttl,
                data: match &r.data {
                    RData::A(a) => AnswerData::A(a.0),
                    RData::AAAA(a) => AnswerData::Aaaa(a.0),
                    RData::CNAME(c) => AnswerData::Cname(name_string(&c.0)),
                    other => AnswerData::Other(u16::from(other.record_type())),
                },
            })
            .collect(),
    }
}

/// The ID of a message that has at least a header.
pub(crate) fn header_id(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
}

/// Whether a message with at least a header has QR set.
pub(crate) fn header_is_response(bytes: &[u8]) -> bool {
    bytes.get(2).is_some_and(|b| b & 0x80 != 0)
}

/// A header-only reply (no question) for a query that does not parse: ID, opcode and RD
/// copied, QR set. `None` if there is no header to answer.
pub(crate) fn header_only_reply(query: &[u8], code: u16) -> Option<Vec<u8>> {
    if query.len() < HEADER_LEN {
        return None;
    }
    let id = header_id(query)?;
    let flags = query.get(2).copied().unwrap_or(0);
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&id.to_be_bytes());
    // QR, the query's opcode and RD; AA, TC cleared.
    out.push(0x80 | (flags & 0x78) | (flags & 0x01));
    // RA set, Z/AD/CD cleared, the (4-bit) code.
    out.push(0x80 | (code & 0x0f) as u8);
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// A reply the proxy makes itself for a query that parsed: the query's ID, opcode, RD and
/// question echoed, the given code, an OPT record if the query had one. `query` is the
/// decoded query, or `None` to decode `raw_query` here (after [`quick_query`]).
pub(crate) fn reply(query: Option<&Message>, raw_query: &[u8], code: u16) -> Option<Vec<u8>> {
    let decoded;
    let query = match query {
        Some(q) => q,
        None => match Message::from_vec(raw_query) {
            Ok(m) => {
                decoded = m;
                &decoded
            }
            Err(_) => return header_only_reply(raw_query, code),
        },
    };
    let md = &query.metadata;
    let mut m = Message::response(md.id, md.op_code);
    m.metadata.recursion_desired = md.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = <ResponseCode as From<u16>>::from(code);
    m.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        m.edns = Some(e);
    }
    match m.to_vec() {
        Ok(v) => Some(v),
        // A question hickory cannot re-encode: fall back to the bare header.
        Err(_) => header_only_reply(raw_query, code),
    }
}

/// Builds a query (tests, benchmarks and tools; the proxy itself forwards clients' bytes).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Option<Vec<u8>> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let name = hickory_proto::rr::Name::from_ascii(name).ok()?;
    let mut q = hickory_proto::op::Query::query(name, RecordType::from(qtype));
    q.set_query_class(DNSClass::IN);
    m.queries.push(q);
    m.to_vec().ok()
}

/// Why an upstream message is not the answer to the query the proxy forwarded.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mismatch {
    NotAResponse,
    Id,
    Question,
}

/// Checks that `answer` answers `query`: same ID, QR set, exactly the same single question
/// (names compared case-insensitively, since resolvers may randomise case).
#[cfg(test)]
pub(crate) fn check_answer(query: &DnsMessage, answer: &DnsMessage) -> Result<(), Mismatch> {
    if !answer.is_response {
        return Err(Mismatch::NotAResponse);
    }
    if answer.id != query.id {
        return Err(Mismatch::Id);
    }
    if answer.questions.len() != 1 || answer.questions.first() != query.questions.first() {
        return Err(Mismatch::Question);
    }
    Ok(())
}

/// What an answer says about the query name: the CNAME chain and the addresses at its end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// The query name followed by each CNAME target, in chain order.
    pub names: Vec<String>,
    /// Addresses owned by a name of the chain, each with the smallest TTL along the way
    /// (the address record's and the CNAMEs' that lead to it). No duplicates.
    pub ips: Vec<(IpAddr, u32)>,
}

/// Follows the CNAME chain from `qname` through `answers` and collects the A/AAAA records of
/// its names. Records of other names (unsolicited "extra" data) and of classes other than IN
/// are ignored, so an answer cannot teach anything about a name that was not asked for.
pub fn resolve_chain(qname: &str, answers: &[AnswerRecord]) -> Resolution {
    let qname = qname.to_ascii_lowercase();
    // (name, smallest CNAME TTL on the way to it)
    let mut chain: Vec<(String, u32)> = vec![(qname, u32::MAX)];
    for _ in 0..MAX_CNAME_HOPS {
        let Some((last, ttl)) = chain.last().cloned() else {
            break;
        };
        let next = answers.iter().find_map(|r| match &r.data {
            AnswerData::Cname(target) if r.class == rtype::CLASS_IN && r.name == last => {
                Some((target.clone(), ttl.min(r.ttl)))
            }
            _ => None,
        });
        match next {
            Some((target, t)) if !chain.iter().any(|(n, _)| *n == target) => {
                chain.push((target, t))
            }
            _ => break,
        }
    }
    let mut seen = HashSet::new();
    let mut ips = Vec::new();
    for r in answers {
        if r.class != rtype::CLASS_IN {
            continue;
        }
        let ip = match r.data {
            AnswerData::A(a) => IpAddr::V4(a),
            AnswerData::Aaaa(a) => IpAddr::V6(a),
            _ => continue,
        };
        let Some((_, chain_ttl)) = chain.iter().find(|(n, _)| *n == r.name) else {
            continue;
        };
        if seen.insert(ip) {
            ips.push((ip, r.ttl.min(*chain_ttl)));
        }
    }
    Resolution {
        names: chain.into_iter().map(|(n, _)| n).collect(),
        ips,
    }
}

/// The names of query types, as flows show them (`A`, `AAAA`, `TYPE65`...).
pub(crate) fn qtype_name(qtype: u16) -> String {
    RecordType::from(qtype).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, ttl: u32, data: AnswerData) -> AnswerRecord {
        AnswerRecord {
            name: name.into(),
            class: rtype::CLASS_IN,
            ttl,
            data,
        }
    }

    #[test]
    fn query_round_trip() {
        let q = build_query(0x1234, "API.Stripe.com.", rtype::A).unwrap_or_default();
        let m = parse_message(&q);
        assert!(m.is_ok(), "{m:?}");
        let m = m.unwrap_or_else(|_| unreachable!());
        assert_eq!(m.id, 0x1234);
        assert!(!m.is_response);
        assert_eq!(
            m.questions,
            vec![Question {
                name: "api.stripe.com.".into(),
                qtype: rtype::A,
                qclass: rtype::CLASS_IN
            }]
        );
    }

    #[test]
    fn short_long_and_garbage() {
        assert_eq!(parse_message(&[1, 2, 3]), Err(ParseError::TooShort(3)));
        assert!(matches!(
            parse_message(&vec![0; MAX_MESSAGE_LEN + 1]),
            Err(ParseError::TooLong(_))
        ));
        // A header announcing one question, with nothing after it.
        let truncated = [0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            parse_message(&truncated),
            Err(ParseError::Malformed(_))
        ));
    }

    #[test]
    fn compression_pointer_loop_is_an_error() {
        // Header with one question whose name is a pointer to itself (offset 12).
        let mut m = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(parse_message(&m), Err(ParseError::Malformed(_))));
        // Two pointers pointing at each other.
        let mut m = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(parse_message(&m), Err(ParseError::Malformed(_))));
    }

    #[test]
    fn header_only_reply_copies_id_and_rd() {
        let q = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let r = header_only_reply(&q, rcode::FORMERR).unwrap_or_default();
        assert_eq!(r.len(), 12);
        assert_eq!(&r[..2], &[0xab, 0xcd]);
        assert_eq!(r[2], 0x81);
        assert_eq!(r[3] & 0x0f, 1);
        assert_eq!(header_only_reply(&q[..5], rcode::FORMERR), None);
    }

    #[test]
    fn reply_echoes_question() {
        let q = build_query(77, "evil-site.com.", rtype::AAAA).unwrap_or_default();
        let (_, msg) = decode(&q).unwrap_or_else(|e| panic!("{e}"));
        let r = reply(Some(&msg), &q, rcode::REFUSED).unwrap_or_default();
        let m = parse_message(&r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.id, 77);
        assert!(m.is_response);
        assert_eq!(m.rcode, rcode::REFUSED);
        assert_eq!(m.questions.len(), 1);
        assert_eq!(m.questions[0].name, "evil-site.com.");
    }

    #[test]
    fn chain_follows_cnames_and_ignores_others() {
        let answers = vec![
            rec(
                "www.example.com.",
                300,
                AnswerData::Cname("edge.cdn.net.".into()),
            ),
            rec("edge.cdn.net.", 60, AnswerData::Cname("e1.cdn.net.".into())),
            rec(
                "e1.cdn.net.",
                120,
                AnswerData::A(Ipv4Addr::new(192, 0, 2, 1)),
            ),
            rec(
                "e1.cdn.net.",
                30,
                AnswerData::A(Ipv4Addr::new(192, 0, 2, 2)),
            ),
            // Not on the chain: ignored.
            rec("evil.com.", 999, AnswerData::A(Ipv4Addr::new(6, 6, 6, 6))),
            AnswerRecord {
                name: "e1.cdn.net.".into(),
                class: 3,
                ttl: 10,
                data: AnswerData::A(Ipv4Addr::new(7, 7, 7, 7)),
            },
        ];
        let r = resolve_chain("www.example.com.", &answers);
        assert_eq!(
            r.names,
            vec!["www.example.com.", "edge.cdn.net.", "e1.cdn.net."]
        );
        assert_eq!(
            r.ips,
            vec![
                (IpAddr::from([192, 0, 2, 1]), 60),
                (IpAddr::from([192, 0, 2, 2]), 30)
            ]
        );
    }

    #[test]
    fn cname_loop_terminates() {
        let answers = vec![
            rec("a.", 5, AnswerData::Cname("b.".into())),
            rec("b.", 5, AnswerData::Cname("a.".into())),
            rec("b.", 5, AnswerData::A(Ipv4Addr::LOCALHOST)),
        ];
        let r = resolve_chain("a.", &answers);
        assert_eq!(r.names, vec!["a.", "b."]);
        assert_eq!(r.ips.len(), 1);
    }

    #[test]
    fn answer_must_match_question() {
        let q = DnsMessage {
            id: 1,
            is_response: false,
            opcode: 0,
            rcode: 0,
            truncated: false,
            has_edns: false,
            questions: vec![Question {
                name: "a.".into(),
                qtype: 1,
                qclass: 1,
            }],
            answers: vec![],
        };
        let mut a = q.clone();
        assert_eq!(check_answer(&q, &a), Err(Mismatch::NotAResponse));
        a.is_response = true;
        assert_eq!(check_answer(&q, &a), Ok(()));
        a.id = 2;
        assert_eq!(check_answer(&q, &a), Err(Mismatch::Id));
        a.id = 1;
        a.questions.push(a.questions[0].clone());
        assert_eq!(check_answer(&q, &a), Err(Mismatch::Question));
        a.questions.truncate(1);
        a.questions[0].qtype = 28;
        assert_eq!(check_answer(&q, &a), Err(Mismatch::Question));
    }

    #[test]
    fn quick_query_reads_common_queries_and_leaves_the_rest() {
        let q = build_query(0x55aa, "API.Stripe.com.", rtype::AAAA).unwrap_or_default();
        assert_eq!(quick_query(&q), parse_message(&q).ok());
        assert!(quick_query(&q).is_some());
        // Trailing bytes, a second question, a response, an escaped label: hickory decides.
        let mut t = q.clone();
        t.push(0);
        assert_eq!(quick_query(&t), None);
        let mut r = q.clone();
        r[2] |= 0x80;
        assert_eq!(quick_query(&r), None);
        let odd = build_query(1, "a\\.b.com.", rtype::A).unwrap_or_default();
        assert_eq!(quick_query(&odd), None);
        // An empty OPT record is read; one with options is not.
        let mut e = q.clone();
        e[11] = 1;
        e.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0x80, 0, 0, 0]);
        let quick = quick_query(&e);
        assert!(quick.as_ref().is_some_and(|m| m.has_edns));
        assert_eq!(quick, parse_message(&e).ok());
        let mut o = e.clone();
        let n = o.len();
        o[n - 1] = 4;
        o.extend_from_slice(&[0, 10, 0, 0]);
        assert_eq!(quick_query(&o), None);
    }

    /// An answer as a server would encode it (hickory compresses names).
    fn encoded_answer(qname: &str, chain: &[&str], ips: &[IpAddr], edns: bool) -> Vec<u8> {
        use hickory_proto::rr::rdata::{A, AAAA, CNAME};
        use hickory_proto::rr::{Name, Record};
        let name = |n: &str| Name::from_ascii(n).unwrap_or_else(|_| Name::root());
        let mut m = Message::response(0x4242, OpCode::Query);
        let mut q = hickory_proto::op::Query::query(name(qname), RecordType::A);
        q.set_query_class(DNSClass::IN);
        m.queries.push(q);
        let mut owner = qname;
        for next in chain {
            m.answers.push(Record::from_rdata(
                name(owner),
                60,
                RData::CNAME(CNAME(name(next))),
            ));
            owner = next;
        }
        for ip in ips {
            let data = match ip {
                IpAddr::V4(a) => RData::A(A(*a)),
                IpAddr::V6(a) => RData::AAAA(AAAA(*a)),
            };
            m.answers.push(Record::from_rdata(name(owner), 300, data));
        }
        if edns {
            m.edns = Some(Edns::new());
        }
        m.to_vec().unwrap_or_default()
    }

    #[test]
    fn quick_answer_reads_compressed_answers_and_leaves_the_rest() {
        let ips = [
            IpAddr::from([203, 0, 113, 10]),
            IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]),
        ];
        for edns in [false, true] {
            let a = encoded_answer(
                "www.Example.com.",
                &["edge.cdn.net.", "e1.cdn.net."],
                &ips,
                edns,
            );
            let quick = quick_answer(&a);
            assert!(quick.is_some(), "{a:?}");
            assert_eq!(quick, parse_message(&a).ok());
            assert_eq!(quick.map(|m| m.answers.len()), Some(4));
        }
        let a = encoded_answer("api.stripe.com.", &[], &ips[..1], false);
        assert_eq!(quick_answer(&a), parse_message(&a).ok());
        // A query is not an answer; trailing bytes: hickory decides.
        let q = build_query(1, "api.stripe.com.", rtype::A).unwrap_or_default();
        assert_eq!(quick_answer(&q), None);
        let mut t = a.clone();
        t.push(0);
        assert_eq!(quick_answer(&t), None);
    }

    proptest::proptest! {
        /// Wherever the quick reader answers, it agrees with hickory.
        #[test]
        fn quick_query_agrees_with_hickory(
            labels in proptest::collection::vec("[a-zA-Z0-9_-]{1,20}", 1..5),
            qtype in proptest::num::u16::ANY,
            qclass in proptest::num::u16::ANY,
            flags in proptest::num::u16::ANY,
            opt in proptest::option::of((proptest::num::u16::ANY, proptest::num::u32::ANY)),
            cut in 0usize..80,
            pos in 0usize..80,
            val in proptest::num::u8::ANY,
        ) {
            let mut m = vec![0x12, 0x34];
            m.extend_from_slice(&flags.to_be_bytes());
            m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(opt.is_some())]);
            for l in &labels {
                m.push(l.len() as u8);
                m.extend_from_slice(l.as_bytes());
            }
            m.push(0);
            m.extend_from_slice(&qtype.to_be_bytes());
            m.extend_from_slice(&qclass.to_be_bytes());
            if let Some((payload, ttl)) = opt {
                m.extend_from_slice(&[0, 0, 41]);
                m.extend_from_slice(&payload.to_be_bytes());
                m.extend_from_slice(&ttl.to_be_bytes());
                m.extend_from_slice(&[0, 0]);
            }
            for bytes in [m.clone(), m.get(..cut).unwrap_or(&m).to_vec(), {
                let mut x = m.clone();
                if let Some(b) = x.get_mut(pos) { *b = val; }
                x
            }] {
                if let Some(quick) = quick_query(&bytes) {
                    proptest::prop_assert_eq!(Some(quick), parse_message(&bytes).ok());
                }
            }
        }

        /// Wherever the quick answer reader answers, it agrees with hickory, also on
        /// truncated and corrupted answers.
        #[test]
        fn quick_answer_agrees_with_hickory(
            labels in proptest::collection::vec("[a-zA-Z0-9_-]{1,12}", 1..4),
            chain in proptest::collection::vec("[a-z0-9]{1,8}\\.[a-z]{2,4}\\.", 0..3),
            v4 in proptest::collection::vec(proptest::num::u32::ANY, 0..3),
            edns in proptest::bool::ANY,
            cut in 0usize..200,
            pos in 0usize..200,
            val in proptest::num::u8::ANY,
        ) {
            let qname = format!("{}.", labels.join("."));
            let chain: Vec<&str> = chain.iter().map(String::as_str).collect();
            let ips: Vec<IpAddr> = v4.iter().map(|v| IpAddr::from(v.to_be_bytes())).collect();
            let m = encoded_answer(&qname, &chain, &ips, edns);
            if labels.iter().all(|l| !l.starts_with('-')) {
                proptest::prop_assert!(quick_answer(&m).is_some(), "{:?}", m);
            }
            for bytes in [m.clone(), m.get(..cut).unwrap_or(&m).to_vec(), {
                let mut x = m.clone();
                if let Some(b) = x.get_mut(pos) { *b = val; }
                x
            }] {
                if let Some(quick) = quick_answer(&bytes) {
                    proptest::prop_assert_eq!(Some(quick), parse_message(&bytes).ok());
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_message(&bytes);
            let _ = header_only_reply(&bytes, rcode::FORMERR);
            if let Some(quick) = quick_query(&bytes) {
                proptest::prop_assert_eq!(Some(quick), parse_message(&bytes).ok());
            }
            if let Some(quick) = quick_answer(&bytes) {
                proptest::prop_assert_eq!(Some(quick), parse_message(&bytes).ok());
            }
        }

        #[test]
        fn mutated_queries_never_panic(pos in 0usize..40, val in proptest::num::u8::ANY) {
            let mut q = build_query(9, "a.b.example.com.", rtype::A).unwrap_or_default();
            if let Some(b) = q.get_mut(pos) { *b = val; }
            if let Ok((m, msg)) = decode(&q) {
                let _ = reply(Some(&msg), &q, rcode::REFUSED);
                let _ = reply(None, &q, rcode::REFUSED);
                let _ = resolve_chain(m.questions.first().map(|q| q.name.as_str()).unwrap_or("."), &m.answers);
            }
        }
    }
}
