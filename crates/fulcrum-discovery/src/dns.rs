//! The `dns` provider: A/AAAA records with a fixed port, or SRV records, re-resolved every
//! `interval` (5 s).
//!
//! - **A/AAAA** (`record = "a"`, the default): every address of `name`, at `port`. Without
//!   `server`, the system resolver answers (`getaddrinfo`: `/etc/hosts`, search domains, and
//!   `/etc/resolv.conf`), so `localhost` works as expected.
//! - **SRV** (`record = "srv"`, `name = "_http._tcp.vllm.example"`): the targets of the
//!   records with the lowest priority value (the others are backups, as RFC 2782 says), each
//!   at its record's port, with the record's weight as the endpoint's weight (0 counts as 1).
//!   A target's addresses come from the answer's additional section, else from A/AAAA
//!   look-ups. SRV needs a DNS query the system resolver does not offer, so Fulcrum sends it
//!   itself (UDP, then TCP when the answer is truncated) to `server`, or else to the
//!   `nameserver`s of `/etc/resolv.conf` in turn. The name is taken as absolute: search
//!   domains are not applied (in Kubernetes, write `_http._tcp.vllm.ns.svc.cluster.local`).
//!
//! An endpoint's id is its address. A name that does not exist, an empty answer, a timeout
//! (`timeout`, 2 s, per server) or a server failure leaves the pool with its last set and shows
//! in the status board: DNS hiccups must not empty a pool.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use fulcrum_config::discovery::{DnsDiscovery, DnsRecord};
use fulcrum_core::EndpointSpec;
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::publish::Publisher;

/// Why a resolution failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The name cannot be sent in a query.
    #[error("{name:?} is not a DNS name: {message}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        message: String,
    },
    /// The name does not exist (NXDOMAIN).
    #[error("{name} does not exist (NXDOMAIN from {server})")]
    NoSuchName {
        /// The name.
        name: String,
        /// Who said so.
        server: SocketAddr,
    },
    /// The name exists but has no records of the type asked for.
    #[error("{name} has no {record} records")]
    Empty {
        /// The name.
        name: String,
        /// The record type.
        record: &'static str,
    },
    /// A server answered with an error code.
    #[error("{server} answered {code} for {name}")]
    ServerFailed {
        /// The name.
        name: String,
        /// The server.
        server: SocketAddr,
        /// The response code.
        code: String,
    },
    /// A server did not answer in time.
    #[error("no answer from {server} for {name} within {timeout:?}")]
    Timeout {
        /// The name.
        name: String,
        /// The server.
        server: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// Talking to a server failed.
    #[error("asking {server} about {name}: {message}")]
    Exchange {
        /// The name.
        name: String,
        /// The server.
        server: SocketAddr,
        /// Why.
        message: String,
    },
    /// The system resolver failed.
    #[error("resolving {name}: {message}")]
    System {
        /// The name.
        name: String,
        /// Why.
        message: String,
    },
}

/// Resolves once.
pub async fn resolve(config: &DnsDiscovery) -> Result<Vec<EndpointSpec>, DnsError> {
    let servers = match config.server {
        Some(s) => vec![s],
        None => system_nameservers().await,
    };
    let mut set = match config.record {
        DnsRecord::Address { port } => {
            let ips = match config.server {
                Some(_) => addresses(&servers, &config.name, config.timeout).await?,
                None => system_lookup(&config.name, config.timeout).await?,
            };
            ips.into_iter().map(|ip| EndpointSpec::new(SocketAddr::new(ip, port))).collect()
        }
        DnsRecord::Srv => srv(&servers, config).await?,
    };
    // One endpoint per address, the first seen.
    let mut seen = std::collections::HashSet::new();
    set.retain(|e| seen.insert(e.address));
    if set.is_empty() {
        let record = if config.record == DnsRecord::Srv { "SRV" } else { "A or AAAA" };
        return Err(DnsError::Empty { name: config.name.clone(), record });
    }
    Ok(set)
}

/// Runs until aborted.
pub(crate) async fn run(config: DnsDiscovery, mut out: Publisher) {
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match resolve(&config).await {
            Ok(set) => {
                out.publish(set, Vec::new());
            }
            Err(e) => out.fail(&e),
        }
    }
}

/// The `nameserver` lines of `/etc/resolv.conf`, port 53; `127.0.0.1:53` if there are none
/// (as the C library does).
async fn system_nameservers() -> Vec<SocketAddr> {
    let text = tokio::fs::read_to_string("/etc/resolv.conf").await.unwrap_or_default();
    let mut servers = parse_resolv_conf(&text);
    if servers.is_empty() {
        servers.push(SocketAddr::from((Ipv4Addr::LOCALHOST, 53)));
    }
    servers
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        .filter_map(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

async fn system_lookup(name: &str, timeout: Duration) -> Result<Vec<IpAddr>, DnsError> {
    let fail = |message: String| DnsError::System { name: name.to_owned(), message };
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addrs)) => Ok(addrs.map(|a| a.ip()).collect()),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(format!("no answer within {timeout:?}"))),
    }
}

