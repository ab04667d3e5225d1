//! A forecast of a pool's request rate: Holt-Winters with one season (a day), in virtual time.
//!
//! Holt-Winters exponential smoothing (Holt 1957, Winters 1960; the damped trend of Gardner and
//! McKenzie 1985) splits a series into a level, a trend and a seasonal index per position in
//! the season, each smoothed by its own factor. Here the series is the request rate averaged
//! over fixed slots of virtual time (`slot`, 5 min by default) and the season is `season` (24 h
//! by default: 288 slots). Slot `k` covers `[k x slot, (k + 1) x slot)` from the clock's zero, so
//! a season's phase is fixed by the clock, and the model learns where in it the traffic peaks.
//! At the end of each slot its mean rate `y` is folded in (alpha, beta, gamma the smoothing
//! factors, phi the damping, `s` the slot's index one season ago, `h` the slots since the last
//! fold):
//!
//! ```text
//! level'  = alpha (y - s) + (1 - alpha) (level + trend x (phi + ... + phi^h))
//! trend'  = beta (level' - level) / h + (1 - beta) phi^h trend
//! s'      = gamma (y - level') + (1 - gamma) s
//! rate(t) = max(0, level + trend x (phi + ... + phi^h(t)) + s(t))
//! ```
//!
//! where `s(t)` interpolates linearly between the indices of the two slots whose middles
//! surround `t`, so that a ramp steeper than a slot is followed between slots. While a slot has
//! seen fewer than `1 / gamma` seasons its index is their plain mean (gamma is raised to
//! `1 / seasons`), so that two or three days give an index of their average rather than
//! mostly the first day's noise.
//!
//! **Additive seasonality**, not multiplicative: request rates go to zero at night (and a pool
//! scaled to zero sees none), where a multiplicative index `y / level` is undefined or huge and
//! an error in it multiplies the whole forecast; an additive index is a number of requests a
//! second, bounded by the rates seen, and the forecast is clamped at zero. The price is that
//! a day whose traffic doubles has its peak under-forecast until the indices catch up, which
//! errs towards the reactive policy, the safe side.
//!
//! **Robustness.** A sample that is missing, negative or not finite is skipped; a slot without
//! a sample is missing and leaves the model as it was (the trend is damped over the gap). The
//! first season is only recorded: until a whole season has passed since the first sample, the
//! forecast is level and trend alone (Holt's linear method), never a seasonal shape made up
//! from a partial day. When it ends, the level becomes that season's mean and each slot's index
//! its mean less that; a slot that saw no sample then gets its index the first time it sees
//! one, and counts as flat until then.
//!
//! Cost: O(1) a sample and a forecast (the slots are indexed, never scanned); memory one
//! 16-byte slot per position in the season, fixed when built (288 for the defaults).
//!
//! ```
//! use std::time::Duration;
//! use fulcrum_core::Instant;
//! use fulcrum_core::scale::forecast::{HoltWinters, HoltWintersConfig, HoltWintersSettings};
//!
//! // A "day" of 60 s in 10 s slots: quiet, then busy in the second half.
//! let settings = HoltWintersSettings { season: Duration::from_secs(60), slot: Duration::from_secs(10), ..Default::default() };
//! let mut hw = HoltWinters::new(HoltWintersConfig::try_new(settings).unwrap());
//! for s in 0..300u64 {
//!     let rate = if (s % 60) < 30 { 2.0 } else { 20.0 };
//!     hw.observe(Instant::from_millis(s * 1_000), Some(rate));
//! }
//! // Five days in, in the middle of a quiet slot, the busy half is expected 35 s later.
//! let now = Instant::from_millis(305_000);
//! assert!(hw.forecast(now).unwrap() < 5.0);
//! let ahead = hw.forecast(now + Duration::from_secs(35)).unwrap();
//! assert!((ahead - 20.0).abs() < 2.0, "{ahead}");
//! ```

use std::time::Duration;

use super::{Check, ConfigError, Signals};
use crate::time::Instant;

const SECTION: Check = Check { section: "predictive" };

/// Most slots a season may have (memory stays at 16 bytes a slot).
pub const MAX_SLOTS: u64 = 100_000;

/// Holt-Winters settings as written, with the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HoltWintersSettings {
    /// The season, the period the traffic repeats over (24 h).
    pub season: Duration,
    /// The slot the rate is averaged over; the season must be a whole number of slots, at
    /// least 2 and at most [`MAX_SLOTS`] (5 min).
    pub slot: Duration,
    /// Alpha, how fast the level follows (0.3; above 0, at most 1).
    pub level: f64,
    /// Beta, how fast the trend follows (0.05; 0 to 1).
    pub trend: f64,
    /// Gamma, how fast the seasonal indices follow (0.2; 0 to 1).
    pub seasonal: f64,
    /// Phi, how much of the trend carries on from one slot to the next (0.9; above 0, at most 1).
    pub damping: f64,
}

