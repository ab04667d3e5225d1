//! Checked settings: the error every validation in the core returns, and the checks they
//! share.

use std::time::Duration;

/// A setting was refused: which one, and why.
///
/// `section` and `field` are the names a configuration file uses, so the configuration
/// loader can point at the line (`pool.llama.health_check.rise`, `autoscale.max_replicas`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{section}.{field} {problem}")]
pub struct ConfigError {
    /// The group of settings: for failure handling `health_check`, `outlier_detection`,
    /// `circuit_breaker`, `limits`, `retry`, `retry_budget`, `admission`, `rate_limit`, or
    /// `pool` (for `panic_threshold`); for scaling `autoscale` (bounds), `target_tracking`,
    /// `threshold`, `knative` or `slo`.
    pub section: &'static str,
    /// The setting at fault, as configuration spells it (`rise`, `max_ejection_percent`).
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(section: &'static str, field: &'static str, problem: impl Into<String>) -> Self {
        ConfigError { section, field, problem: problem.into() }
    }
}

/// Checks shared by the settings of every module, for one section.
#[derive(Clone, Copy)]
pub(crate) struct Check {
    pub section: &'static str,
}

impl Check {
    pub(crate) fn err(&self, field: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.section, field, problem)
    }

    pub(crate) fn positive(&self, field: &'static str, value: u32) -> Result<u32, ConfigError> {
        if value == 0 { Err(self.err(field, "must be at least 1, got 0")) } else { Ok(value) }
    }

    pub(crate) fn positive_f64(&self, field: &'static str, value: f64) -> Result<f64, ConfigError> {
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(self.err(field, format!("must be a positive finite number, got {value}")))
        }
    }

    pub(crate) fn nonzero_duration(&self, field: &'static str, value: Duration) -> Result<Duration, ConfigError> {
        if value.is_zero() { Err(self.err(field, "must be longer than zero")) } else { Ok(value) }
    }

    pub(crate) fn percent(&self, field: &'static str, value: u32) -> Result<u32, ConfigError> {
        if value > 100 { Err(self.err(field, format!("must be between 0 and 100, got {value}"))) } else { Ok(value) }
    }
}