fn dns_name(name: &str) -> Result<Name, DnsError> {
    let mut n =
        Name::from_ascii(name).map_err(|e| DnsError::BadName { name: name.to_owned(), message: e.to_string() })?;
    n.set_fqdn(true);
    Ok(n)
}

/// A and AAAA records of `name` from `servers`.
async fn addresses(servers: &[SocketAddr], name: &str, timeout: Duration) -> Result<Vec<IpAddr>, DnsError> {
    let qname = dns_name(name)?;
    let mut ips = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        let reply = query(servers, &qname, rtype, timeout).await?;
        ips.extend(reply.answers.iter().filter_map(|r| ip_of(&r.data)));
    }
    Ok(ips)
}

fn ip_of(data: &RData) -> Option<IpAddr> {
    match data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

async fn srv(servers: &[SocketAddr], config: &DnsDiscovery) -> Result<Vec<EndpointSpec>, DnsError> {
    let reply = query(servers, &dns_name(&config.name)?, RecordType::SRV, config.timeout).await?;
    let records: Vec<_> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let Some(best) = records.iter().map(|s| s.priority).min() else {
        return Err(DnsError::Empty { name: config.name.clone(), record: "SRV" });
    };
    let mut set = Vec::new();
    // A target of "." means "no service here" (RFC 2782).
    for record in records.iter().filter(|s| s.priority == best && !s.target.is_root()) {
        let mut ips: Vec<IpAddr> =
            reply.additionals.iter().filter(|r| r.name == record.target).filter_map(|r| ip_of(&r.data)).collect();
        if ips.is_empty() {
            let target = record.target.to_ascii();
            let target = target.trim_end_matches('.');
            ips = match config.server {
                Some(_) => addresses(servers, target, config.timeout).await?,
                None => system_lookup(target, config.timeout).await?,
            };
        }
        let weight = NonZeroU32::new(u32::from(record.weight)).unwrap_or(NonZeroU32::MIN);
        set.extend(ips.into_iter().map(|ip| EndpointSpec::new(SocketAddr::new(ip, record.port)).with_weight(weight)));
    }
    Ok(set)
}

/// Asks each server in turn until one answers; NXDOMAIN is an answer.
async fn query(servers: &[SocketAddr], name: &Name, rtype: RecordType, timeout: Duration) -> Result<Message, DnsError> {
    let shown = name.to_ascii();
    let mut last = None;
    for &server in servers {
        let outcome = match tokio::time::timeout(timeout, exchange(server, name, rtype)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(message)) => {
                last = Some(DnsError::Exchange { name: shown.clone(), server, message });
                continue;
            }
            Err(_) => {
                last = Some(DnsError::Timeout { name: shown.clone(), server, timeout });
                continue;
            }
        };
        match outcome.metadata.response_code {
            ResponseCode::NoError => return Ok(outcome),
            ResponseCode::NXDomain => return Err(DnsError::NoSuchName { name: shown, server }),
            code => last = Some(DnsError::ServerFailed { name: shown.clone(), server, code: code.to_string() }),
        }
    }
    Err(last.unwrap_or(DnsError::System { name: shown, message: "no name server to ask".into() }))
}

/// One query over UDP, again over TCP if the answer was truncated.
async fn exchange(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Message, String> {
    let mut message = Message::query();
    message.add_query(Query::query(name.clone(), rtype));
    message.metadata.recursion_desired = true;
    let id = message.metadata.id;
    let bytes = message.to_vec().map_err(|e| e.to_string())?;
    let local = if server.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        "[::]:0".parse().map_err(|_| "bad address")?
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    socket.send(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        // Anything that is not the answer to this query is ignored (the caller's timeout
        // bounds the wait).
        let Ok(reply) = Message::from_vec(&buf[..n]) else { continue };
        if reply.metadata.id != id || reply.metadata.message_type != MessageType::Response {
            continue;
        }
        if reply.metadata.truncation {
            return exchange_tcp(server, &bytes, id).await;
        }
        return Ok(reply);
    }
}

async fn exchange_tcp(server: SocketAddr, query: &[u8], id: u16) -> Result<Message, String> {
    let mut stream = TcpStream::connect(server).await.map_err(|e| format!("tcp: {e}"))?;
    let len = u16::try_from(query.len()).map_err(|_| "query too long")?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(|e| format!("tcp: {e}"))?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(|e| format!("tcp: {e}"))?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.map_err(|e| format!("tcp: {e}"))?;
    let reply = Message::from_vec(&buf).map_err(|e| format!("tcp: malformed answer: {e}"))?;
    if reply.metadata.id != id {
        return Err("tcp: the answer is for another query".into());
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# c\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n";
        let servers = parse_resolv_conf(text);
        assert_eq!(servers, ["10.0.0.2:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]);
        assert!(parse_resolv_conf("").is_empty());
    }

    #[test]
    fn names_are_checked() {
        assert!(dns_name("_http._tcp.example.com").unwrap().is_fqdn());
        assert!(dns_name(&"a".repeat(300)).is_err());
    }
}
