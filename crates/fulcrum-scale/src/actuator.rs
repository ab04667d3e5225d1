//! The one interface the autoscaler drives, and the error every actuator returns.

use std::future::Future;

use crate::command::{CommandActuator, CommandError};
use crate::kubernetes::{KubernetesActuator, KubernetesError};
use crate::local::{LocalActuator, LocalError};
use crate::replica::Replica;

/// Carries a replica count out: starts or stops processes, patches a Deployment, runs a command.
///
/// The autoscaler calls [`scale_to`](Actuator::scale_to) with a policy's
/// [`Decision::desired`](fulcrum_core::scale::Decision), and reads
/// [`observe`](Actuator::observe) back as the next tick's `Signals::replicas`.
///
/// **Drain first.** Scale-in removes the replicas with the highest indices (for a Deployment,
/// Kubernetes picks the pods). The caller must drain those replicas in the proxy (stop sending
/// them new requests and wait for their streams to end, bounded by the pool's drain timeout)
/// *before* it calls `scale_to(n - k)`: the actuator stops them at once, with a grace period
/// for the process, not for its requests.
///
/// The methods return futures that are `Send`, so the autoscaler can run on any runtime
/// thread; [`AnyActuator`] picks the implementation at run time, from configuration.
pub trait Actuator: Send {
    /// Brings the fleet to `replicas`. Returns once the change is under way: new replicas are
    /// started (readiness is reported later, through events or [`replicas`](Actuator::replicas)),
    /// and removed ones are gone (local) or asked to go (command, Kubernetes).
    fn scale_to(&mut self, replicas: u32) -> impl Future<Output = Result<(), ActuatorError>> + Send;

    /// The replica count as the actuator's target system sees it now.
    fn observe(&mut self) -> impl Future<Output = Result<Observed, ActuatorError>> + Send;

    /// The replicas this actuator supervises itself (local processes), by index; empty for the
    /// actuators that hand the count to another system.
    fn replicas(&self) -> Vec<Replica>;

    /// A short name for logs: `local`, `command`, `kubernetes` or `external`.
    fn kind(&self) -> &'static str;
}

/// The replica count an actuator's target system reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The count asked for (Kubernetes' `spec.replicas`); `None` when unknown (a command
    /// actuator before its first success).
    pub desired: Option<u32>,
    /// The replicas that exist now (Kubernetes' `status.replicas`, local replicas that are
    /// running); `None` when the actuator cannot tell.
    pub current: Option<u32>,
}

/// Why a scaling action failed.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    /// Local processes.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The external command.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The Kubernetes API.
    #[error(transparent)]
    Kubernetes(#[from] KubernetesError),
}

impl ActuatorError {
    /// Whether trying again later may succeed (a timeout, a refused connection, a server error,
    /// a conflict), as opposed to a mistake that needs a person (a missing Deployment, a
    /// command that says no, more replicas than ports).
    pub fn is_retryable(&self) -> bool {
        match self {
            ActuatorError::Local(e) => e.is_retryable(),
            ActuatorError::Command(e) => e.is_retryable(),
            ActuatorError::Kubernetes(e) => e.is_retryable(),
        }
    }
}

/// One of the actuators, chosen at run time.
#[derive(Debug)]
pub enum AnyActuator {
    /// Local processes.
    Local(LocalActuator),
    /// An external command.
    Command(CommandActuator),
    /// A Kubernetes Deployment.
    Kubernetes(KubernetesActuator),
    /// None: an outside autoscaler (KEDA) reads the decision from the admin API and acts.
    External,
}

impl Actuator for AnyActuator {
    async fn scale_to(&mut self, replicas: u32) -> Result<(), ActuatorError> {
        match self {
            AnyActuator::Local(a) => a.scale_to(replicas).await,
            AnyActuator::Command(a) => a.scale_to(replicas).await,
            AnyActuator::Kubernetes(a) => a.scale_to(replicas).await,
            AnyActuator::External => Ok(()),
        }
    }

    async fn observe(&mut self) -> Result<Observed, ActuatorError> {
        match self {
            AnyActuator::Local(a) => a.observe().await,
            AnyActuator::Command(a) => a.observe().await,
            AnyActuator::Kubernetes(a) => a.observe().await,
            AnyActuator::External => Ok(Observed::default()),
        }
    }

    fn replicas(&self) -> Vec<Replica> {
        match self {
            AnyActuator::Local(a) => a.replicas(),
            AnyActuator::Command(a) => a.replicas(),
            AnyActuator::Kubernetes(a) => a.replicas(),
            AnyActuator::External => Vec::new(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            AnyActuator::Local(a) => a.kind(),
            AnyActuator::Command(a) => a.kind(),
            AnyActuator::Kubernetes(a) => a.kind(),
            AnyActuator::External => "external",
        }
    }
}