impl Default for HoltWintersSettings {
    fn default() -> Self {
        HoltWintersSettings {
            season: Duration::from_secs(24 * 3_600),
            slot: Duration::from_secs(300),
            level: 0.3,
            trend: 0.05,
            seasonal: 0.2,
            damping: 0.9,
        }
    }
}

/// Validated Holt-Winters settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HoltWintersConfig {
    settings: HoltWintersSettings,
    slot_nanos: u64,
    slots: u64,
}

impl HoltWintersConfig {
    /// Checks the settings: a slot longer than zero, a season of 2 to [`MAX_SLOTS`] whole
    /// slots, smoothing factors within their ranges.
    pub fn try_new(s: HoltWintersSettings) -> Result<Self, ConfigError> {
        let slot_nanos = u64::try_from(s.slot.as_nanos()).unwrap_or(u64::MAX);
        let season_nanos = u64::try_from(s.season.as_nanos()).unwrap_or(u64::MAX);
        if slot_nanos == 0 {
            return Err(SECTION.err("slot", "must be longer than zero"));
        }
        if !season_nanos.is_multiple_of(slot_nanos) {
            return Err(
                SECTION.err("season", format!("must be a whole number of slots ({:?}), got {:?}", s.slot, s.season))
            );
        }
        let slots = season_nanos / slot_nanos;
        if !(2..=MAX_SLOTS).contains(&slots) {
            return Err(SECTION.err(
                "slot",
                format!("must split the season ({:?}) in 2 to {MAX_SLOTS} slots, got {slots}", s.season),
            ));
        }
        let within = |field, v: f64, zero_ok: bool| {
            let ok = v.is_finite() && v <= 1.0 && if zero_ok { v >= 0.0 } else { v > 0.0 };
            let range = if zero_ok { "0 to 1" } else { "above 0 and at most 1" };
            if ok { Ok(()) } else { Err(SECTION.err(field, format!("must be {range}, got {v}"))) }
        };
        within("level", s.level, false)?;
        within("trend", s.trend, true)?;
        within("seasonal", s.seasonal, true)?;
        within("damping", s.damping, false)?;
        Ok(HoltWintersConfig { settings: s, slot_nanos, slots })
    }

    /// The settings, as validated.
    pub fn settings(&self) -> &HoltWintersSettings {
        &self.settings
    }

    /// Slots in a season.
    pub fn slots(&self) -> u64 {
        self.slots
    }
}

/// What one position of the season holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    /// No sample yet.
    Unseen,
    /// The first season's mean rate in this slot, before the season is over.
    First(f64),
    /// The seasonal index (the rate above, or below, the level here) and the seasons it
    /// has seen.
    Index(f64, u32),
}

/// Where the model is in its life.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Recording the first season, which began with slot `start`: the sum and count of its
    /// slot means.
    First { start: u64, sum: f64, count: u32 },
    /// Seasonal, the first season's mean being `base`.
    Seasonal { base: f64 },
}

/// The smoothed state, once a slot with a sample has been folded in.
#[derive(Clone, Copy, Debug, PartialEq)]
struct State {
    level: f64,
    trend: f64,
    /// The last slot folded in.
    last: u64,
    phase: Phase,
}

/// A Holt-Winters forecast of a rate; see the [module](self) docs.
#[derive(Clone, Debug)]
pub struct HoltWinters {
    config: HoltWintersConfig,
    slots: Box<[Slot]>,
    /// The slot being filled: its number, and the sum and count of its samples.
    open: Option<(u64, f64, u32)>,
    state: Option<State>,
}

// === impl HoltWinters ===

impl HoltWinters {
    /// A model that has seen nothing.
    pub fn new(config: HoltWintersConfig) -> Self {
        let slots = vec![Slot::Unseen; usize::try_from(config.slots).unwrap_or(0)].into_boxed_slice();
        HoltWinters { config, slots, open: None, state: None }
    }

    /// The settings.
    pub fn config(&self) -> &HoltWintersConfig {
        &self.config
    }

    /// Whether a whole season has been seen, so that forecasts carry the seasonal shape.
    pub fn is_seasonal(&self) -> bool {
        matches!(self.state, Some(State { phase: Phase::Seasonal { .. }, .. }))
    }

