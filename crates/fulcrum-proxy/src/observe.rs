//! What the proxy records about each request: its metrics, its access-log line and its
//! trace.
//!
//! An [`Exchange`] follows one request from its arrival to the end of its response body
//! (it rides inside [`TrackedBody`](crate::body::TrackedBody) while the body streams), and
//! records everything when it is dropped, however the request ended: answered, refused by the
//! proxy, cut mid-stream, or abandoned by the client (counted as status 499, nginx's "client
//! closed request").
//!
//! Metrics cost a few relaxed atomic adds into counters pre-allocated per endpoint
//! ([`crate::stats`]); the access log and the trace cost one branch each when they are off,
//! and the request facts they need (method, path, host...) are only kept when one is on.
//!
//! The access log is one `tracing` event per request, target `fulcrum::access`, level INFO,
//! with the fields `request_id`, `client`, `method`, `path` (without the query), `host`,
//! `route`, `pool`, `endpoint`, `attempts`, `status`, `bytes` (response body bytes sent),
//! `duration_ms`, `ttfb_ms` and `error` (absent fields were not known: no route, no endpoint).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use crate::error::ProxyError;
use crate::pool::PoolRuntime;
use crate::stats::{RouteSlot, StatusCounts};
use crate::trace::{ServerTrace, Summary, Tracer};
use crate::upstream::Upstream;

/// Requests that matched no route and had no default pool (404), process-wide.
pub static UNROUTED: StatusCounts = StatusCounts::new();

/// The access-log target.
pub const ACCESS_LOG_TARGET: &str = "fulcrum::access";

/// What a listener's requests record besides metrics.
#[derive(Clone, Debug, Default)]
pub struct Observe {
    access_log: bool,
    tracer: Option<Arc<Tracer>>,
}

impl Observe {
    /// Access log on or off; traces when a tracer is given.
    pub fn new(access_log: bool, tracer: Option<Arc<Tracer>>) -> Self {
        Observe { access_log, tracer }
    }
}

/// A route as metrics and logs name it.
#[derive(Clone, Debug)]
pub(crate) struct RouteTag {
    name: Arc<str>,
    slot: RouteSlot,
}

impl RouteTag {
    /// Route `name` to `pool` (registers the name with the pool's statistics).
    pub(crate) fn new(name: &str, pool: &PoolRuntime) -> Self {
        RouteTag { name: Arc::from(name), slot: pool.safety().stats.traffic.route_slot(name) }
    }

    /// A listener's default pool.
    pub(crate) fn default_route() -> Self {
        RouteTag { name: Arc::from(fulcrum_config::DEFAULT_ROUTE_NAME), slot: RouteSlot::DEFAULT }
    }
}

/// The request facts the access log and the trace show.
#[derive(Debug)]
struct Facts {
    request_id: HeaderValue,
    client: SocketAddr,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    /// The route's name.
    route: Option<Arc<str>>,
    /// The last thing that went wrong.
    error: Option<String>,
    /// What cut the response short.
    response_error: Option<Cow<'static, str>>,
}

/// One request, observed until its response ends.
#[derive(Debug)]
pub struct Exchange {
    started: Instant,
    access_log: bool,
    /// Boxed, so that the exchange stays small when logs and traces are off.
    facts: Option<Box<Facts>>,
    route: RouteSlot,
    pool: Option<Arc<PoolRuntime>>,
    upstream: Option<Arc<Upstream>>,
    attempts: u32,
    /// The response status (0: no response head yet).
    status: u16,
    bytes: u64,
    first_byte: Option<Duration>,
    /// |predicted - measured| time to first token, seconds.
    prediction_error: Option<f64>,
    /// The response body ended (or there was none).
    complete: bool,
    trace: Option<Box<ServerTrace>>,
}

