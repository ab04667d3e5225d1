//! The `dns` provider: SRV records from a fake DNS server on loopback (UDP, and TCP for a
//! truncated answer), A/AAAA records of `localhost` from the system resolver.

use crate::support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fulcrum_config::discovery::{DiscoveryConfig, DnsDiscovery, DnsRecord};
use fulcrum_discovery::{Discovery, StatusBoard, dns};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::SRV;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the fake server knows.
#[derive(Debug, Default)]
struct Zone {
    srv: HashMap<Name, Vec<SRV>>,
    a: HashMap<Name, Vec<Ipv4Addr>>,
    /// Targets whose A records go in the SRV answer's additional section.
    glue: Vec<Name>,
    /// Answer over UDP with the truncation bit and nothing else.
    truncate_udp: bool,
    udp_queries: usize,
    tcp_queries: usize,
}

type Shared = Arc<Mutex<Zone>>;

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("name")
}

fn answer(zone: &Shared, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let mut reply = Message::response(q.metadata.id, q.metadata.op_code);
    reply.metadata.recursion_desired = q.metadata.recursion_desired;
    reply.add_query(question.clone());
    let mut zone = zone.lock().expect("lock");
    if udp {
        zone.udp_queries += 1;
    } else {
        zone.tcp_queries += 1;
    }
    if udp && zone.truncate_udp {
        reply.metadata.truncation = true;
        return reply.to_vec().ok();
    }
    let qname = question.name().clone();
    let known = zone.srv.contains_key(&qname) || zone.a.contains_key(&qname);
    if !known {
        reply.metadata.response_code = ResponseCode::NXDomain;
        return reply.to_vec().ok();
    }
    match question.query_type() {
        RecordType::SRV => {
            for srv in zone.srv.get(&qname).into_iter().flatten() {
                reply.add_answer(Record::from_rdata(qname.clone(), 30, RData::SRV(srv.clone())));
                if zone.glue.contains(&srv.target) {
                    for ip in zone.a.get(&srv.target).into_iter().flatten() {
                        reply.add_additional(Record::from_rdata(srv.target.clone(), 30, RData::from(*ip)));
                    }
                }
            }
        }
        RecordType::A => {
            for ip in zone.a.get(&qname).into_iter().flatten() {
                reply.add_answer(Record::from_rdata(qname.clone(), 30, RData::from(*ip)));
            }
        }
        _ => {}
    }
    reply.to_vec().ok()
}

/// Serves `zone` over UDP and TCP on one loopback port.
async fn fake_dns(zone: Shared) -> SocketAddr {
    // TCP on port 0 first, then UDP on the same number (a separate port space).
    let (tcp, udp) = loop {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let address = tcp.local_addr().expect("address");
        if let Ok(udp) = tokio::net::UdpSocket::bind(address).await {
            break (tcp, udp);
        }
    };
    let address = tcp.local_addr().expect("address");
    let z = zone.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            if let Some(reply) = answer(&z, &buf[..n], true) {
                let _ = udp.send_to(&reply, from).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            let zone = zone.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).await.ok()?;
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                stream.read_exact(&mut query).await.ok()?;
                let reply = answer(&zone, &query, false)?;
                let mut framed = u16::try_from(reply.len()).ok()?.to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                stream.write_all(&framed).await.ok()
            });
        }
    });
    address
}

fn srv_config(server: SocketAddr, srv_name: &str) -> DnsDiscovery {
    DnsDiscovery {
        name: srv_name.to_owned(),
        record: DnsRecord::Srv,
        server: Some(server),
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(1),
    }
}

fn llm_zone() -> Zone {
    let mut zone = Zone::default();
    zone.srv.insert(
        name("_http._tcp.llm.test."),
        vec![
            SRV::new(10, 3, 9001, name("a.llm.test.")),
            SRV::new(10, 0, 9002, name("b.llm.test.")),
            // A backup: a higher priority value is only for when the others are gone.
            SRV::new(20, 1, 9003, name("c.llm.test.")),
        ],
    );
    zone.a.insert(name("a.llm.test."), vec![Ipv4Addr::new(127, 0, 0, 2)]);
    zone.a.insert(name("b.llm.test."), vec![Ipv4Addr::new(127, 0, 0, 3)]);
    zone.a.insert(name("c.llm.test."), vec![Ipv4Addr::new(127, 0, 0, 4)]);
    zone.glue.push(name("a.llm.test."));
    zone
}