    /// A sample of the rate at `now`; `None`, negative or not finite values are skipped.
    /// Calls come in time order (a sample older than the slot being filled counts in it).
    pub fn observe(&mut self, now: Instant, rate: Option<f64>) {
        let k = now.as_nanos() / self.config.slot_nanos;
        match self.open {
            Some((open, sum, n)) if k > open => {
                if n > 0 {
                    self.fold(open, sum / f64::from(n));
                }
                self.open = Some((k, 0.0, 0));
            }
            None => self.open = Some((k, 0.0, 0)),
            Some(_) => {}
        }
        if let (Some(rate), Some((_, sum, n))) = (Signals::clean(rate), self.open.as_mut()) {
            *sum += rate;
            *n = n.saturating_add(1);
        }
    }

    /// The rate expected at `at` (requests a second, at least 0); `None` before the first slot
    /// with a sample has ended.
    pub fn forecast(&self, at: Instant) -> Option<f64> {
        let state = self.state?;
        let slot = self.config.slot_nanos;
        let (k, within) = (at.as_nanos() / slot, (at.as_nanos() % slot) as f64 / slot as f64);
        // Slots from the middle of the last one folded to `at`.
        let h = (k.saturating_sub(state.last) as f64 + within - 0.5).max(0.0);
        let trend = state.trend * self.damped(h);
        let seasonal = match state.phase {
            Phase::First { .. } => 0.0,
            Phase::Seasonal { base } => {
                // Between the middles of slots `k - 1` and `k`, or of `k` and `k + 1`.
                let (left, f) = if within >= 0.5 { (k, within - 0.5) } else { (k.wrapping_sub(1), within + 0.5) };
                let (a, b) = (self.index(left, base), self.index(left.wrapping_add(1), base));
                match (a, b) {
                    (Some(a), Some(b)) => a + (b - a) * f,
                    (Some(v), None) | (None, Some(v)) => v,
                    (None, None) => 0.0,
                }
            }
        };
        let rate = state.level + trend + seasonal;
        rate.is_finite().then_some(rate.max(0.0))
    }

    /// The seasonal index of slot number `k`, if it has one.
    fn index(&self, k: u64, base: f64) -> Option<f64> {
        self.index_seen(k, base).map(|(s, _)| s)
    }

    /// The seasonal index of slot number `k` and the seasons it has seen, if it has one.
    fn index_seen(&self, k: u64, base: f64) -> Option<(f64, u32)> {
        match self.slots.get(self.position(k))? {
            Slot::Unseen => None,
            Slot::First(y) => Some((y - base, 1)),
            Slot::Index(s, n) => Some((*s, *n)),
        }
    }

    fn position(&self, k: u64) -> usize {
        usize::try_from(k % self.config.slots).unwrap_or(0)
    }

    /// `phi + phi^2 + ... + phi^h`, for a real `h >= 0`.
    fn damped(&self, h: f64) -> f64 {
        let phi = self.config.settings.damping;
        if phi >= 1.0 { h } else { phi * (1.0 - phi.powf(h)) / (1.0 - phi) }
    }

