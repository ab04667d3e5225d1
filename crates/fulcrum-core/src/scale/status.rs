//! Where a pool's autoscaler stands, as the admin API, the dashboard, `/metrics` and KEDA's
//! `metrics-api` scaler read it: plain data, written by the autoscaler at every tick.

use super::Forecast;

/// The autoscaler's last tick.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleStatus {
    /// What acts on the decisions: `local`, `command`, `kubernetes` or `external`.
    pub actuator: &'static str,
    /// The policy's bounds.
    pub min_replicas: u32,
    /// The policy's bounds.
    pub max_replicas: u32,
    /// The replica count the decision started from: the count last asked for (a Deployment's
    /// `spec.replicas`), whether or not they serve yet.
    pub replicas: u32,
    /// The count the policy wants now.
    pub desired: u32,
    /// Why, in words (the policy's reason).
    pub reason: String,
    /// A predictive policy's view ahead.
    pub forecast: Option<Forecast>,
}