#[tokio::test]
async fn srv_records_become_endpoints_and_follow_changes() {
    let zone: Shared = Arc::new(Mutex::new(llm_zone()));
    let server = fake_dns(zone.clone()).await;
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let discovery = Discovery::new(sink.clone(), status.clone());
    let task = discovery.spawn("llm", DiscoveryConfig::Dns(srv_config(server, "_http._tcp.llm.test")));

    // The lowest priority value wins; a's address came as glue, b's from an A query.
    let set = sink.wait_for("llm", WAIT, "the SRV set", |s| s.len() == 2).await;
    assert_eq!(addresses(&set), ["127.0.0.2:9001", "127.0.0.3:9002"]);
    assert_eq!(set.iter().map(|e| e.weight.get()).collect::<Vec<_>>(), [3, 1], "weight 0 counts as 1");

    // The records change: a leaves, so only b remains of priority 10.
    zone.lock().expect("lock").srv.get_mut(&name("_http._tcp.llm.test.")).expect("srv").remove(0);
    sink.wait_for("llm", WAIT, "a leaving", |s| addresses(s) == ["127.0.0.3:9002"]).await;

    // The name disappears: the set stays, the status says why.
    let applied = sink.sets("llm").len();
    zone.lock().expect("lock").srv.clear();
    let s = wait_failing(&status, "llm", "does not exist (NXDOMAIN").await;
    assert_eq!(s.endpoints, Some(1));
    assert_eq!(sink.sets("llm").len(), applied);
    assert!(s.source.contains("dns SRV _http._tcp.llm.test"), "{s:?}");
    task.abort();
}

#[tokio::test]
async fn a_truncated_answer_is_asked_again_over_tcp() {
    let zone: Shared = Arc::new(Mutex::new(Zone { truncate_udp: true, ..llm_zone() }));
    let server = fake_dns(zone.clone()).await;
    let set = dns::resolve(&srv_config(server, "_http._tcp.llm.test.")).await.expect("resolve");
    assert_eq!(addresses(&set), ["127.0.0.2:9001", "127.0.0.3:9002"]);
    let zone = zone.lock().expect("lock");
    assert!(zone.udp_queries >= 1 && zone.tcp_queries >= 1, "{zone:?}");
}

#[tokio::test]
async fn a_records_with_a_configured_server() {
    let zone: Shared = Arc::new(Mutex::new(llm_zone()));
    let server = fake_dns(zone).await;
    let config = DnsDiscovery { record: DnsRecord::Address { port: 8000 }, ..srv_config(server, "b.llm.test") };
    let set = dns::resolve(&config).await.expect("resolve");
    assert_eq!(addresses(&set), ["127.0.0.3:8000"]);
    let config = DnsDiscovery { record: DnsRecord::Address { port: 8000 }, ..srv_config(server, "nope.llm.test") };
    let e = dns::resolve(&config).await.unwrap_err().to_string();
    assert!(e.contains("nope.llm.test. does not exist"), "{e}");
}

#[tokio::test]
async fn localhost_resolves_through_the_system_resolver() {
    let config = DnsDiscovery {
        name: "localhost".to_owned(),
        record: DnsRecord::Address { port: 9001 },
        server: None,
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
    };
    let sink = RecordingSink::new();
    let status = Arc::new(StatusBoard::new());
    let task = Discovery::new(sink.clone(), status.clone()).spawn("local", DiscoveryConfig::Dns(config));
    let set = sink.wait_for("local", WAIT, "localhost", |s| !s.is_empty()).await;
    let addrs = addresses(&set);
    assert!(addrs.iter().all(|a| a == "127.0.0.1:9001" || a == "[::1]:9001"), "{addrs:?}");
    assert!(addrs.contains(&"127.0.0.1:9001".to_owned()) || addrs.contains(&"[::1]:9001".to_owned()));
    assert_eq!(ids(&set), addrs, "an endpoint's id is its address");
    task.abort();
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // A UDP socket that never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let config = DnsDiscovery {
        timeout: Duration::from_millis(200),
        ..srv_config(silent.local_addr().expect("address"), "_x._tcp.test")
    };
    let started = std::time::Instant::now();
    let e = dns::resolve(&config).await.unwrap_err().to_string();
    assert!(e.contains("no answer from"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