impl Exchange {
    /// A request that arrived at `started`.
    pub(crate) fn begin(
        observe: &Observe,
        started: Instant,
        client: SocketAddr,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        request_id: &HeaderValue,
    ) -> Self {
        let trace = match &observe.tracer {
            Some(t) => t.start(headers, started).map(Box::new),
            None => None,
        };
        let facts = (observe.access_log || trace.is_some()).then(|| {
            Box::new(Facts {
                request_id: request_id.clone(),
                client,
                method: method.clone(),
                uri: uri.clone(),
                host: headers.get(http::header::HOST).cloned(),
                route: None,
                error: None,
                response_error: None,
            })
        });
        Exchange {
            started,
            access_log: observe.access_log,
            facts,
            route: RouteSlot::DEFAULT,
            pool: None,
            upstream: None,
            attempts: 0,
            status: 0,
            bytes: 0,
            first_byte: None,
            prediction_error: None,
            complete: false,
            trace,
        }
    }

    /// The request was routed.
    pub(crate) fn routed(&mut self, route: &RouteTag, pool: &Arc<PoolRuntime>) {
        self.route = route.slot;
        if let Some(facts) = &mut self.facts {
            facts.route = Some(route.name.clone());
        }
        self.pool = Some(pool.clone());
    }

    /// An attempt goes to `upstream` (any attempt still open has ended); when the request is
    /// traced, `headers` get the `traceparent` of the attempt's span. Returns its number.
    pub(crate) fn attempt(&mut self, upstream: &Arc<Upstream>, method: &Method, headers: &mut HeaderMap) -> u32 {
        self.start_attempt(upstream, method, headers, false)
    }

    /// A hedge goes to `upstream` while the attempt it hedges is still open.
    pub(crate) fn hedge(&mut self, upstream: &Arc<Upstream>, method: &Method, headers: &mut HeaderMap) -> u32 {
        self.start_attempt(upstream, method, headers, true)
    }

    fn start_attempt(
        &mut self,
        upstream: &Arc<Upstream>,
        method: &Method,
        headers: &mut HeaderMap,
        hedge: bool,
    ) -> u32 {
        self.attempts += 1;
        self.upstream = Some(upstream.clone());
        if let Some(t) = &mut self.trace {
            let pool = self.pool.as_ref().map_or("", |p| p.name());
            let tp = t.start_attempt(self.attempts, method.as_str(), pool, upstream.name(), upstream.address(), hedge);
            headers.insert("traceparent", tp);
        }
        self.attempts
    }

    /// The response comes from `upstream` (a hedge's first try may answer after its hedge
    /// was sent).
    pub(crate) fn answered_by(&mut self, upstream: &Arc<Upstream>) {
        self.upstream = Some(upstream.clone());
    }

    /// The current attempt failed and another may follow: `status` if the endpoint answered,
    /// else the error.
    pub(crate) fn attempt_failed(&mut self, status: Option<StatusCode>, error: Option<&ProxyError>) {
        let upstream = self.upstream.clone();
        self.failed(None, upstream.as_deref(), status, error);
    }

    /// Attempt `number`, sent to `upstream`, failed while its twin (a hedge, or the try a
    /// hedge raced) is still out.
    pub(crate) fn attempt_failed_of(
        &mut self,
        number: u32,
        upstream: &Upstream,
        status: Option<StatusCode>,
        error: Option<&ProxyError>,
    ) {
        self.failed(Some(number), Some(upstream), status, error);
    }

    /// Attempt `number` lost its race: the other's response head came first.
    pub(crate) fn lost(&mut self, number: u32) {
        if let Some(t) = &mut self.trace {
            t.end_attempt_of(number, None, Some("cancelled: another attempt answered first"));
        }
    }

    fn failed(
        &mut self,
        number: Option<u32>,
        upstream: Option<&Upstream>,
        status: Option<StatusCode>,
        error: Option<&ProxyError>,
    ) {
        let Some(facts) = &mut self.facts else { return };
        let message = match (error, status) {
            (Some(e), _) => e.to_string(),
            (None, Some(s)) => format!("upstream {} answered {s}", upstream.map_or("", |u| u.name())),
            (None, None) => "failed".to_owned(),
        };
        if let Some(t) = &mut self.trace {
            let (status, error) = (status.map(|s| s.as_u16()), error.map(|_| message.as_str()));
            match number {
                Some(n) => t.end_attempt_of(n, status, error),
                None => t.end_attempt(status, error),
            }
        }
        facts.error = Some(message);
    }