    /// Folds in slot `k`'s mean rate `y`.
    fn fold(&mut self, k: u64, y: f64) {
        let HoltWintersSettings { level: alpha, trend: beta, seasonal: gamma, .. } = self.config.settings;
        let position = self.position(k);
        let Some(mut s) = self.state else {
            self.state =
                Some(State { level: y, trend: 0.0, last: k, phase: Phase::First { start: k, sum: y, count: 1 } });
            if let Some(slot) = self.slots.get_mut(position) {
                *slot = Slot::First(y);
            }
            return;
        };
        if let Phase::First { start, sum, count } = s.phase
            && k.saturating_sub(start) >= self.config.slots
        {
            // A whole season seen: its mean is the level, each slot's mean less it the index.
            let base = sum / f64::from(count.max(1));
            s = State { level: base, trend: 0.0, last: s.last, phase: Phase::Seasonal { base } };
        }
        let steps = k.saturating_sub(s.last).max(1) as f64;
        let projected = s.level + s.trend * self.damped(steps);
        let carried = s.trend * self.config.settings.damping.powf(steps);
        let learn = |s: &mut State, deseasoned: f64| {
            let level = alpha * deseasoned + (1.0 - alpha) * projected;
            s.trend = beta * (level - s.level) / steps + (1.0 - beta) * carried;
            s.level = level;
        };
        match s.phase {
            Phase::First { start, sum, count } => {
                learn(&mut s, y);
                s.phase = Phase::First { start, sum: sum + y, count: count.saturating_add(1) };
                if let Some(slot) = self.slots.get_mut(position) {
                    *slot = Slot::First(y);
                }
            }
            Phase::Seasonal { base } => {
                let slot = match self.index_seen(k, base) {
                    // Never seen here: the level holds, and this sample sets the index.
                    None => {
                        s.level = projected;
                        s.trend = carried;
                        Slot::Index(y - projected, 1)
                    }
                    Some((index, seen)) => {
                        learn(&mut s, y - index);
                        // The mean of the seasons seen while they are fewer than 1 / gamma,
                        // then the exponential average: a young index is not one day's noise.
                        let g = gamma.max(1.0 / (f64::from(seen) + 1.0));
                        Slot::Index(g * (y - s.level) + (1.0 - g) * index, seen.saturating_add(1))
                    }
                };
                if let Some(cell) = self.slots.get_mut(position) {
                    *cell = slot;
                }
            }
        }
        s.last = k;
        self.state = Some(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;
    use proptest::test_runner::RngSeed;

    fn hw(season: u64, slot: u64) -> HoltWinters {
        let settings = HoltWintersSettings {
            season: Duration::from_secs(season),
            slot: Duration::from_secs(slot),
            ..HoltWintersSettings::default()
        };
        HoltWinters::new(HoltWintersConfig::try_new(settings).unwrap())
    }

    fn at(secs: f64) -> Instant {
        Instant::from_nanos((secs * 1e9) as u64)
    }

    /// A day of 100 s: 2 req/s, a ramp from 30 s to 40 s up to 20 req/s, 20 until 70 s, then
    /// straight back down to 2 by 80 s.
    fn day(t: f64) -> f64 {
        let t = t % 100.0;
        match t {
            t if t < 30.0 => 2.0,
            t if t < 40.0 => 2.0 + 18.0 * (t - 30.0) / 10.0,
            t if t < 70.0 => 20.0,
            t if t < 80.0 => 20.0 - 18.0 * (t - 70.0) / 10.0,
            _ => 2.0,
        }
    }

    /// Feeds `day` once a second from `from` to `to` seconds.
    fn feed(hw: &mut HoltWinters, from: u64, to: u64) {
        for s in from..to {
            hw.observe(at(s as f64), Some(day(s as f64)));
        }
    }

    #[test]
    fn nothing_is_forecast_before_a_slot_ends() {
        let mut h = hw(100, 5);
        assert_eq!(h.forecast(at(0.0)), None);
        h.observe(at(0.0), Some(3.0));
        h.observe(at(4.0), Some(5.0));
        assert_eq!(h.forecast(at(4.0)), None);
        h.observe(at(5.0), Some(5.0));
        assert_eq!(h.forecast(at(6.0)), Some(4.0));
    }

    #[test]
    fn the_first_season_has_no_seasonal_shape() {
        let mut h = hw(100, 5);
        feed(&mut h, 0, 25);
        assert!(!h.is_seasonal());
        // Flat so far: nothing suggests the ramp at 30 s, so none is forecast.
        let ahead = h.forecast(at(35.0)).unwrap();
        assert!((ahead - 2.0).abs() < 1e-9, "{ahead}");
        feed(&mut h, 25, 99);
        assert!(!h.is_seasonal());
        // The season ends with the first slot after it.
        feed(&mut h, 99, 106);
        assert!(h.is_seasonal());
    }

    #[test]
    fn after_a_season_the_ramp_is_forecast_before_it_comes() {
        let mut h = hw(100, 5);
        feed(&mut h, 0, 225);
        // Day 3, 5 s before the ramp: the rate 10 s ahead is about the middle of the ramp.
        let now = at(225.0);
        assert!((h.forecast(now).unwrap() - 2.0).abs() < 1.0, "{:?}", h.forecast(now));
        let ahead = h.forecast(at(235.0)).unwrap();
        assert!((ahead - day(235.0)).abs() < 2.5, "{ahead} vs {}", day(235.0));
        let plateau = h.forecast(at(250.0)).unwrap();
        assert!((plateau - 20.0).abs() < 1.5, "{plateau}");
        let evening = h.forecast(at(290.0)).unwrap();
        assert!((evening - 2.0).abs() < 1.5, "{evening}");
    }

    #[test]
    fn missing_samples_leave_the_model_as_it_was() {
        let mut h = hw(100, 5);
        feed(&mut h, 0, 150);
        let before = h.forecast(at(250.0)).unwrap();
        // Metrics are lost for 30 s: NaN, negative, absent.
        for s in 150..180 {
            let rate = [None, Some(f64::NAN), Some(-1.0), Some(f64::INFINITY)][s % 4];
            h.observe(at(s as f64), rate);
        }
        let after = h.forecast(at(250.0)).unwrap();
        assert!((before - after).abs() < 1e-9, "{before} then {after}");
        // And the shape is still known when they come back.
        feed(&mut h, 180, 225);
        assert!((h.forecast(at(250.0)).unwrap() - 20.0).abs() < 2.0);
    }

    #[test]
    fn zero_rates_forecast_zero_not_less() {
        let mut h = hw(100, 5);
        for s in 0..400 {
            // Busy in the first half of each day, nothing at all in the second.
            let rate = if s % 100 < 50 { 10.0 } else { 0.0 };
            h.observe(at(f64::from(s)), Some(rate));
        }
        for t in [400.0, 430.0, 460.0, 475.0, 490.0] {
            let f = h.forecast(at(t)).unwrap();
            assert!(f >= 0.0, "{t}: {f}");
        }
        let quiet = h.forecast(at(475.0)).unwrap();
        assert!(quiet < 0.5, "{quiet}");
        assert!((h.forecast(at(425.0)).unwrap() - 10.0).abs() < 1.0);
    }

    #[test]
    fn a_slot_unseen_in_the_first_season_counts_as_flat_until_seen() {
        let mut h = hw(100, 5);
        // The first day's samples stop at 50 s: slots 10..20 have none.
        feed(&mut h, 0, 50);
        h.observe(at(100.0), Some(2.0));
        h.observe(at(105.0), Some(2.0));
        assert!(h.is_seasonal());
        // 60 s is in an unseen slot: the level only (the mean of the slots seen: 7.22 req/s),
        // no made-up shape.
        let f = h.forecast(at(162.5)).unwrap();
        assert!((f - 7.22).abs() < 0.01, "{f}");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let bad = |s: HoltWintersSettings| HoltWintersConfig::try_new(s).unwrap_err();
        let d = HoltWintersSettings::default();
        assert_eq!(bad(HoltWintersSettings { slot: Duration::ZERO, ..d }).field, "slot");
        assert_eq!(bad(HoltWintersSettings { slot: Duration::from_secs(7), ..d }).field, "season");
        let e = bad(HoltWintersSettings { slot: d.season, ..d });
        assert_eq!(e.to_string(), "predictive.slot must split the season (86400s) in 2 to 100000 slots, got 1");
        assert_eq!(bad(HoltWintersSettings { slot: Duration::from_millis(500), ..d }).field, "slot");
        assert_eq!(bad(HoltWintersSettings { level: 0.0, ..d }).field, "level");
        assert_eq!(bad(HoltWintersSettings { trend: 1.5, ..d }).field, "trend");
        assert_eq!(bad(HoltWintersSettings { seasonal: f64::NAN, ..d }).field, "seasonal");
        assert_eq!(bad(HoltWintersSettings { damping: 0.0, ..d }).field, "damping");
        assert_eq!(HoltWintersConfig::try_new(d).unwrap().slots(), 288);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, rng_seed: RngSeed::Fixed(0x5EA5_0A11), ..ProptestConfig::default() })]

