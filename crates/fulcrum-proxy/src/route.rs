//! Route tables: which pool a request goes to.
//!
//! Routes are tried in file order; the first whose conditions all hold wins. Host, path and
//! header conditions are checked first; the body is read (bounded) only when a route that
//! matched so far also names models, so requests to other routes are never buffered.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use crate::observe::RouteTag;
use crate::pool::PoolRuntime;

/// A compiled route.
#[derive(Debug)]
pub(crate) struct Route {
    host: Option<String>,
    path_prefix: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    models: Vec<String>,
    client_identity: Option<String>,
    rules: RouteRules,
    upgrades: Upgrades,
    /// The route's name and its counters' slot in the pool.
    tag: RouteTag,
    pub(crate) pool: Arc<PoolRuntime>,
}

impl Route {
    pub(crate) fn new(config: &fulcrum_config::RouteConfig, pool: Arc<PoolRuntime>) -> Self {
        let headers = config
            .matcher
            .headers
            .iter()
            .filter_map(|(n, v)| Some((HeaderName::from_bytes(n.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?)))
            .collect();
        Route {
            host: config.matcher.host.clone(),
            path_prefix: config.matcher.path_prefix.clone(),
            headers,
            models: config.matcher.models.clone(),
            client_identity: config.matcher.client_identity.clone(),
            rules: RouteRules { inference: config.inference, hedge: config.hedge, hedge_delay: config.hedge_delay },
            upgrades: Upgrades(config.upgrades.clone()),
            tag: RouteTag::new(&config.name, &pool),
            pool,
        }
    }

    fn matches_head(&self, parts: &Parts) -> bool {
        if let Some(want) = &self.client_identity {
            let id = parts.extensions.get::<Arc<crate::tls::ClientIdentity>>();
            if !id.is_some_and(|id| id.matches(want)) {
                return false;
            }
        }
        if let Some(want) = &self.host {
            let host = parts.uri.host().or_else(|| {
                let h = parts.headers.get(header::HOST)?.to_str().ok()?;
                // Strip a port, keeping IPv6 brackets whole.
                Some(match h.rfind(':') {
                    Some(i) if !h[i..].contains(']') => &h[..i],
                    _ => h,
                })
            });
            if !host.is_some_and(|h| h.eq_ignore_ascii_case(want)) {
                return false;
            }
        }
        if let Some(prefix) = &self.path_prefix
            && !parts.uri.path().starts_with(prefix.as_str())
        {
            return false;
        }
        self.headers.iter().all(|(name, value)| parts.headers.get_all(name).iter().any(|v| v == value))
    }
}

/// What a route says about how its requests are sent.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RouteRules {
    /// An inference route: its POSTs may be retried.
    pub(crate) inference: bool,
    /// Hedging on or off; None: on for inference calls.
    pub(crate) hedge: Option<bool>,
    /// A fixed hedging delay instead of the learned one.
    pub(crate) hedge_delay: Option<Duration>,
}

impl RouteRules {
    /// When a request is hedged, given whether it is an inference call (by route, path or body).
    pub(crate) fn hedging(&self, inference: bool) -> fulcrum_core::flow::Hedging {
        use fulcrum_core::flow::Hedging;
        if !self.hedge.unwrap_or(inference) {
            return Hedging::Off;
        }
        self.hedge_delay.map_or(Hedging::Learned, Hedging::After)
    }
}

/// The protocols a route lets clients switch to (`Upgrade`), lowercase.
#[derive(Debug)]
pub(crate) struct Upgrades(Vec<String>);

impl Upgrades {
    /// Whether a request asking for an upgrade may have it: every protocol its `Upgrade`
    /// header offers (case-insensitive, any `/version` aside) is allowed, so the upstream
    /// cannot pick one the route does not allow. Otherwise the request goes as a plain one.
    pub(crate) fn allow(&self, headers: &HeaderMap) -> bool {
        let mut offered = headers
            .get_all(header::UPGRADE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .map(|t| t.split(|&b| b == b'/').next().unwrap_or(t))
            .peekable();
        offered.peek().is_some() && offered.all(|t| self.0.iter().any(|name| t.eq_ignore_ascii_case(name.as_bytes())))
    }
}

/// The outcome of matching.
#[derive(Debug)]
pub(crate) enum Matched<'a> {
    /// Route to this pool, with the route's rules, the route as metrics and logs name it, and
    /// the upgrades it allows.
    Pool(&'a Arc<PoolRuntime>, &'a RouteRules, &'a RouteTag, &'a Upgrades),
    /// A route names models: read the body and match again.
    NeedBody,
    /// Nothing matches.
    None,
}