    /// The proxy answers the request itself, with `error`.
    pub(crate) fn refused(&mut self, error: &ProxyError, body_len: usize) {
        if let Some(facts) = &mut self.facts {
            let message = error.to_string();
            if let Some(t) = &mut self.trace {
                // An attempt still open is the one that failed.
                t.end_attempt(None, Some(&message));
            }
            facts.error = Some(message);
        }
        self.respond(error.status());
        self.on_data(body_len);
        self.complete();
    }

    /// The response head goes out.
    pub(crate) fn respond(&mut self, status: StatusCode) {
        self.status = status.as_u16();
    }

    /// A chunk of the response body goes out.
    pub(crate) fn on_data(&mut self, len: usize) {
        if self.first_byte.is_none() && len > 0 {
            self.first_byte = Some(self.started.elapsed());
        }
        self.bytes += len as u64;
    }

    /// The balancer's predicted time to first token, and the measured one (seconds).
    pub(crate) fn on_prediction(&mut self, predicted: f64, measured: f64) {
        self.prediction_error = Some((predicted - measured).abs());
    }

    /// The response ended.
    pub(crate) fn complete(&mut self) {
        self.complete = true;
    }

    /// The response was cut short.
    pub(crate) fn cut(&mut self, why: impl Into<Cow<'static, str>>) {
        if let Some(facts) = &mut self.facts {
            facts.response_error = Some(why.into());
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let gone = match (self.status, self.complete) {
            (0, _) => Some("the client went away before the response"),
            (_, false) => Some("the client went away before the response ended"),
            _ => None,
        };
        let answered = self.status != 0;
        if !answered {
            self.status = 499;
        }
        // An empty body's first byte is its end.
        let first_byte = match self.first_byte {
            Some(t) => Some(t),
            None if self.complete => Some(elapsed),
            None => None,
        };
        let slot = self.route;
        let stats = match (&self.upstream, &self.pool) {
            (Some(u), _) => Some(u.stats()),
            (None, Some(p)) => Some(&p.safety().stats.traffic.unsent),
            (None, None) => None,
        };
        match stats {
            Some(s) => {
                s.requests.record(slot, self.status);
                s.duration.observe(elapsed);
                if let Some(t) = first_byte {
                    s.first_byte.observe(t);
                }
                if let Some(e) = self.prediction_error.filter(|e| e.is_finite()) {
                    s.ttft_prediction_error.observe(Duration::from_secs_f64(e.min(1e6)));
                }
            }
            None => UNROUTED.record(self.status),
        }

        let Some(facts) = &mut self.facts else { return };
        if let Some(why) = gone {
            facts.response_error.get_or_insert(Cow::Borrowed(why));
        }
        // The target's authority first, as for routing (RFC 9112, 3.2.2).
        let host =
            facts.uri.authority().map(|a| a.as_str()).or_else(|| facts.host.as_ref().and_then(|h| h.to_str().ok()));
        let summary = Summary {
            method: facts.method.as_str(),
            path: facts.uri.path(),
            host,
            client: Some(facts.client),
            request_id: facts.request_id.to_str().ok(),
            route: facts.route.as_deref(),
            pool: self.pool.as_ref().map(|p| p.name()),
            endpoint: self.upstream.as_ref().map(|u| u.name()),
            attempts: self.attempts,
            status: self.status,
            answered,
            bytes: self.bytes,
            error: facts.response_error.as_deref().or(facts.error.as_deref()),
            response_error: facts.response_error.as_deref(),
        };
        if self.access_log {
            access_log(&summary, elapsed, first_byte);
        }
        if let Some(t) = self.trace.take() {
            (*t).finish(&summary, elapsed);
        }
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn access_log(s: &Summary<'_>, elapsed: Duration, first_byte: Option<Duration>) {
    tracing::info!(
        target: ACCESS_LOG_TARGET,
        request_id = s.request_id.unwrap_or("-"),
        client = s.client.map(tracing::field::display),
        method = s.method,
        path = s.path,
        host = s.host,
        route = s.route,
        pool = s.pool,
        endpoint = s.endpoint,
        attempts = s.attempts,
        status = s.status,
        bytes = s.bytes,
        duration_ms = millis(elapsed),
        ttfb_ms = first_byte.map(millis),
        error = s.error,
        "request"
    );
}
