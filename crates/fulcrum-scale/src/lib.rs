//! Fulcrum's autoscaler runtime: the actuators that carry a replica count out.
//!
//! A scaling policy in `fulcrum-core` ([`fulcrum_core::scale`]) decides how many replicas a
//! pool should have; an [`Actuator`] makes it so:
//!
//! | actuator | what `scale_to(n)` does | replicas it reports |
//! | --- | --- | --- |
//! | [`LocalActuator`] | starts and supervises child processes from a command template (`{port}`, `{index}`), restarts crashed ones with backoff, gives up past a restart intensity, stops the highest indices on scale-in | each one: address, state, pid, restarts |
//! | [`CommandActuator`] | runs an external command with `{replicas}`, bounded by a timeout | none |
//! | [`KubernetesActuator`] | patches a Deployment's `scale` subresource (plain HTTP: `kubectl proxy`) | none (Kubernetes does) |
//!
//! The [`autoscaler`] drives one of them each tick: read the pool's load and meter it into
//! signals, ask the policy, drain the replicas that scale-in will remove from the pool, then
//! [`Actuator::scale_to`]; and it registers the ready local replicas in the pool. The pool is
//! a [`ScaledPool`], a small trait that the crate owning the pool (the `fulcrum` binary, over
//! the proxy's pools) implements.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use fulcrum_scale::{Actuator, CommandActuator, CommandConfig, CommandSettings};
//!
//! let mut actuator = CommandActuator::new(CommandConfig::try_new(CommandSettings::new("true {replicas}")).unwrap());
//! actuator.scale_to(2).await.unwrap();
//! assert_eq!(actuator.observe().await.unwrap().desired, Some(2));
//! # }
//! ```
//!
//! Decisions (signals, policies, backoff and restart intensity in `fulcrum_core::scale`; port
//! choice here) are pure and take the time as an argument; this crate holds the effects
//! (processes, signals, timers, HTTP). It must never depend on the proxy or the control plane:
//! they drive it, through the [`ScaledPool`] and [`Actuator`] traits and the event channel.

pub mod actuator;
pub mod autoscaler;
pub mod command;
pub mod kubernetes;
pub mod local;
pub mod pool;
pub mod ports;
mod process;
pub mod replica;
pub mod template;

/// The restart decision, from the core (where the simulator uses it too).
pub use fulcrum_core::scale::restart;

pub use actuator::{Actuator, ActuatorError, AnyActuator, Observed};
pub use command::{CommandActuator, CommandConfig, CommandError, CommandSettings};
pub use kubernetes::{KubernetesActuator, KubernetesError, KubernetesSettings};
pub use local::{LocalActuator, LocalConfig, LocalError, LocalSettings, Output, Readiness};
pub use pool::{PoolError, ScaledPool};
pub use replica::{Event, EventKind, EventSink, Exit, Replica, ReplicaState};