/// A listener's routes and fallback.
#[derive(Debug)]
pub(crate) struct RouteTable {
    routes: Vec<Route>,
    default_pool: Option<Arc<PoolRuntime>>,
    default_tag: RouteTag,
    default_rules: RouteRules,
    default_upgrades: Upgrades,
}

impl RouteTable {
    pub(crate) fn new(routes: Vec<Route>, default_pool: Option<Arc<PoolRuntime>>) -> Self {
        let default_upgrades = Upgrades(fulcrum_config::DEFAULT_UPGRADES.map(str::to_owned).to_vec());
        RouteTable {
            routes,
            default_pool,
            default_tag: RouteTag::default_route(),
            default_rules: RouteRules::default(),
            default_upgrades,
        }
    }

    /// Matches a request. `model` is `None` until the body has been read (`body_read`).
    pub(crate) fn find(&self, parts: &Parts, body_read: bool, model: Option<&str>) -> Matched<'_> {
        for route in &self.routes {
            if !route.matches_head(parts) {
                continue;
            }
            if route.models.is_empty() {
                return Matched::Pool(&route.pool, &route.rules, &route.tag, &route.upgrades);
            }
            if !body_read {
                return Matched::NeedBody;
            }
            if model.is_some_and(|m| route.models.iter().any(|want| want == m)) {
                return Matched::Pool(&route.pool, &route.rules, &route.tag, &route.upgrades);
            }
        }
        match &self.default_pool {
            Some(p) => Matched::Pool(p, &self.default_rules, &self.default_tag, &self.default_upgrades),
            None => Matched::None,
        }
    }
}

/// The OpenAI `model` field of a JSON body, if there is one.
pub(crate) fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ModelOnly<'a> {
        #[serde(borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<ModelOnly<'_>>(body).ok()?.model.map(|m| m.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_read_from_json_only() {
        assert_eq!(
            model_of(br#"{"messages":[{"role":"user","content":"hi"}],"model":"llama"}"#).as_deref(),
            Some("llama")
        );
        assert_eq!(model_of(br#"{"prompt":"x"}"#), None);
        assert_eq!(model_of(b"not json"), None);
        assert_eq!(model_of(br#"{"model": 3}"#), None);
    }

    #[test]
    fn inference_calls_are_hedged_unless_the_route_says_otherwise() {
        use fulcrum_core::flow::Hedging;
        let default = RouteRules::default();
        assert_eq!(default.hedging(true), Hedging::Learned);
        assert_eq!(default.hedging(false), Hedging::Off);
        let off = RouteRules { hedge: Some(false), ..default };
        assert_eq!(off.hedging(true), Hedging::Off);
        let fixed = RouteRules { hedge: Some(true), hedge_delay: Some(Duration::from_millis(150)), ..default };
        assert_eq!(fixed.hedging(false), Hedging::After(Duration::from_millis(150)));
    }

    #[test]
    fn an_upgrade_passes_only_if_every_protocol_offered_is_allowed() {
        let websocket = Upgrades(vec!["websocket".to_owned()]);
        let offer = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::UPGRADE, HeaderValue::from_static(v));
            }
            h
        };
        assert!(websocket.allow(&offer(&["websocket"])));
        assert!(websocket.allow(&offer(&["WebSocket"])));
        assert!(websocket.allow(&offer(&["websocket/13"])));
        assert!(!websocket.allow(&offer(&["h2c"])));
        assert!(!websocket.allow(&offer(&["websocket, h2c"])));
        assert!(!websocket.allow(&offer(&["websocket", "h2c"])));
        assert!(!websocket.allow(&offer(&[""])));
        assert!(!websocket.allow(&offer(&[])));
        let both = Upgrades(vec!["h2c".to_owned(), "websocket".to_owned()]);
        assert!(both.allow(&offer(&["h2c, websocket"])));
        assert!(!Upgrades(Vec::new()).allow(&offer(&["websocket"])));
    }
}
