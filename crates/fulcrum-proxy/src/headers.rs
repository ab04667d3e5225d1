//! Header hygiene: hop-by-hop headers out, `X-Forwarded-*` and `x-request-id` in.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Refuses a request whose target is ambiguous: two `Host` headers (RFC 9112, 3.2: 400), or
/// user information in `Host` or in an absolute-form target (RFC 9110, 4.2.4).
pub(crate) fn check_host(parts: &http::request::Parts) -> Result<(), String> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has two Host headers".to_owned());
    }
    if first.is_some_and(|h| h.as_bytes().contains(&b'@')) {
        return Err("the Host header carries user information (`user@`), which is not allowed".to_owned());
    }
    if parts.uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("the request target carries user information (`user@`), which is not allowed".to_owned());
    }
    Ok(())
}

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1), and those the `Connection` header
/// names. With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay (WebSocket).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names says which are there (usually none, or a `Connection`), so
    // that only those are looked up again.
    let present = headers.keys().fold(0u8, |acc, name| acc | hop_by_hop(name));
    if present == 0 {
        return;
    }
    if present & CONNECTION != 0 {
        // Names listed in Connection (every line of it) are hop-by-hop too; the common case
        // lists none.
        let plain = |v: &HeaderValue| {
            v.as_bytes().eq_ignore_ascii_case(b"keep-alive") || v.as_bytes().eq_ignore_ascii_case(b"close")
        };
        if !headers.get_all(header::CONNECTION).iter().all(plain) {
            let listed: Vec<HeaderName> = headers
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("").split(','))
                .map(str::trim)
                .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
                .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
                // A client cannot make the proxy drop what says where and how long the
                // request is (`Connection: host` used to strip Host upstream).
                .filter(|t| !t.eq_ignore_ascii_case("host") && !t.eq_ignore_ascii_case("content-length"))
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .collect();
            for name in listed {
                headers.remove(name);
            }
        }
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        } else {
            headers.remove(header::CONNECTION);
        }
    }
    if present & KEEP_ALIVE_BIT != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if present & PROXY_CONNECTION_BIT != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if present & TE != 0 {
        headers.remove(header::TE);
    }
    if present & TRAILER != 0 {
        headers.remove(header::TRAILER);
    }
    if present & TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & UPGRADE != 0 && !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

const CONNECTION: u8 = 1;
const KEEP_ALIVE_BIT: u8 = 2;
const PROXY_CONNECTION_BIT: u8 = 4;
const TE: u8 = 8;
const TRAILER: u8 = 16;
const TRANSFER_ENCODING: u8 = 32;
const UPGRADE: u8 = 64;

/// The bit of a hop-by-hop header name, or 0.
fn hop_by_hop(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        CONNECTION
    } else if name == header::TRANSFER_ENCODING {
        TRANSFER_ENCODING
    } else if name == header::UPGRADE {
        UPGRADE
    } else if name == header::TE {
        TE
    } else if name == header::TRAILER {
        TRAILER
    } else if name == KEEP_ALIVE {
        KEEP_ALIVE_BIT
    } else if name == PROXY_CONNECTION {
        PROXY_CONNECTION_BIT
    } else {
        0
    }
}

/// Where a client connection comes from, as upstreams are told: made once per connection.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    /// The value `add_forwarded` appends to `X-Forwarded-For`: the client's address
    /// (IPv4-mapped addresses as IPv4).
    pub(crate) forwarded_for: HeaderValue,
    /// Whether the client came over TLS (`X-Forwarded-Proto: https`).
    pub(crate) https: bool,
    /// The client certificate the TLS handshake verified, if any.
    pub(crate) identity: Option<std::sync::Arc<crate::tls::ClientIdentity>>,
}

impl Origin {
    /// A client of a plain-text listener.
    pub(crate) fn plain(client: IpAddr) -> Origin {
        Origin { forwarded_for: forwarded_for(client), https: false, identity: None }
    }
}

fn forwarded_for(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&itoa_ip(client)).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Adds `X-Forwarded-For` (the client, appended to any existing chain), `-Proto` and
/// `-Host`, and sets `X-Forwarded-Client-Cert` to the verified client certificate (removing
/// whatever the client sent in it).
pub(crate) fn add_forwarded(headers: &mut HeaderMap, origin: &Origin, host: Option<&HeaderValue>) {
    let client = &origin.forwarded_for;
    match origin.identity.as_ref() {
        Some(id) => {
            headers.insert(&X_FORWARDED_CLIENT_CERT, id.header.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_CLIENT_CERT);
        }
    }
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(e) => {
            e.insert(client.clone());
        }
        header::Entry::Occupied(mut e) => {
            let chain = match e.get().to_str() {
                Ok(prev) => HeaderValue::from_bytes(format!("{prev}, {}", client.to_str().unwrap_or("")).as_bytes()),
                Err(_) => Ok(client.clone()),
            };
            if let Ok(v) = chain {
                e.insert(v);
            }
        }
    }
    let proto = if origin.https { "https" } else { "http" };
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = host {
        headers.insert(&X_FORWARDED_HOST, host.clone());
    }
}

fn itoa_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// The request's id: the client's `x-request-id` when it sent a sane one, else a new one.
pub(crate) fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
    {
        return v.clone();
    }
    let id = new_request_id();
    headers.insert(&X_REQUEST_ID, id.clone());
    id
}

/// 16 hex digits: a per-process random prefix mixed with a counter, unique and cheap. Its
/// bytes are owned by one shared allocation, so that the copies the request and the response
/// carry cost a reference count each (a value copied from a slice would allocate again when
/// first cloned).
fn new_request_id() -> HeaderValue {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(crate::clock::random_seed);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let v = fulcrum_core::hash::mix(seed, n);
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        let nibble = ((v >> (60 - 4 * i)) & 0xF) as u8;
        *b = if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 };
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out)).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get_all(header::COOKIE).iter().find_map(|v| {
        v.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn every_connection_line_names_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-a"));
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive, x-b"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("2"));
        h.insert("x-kept", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn hop_by_hop_headers_go_without_a_connection_header_too() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        // A plain `Connection: keep-alive` names nothing else.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        // Nothing to strip: nothing changes.
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key("x-kept") && !h.contains_key(header::CONNECTION));
    }

    #[test]
    fn upgrade_is_kept_for_websocket() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let host = HeaderValue::from_static("api.example.com");
        h.insert("x-forwarded-client-cert", HeaderValue::from_static("Hash=forged"));
        add_forwarded(&mut h, &Origin::plain("127.0.0.1".parse().unwrap()), Some(&host));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert!(!h.contains_key("x-forwarded-client-cert"), "a client's own XFCC is removed");
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = HeaderMap::new();
        let a = request_id(&mut h);
        assert_eq!(a.len(), 16);
        assert_eq!(h["x-request-id"], a);
        let mut h2 = HeaderMap::new();
        assert_ne!(request_id(&mut h2), a);
        let mut given = HeaderMap::new();
        given.insert("x-request-id", HeaderValue::from_static("abc"));
        assert_eq!(request_id(&mut given), "abc");
    }

    #[test]
    fn cookies_are_found() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; sid=xyz ; b=2"));
        assert_eq!(cookie(&h, "sid"), Some(&b"xyz"[..]));
        assert_eq!(cookie(&h, "si"), None);
        assert_eq!(cookie(&h, "b"), Some(&b"2"[..]));
    }
}