        /// Whatever the samples (gaps, NaN, zeros, huge, negative) and settings, the forecast is
        /// a finite rate of at least zero, at any horizon, and nothing panics.
        #[test]
        fn forecasts_are_finite_and_not_negative(
            samples in proptest::collection::vec(
                (0u64..120_000, prop_oneof![
                    Just(None),
                    Just(Some(f64::NAN)),
                    Just(Some(f64::INFINITY)),
                    Just(Some(0.0)),
                    (-1e3f64..1e3).prop_map(Some),
                    (0f64..1e9).prop_map(Some),
                ]),
                0..300,
            ),
            slots in 2u64..50,
            slot_ms in 1u64..5_000,
            level in 0.01f64..=1.0,
            trend in 0f64..=1.0,
            seasonal in 0f64..=1.0,
            damping in 0.01f64..=1.0,
            ahead_ms in proptest::collection::vec(0u64..10_000_000, 1..5),
        ) {
            let settings = HoltWintersSettings {
                season: Duration::from_millis(slot_ms * slots),
                slot: Duration::from_millis(slot_ms),
                level, trend, seasonal, damping,
            };
            let mut h = HoltWinters::new(HoltWintersConfig::try_new(settings).unwrap());
            let mut now = 0u64;
            for (gap, rate) in samples {
                now += gap;
                let t = Instant::from_millis(now);
                h.observe(t, rate);
                for &a in &ahead_ms {
                    if let Some(f) = h.forecast(t + Duration::from_millis(a)) {
                        prop_assert!(f.is_finite() && f >= 0.0, "{f}");
                    }
                }
            }
        }
    }
}
