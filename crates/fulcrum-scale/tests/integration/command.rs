//! The external command actuator with real commands.

use std::time::{Duration, Instant};

use fulcrum_scale::{Actuator, ActuatorError, CommandActuator, CommandConfig, CommandError, CommandSettings};

fn actuator(command: &str, timeout: Duration) -> CommandActuator {
    let settings = CommandSettings { timeout, ..CommandSettings::new(command) };
    CommandActuator::new(CommandConfig::try_new(settings).expect("config"))
}

fn command_error(e: ActuatorError) -> CommandError {
    match e {
        ActuatorError::Command(e) => e,
        other => panic!("expected a command error, got {other:?}"),
    }
}

#[tokio::test]
async fn runs_the_command_with_the_count() {
    let file = std::env::temp_dir().join(format!("fulcrum-scale-command-{}.txt", std::process::id()));
    let command = format!("sh -c 'echo {{replicas}} > \"$0\"' '{}'", file.display());
    let mut a = actuator(&command, Duration::from_secs(10));
    assert_eq!(a.observe().await.expect("observe").desired, None);
    a.scale_to(3).await.expect("scale to 3");
    assert_eq!(std::fs::read_to_string(&file).expect("written").trim(), "3");
    a.scale_to(0).await.expect("scale to 0");
    assert_eq!(std::fs::read_to_string(&file).expect("written").trim(), "0");
    assert_eq!(a.observe().await.expect("observe").desired, Some(0));
    assert!(a.replicas().is_empty());
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn a_failing_command_is_named_with_its_stderr() {
    let mut a = actuator("sh -c 'echo \"no capacity for $0\" >&2; exit 4' {replicas}", Duration::from_secs(10));
    let err = command_error(a.scale_to(7).await.unwrap_err());
    match &err {
        CommandError::Failed { command, status, stderr } => {
            assert_eq!(command, "sh -c 'echo \"no capacity for $0\" >&2; exit 4' 7");
            assert_eq!(status.code(), Some(4));
            assert_eq!(stderr, "no capacity for 7");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "`sh -c 'echo \"no capacity for $0\" >&2; exit 4' 7` failed (exit status: 4): no capacity for 7"
    );
    assert!(!err.is_retryable());
    assert_eq!(a.observe().await.expect("observe").desired, None, "a failure changes nothing");
}

#[tokio::test]
async fn stderr_is_bounded() {
    let mut a =
        actuator("sh -c 'head -c 100000 /dev/zero | tr \"\\0\" x >&2; echo END >&2; exit 1'", Duration::from_secs(10));
    match command_error(a.scale_to(1).await.unwrap_err()) {
        CommandError::Failed { stderr, .. } => {
            assert!(stderr.len() <= 4096 + 3, "{} bytes kept", stderr.len());
            assert!(stderr.starts_with("...xxx") && stderr.ends_with("xxxEND"), "{:?}", &stderr[stderr.len() - 20..]);
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_slow_command_is_killed_at_the_timeout() {
    let mut a = actuator("sh -c 'echo waiting >&2; sleep 30'", Duration::from_millis(300));
    let started = Instant::now();
    let err = command_error(a.scale_to(2).await.unwrap_err());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(matches!(&err, CommandError::TimedOut { stderr, .. } if stderr == "waiting"), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("did not finish within 300ms and was killed: waiting"), "{err}");
}

#[tokio::test]
async fn a_missing_program_is_a_spawn_error() {
    let mut a = actuator("/nonexistent/scale-fleet --to {replicas}", Duration::from_secs(10));
    let err = command_error(a.scale_to(2).await.unwrap_err());
    assert!(matches!(err, CommandError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().starts_with("cannot run `/nonexistent/scale-fleet --to 2`: "), "{err}");
}
