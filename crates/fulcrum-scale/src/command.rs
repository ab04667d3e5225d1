//! The external command actuator: runs a configured command with the desired replica count.
//!
//! For fleets that something else manages (a cloud autoscaling group, Nomad, a script around
//! `docker compose up --scale`): `scale_to(n)` runs the command template with `{replicas}`
//! replaced by `n` (split into words without a shell: see [`template`](crate::template) for
//! the quoting rules), waits for it at most `timeout`, and succeeds when it exits with status 0.
//! Anything else is a [`CommandError`] that names the command and ends with its standard error
//! (the last 4 KiB). Its standard input is empty and its standard output discarded; the process
//! (and whatever it started in its process group) is killed when it runs past the timeout.
//!
//! ```no_run
//! # async fn example() -> Result<(), fulcrum_scale::ActuatorError> {
//! use fulcrum_scale::{Actuator, CommandActuator, CommandConfig, CommandSettings};
//!
//! let settings = CommandSettings::new("sh -c 'docker compose up -d --scale llm={replicas}'");
//! let mut actuator = CommandActuator::new(CommandConfig::try_new(settings).unwrap());
//! actuator.scale_to(3).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

use crate::actuator::{Actuator, ActuatorError, Observed};
use crate::process::{self, Group, Tail};
use crate::replica::Replica;
use crate::template::{CommandTemplate, TemplateError};

/// The placeholders a command template may use.
pub const PLACEHOLDERS: &[&str] = &["replicas"];

/// How much of the command's standard error an error keeps.
const STDERR_LIMIT: usize = 4096;

/// How long the command's standard error may stay open after it exited (a child it left in the
/// background may hold it).
const STDERR_LINGER: Duration = Duration::from_millis(500);

/// Command actuator settings as written, with their defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSettings {
    /// The command line; `{replicas}` is replaced by the count. Required.
    pub command: String,
    /// How long the command may run (60 s).
    pub timeout: Duration,
    /// Environment variables added to the command's (values may hold `{replicas}`).
    pub env: Vec<(String, String)>,
    /// The directory to run it in (the current one).
    pub dir: Option<PathBuf>,
}

impl CommandSettings {
    /// `command` with the default settings.
    pub fn new(command: impl Into<String>) -> Self {
        CommandSettings { command: command.into(), timeout: Duration::from_secs(60), env: Vec::new(), dir: None }
    }
}

/// A command setting was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandConfigError {
    /// The command line does not parse.
    #[error("command: {0}")]
    Command(#[source] TemplateError),
    /// An environment value does not parse.
    #[error("env.{name}: {source}")]
    Env {
        /// The variable.
        name: String,
        /// Why.
        #[source]
        source: TemplateError,
    },
    /// The timeout is zero.
    #[error("timeout must be longer than zero")]
    Timeout,
}

/// Validated command actuator settings.
#[derive(Clone, Debug)]
pub struct CommandConfig {
    command: CommandTemplate,
    timeout: Duration,
    env: Vec<(String, CommandTemplate)>,
    dir: Option<PathBuf>,
}

impl CommandConfig {
    /// Parses the command line and checks the settings.
    pub fn try_new(s: CommandSettings) -> Result<Self, CommandConfigError> {
        let command = CommandTemplate::parse(&s.command, PLACEHOLDERS).map_err(CommandConfigError::Command)?;
        if s.timeout.is_zero() {
            return Err(CommandConfigError::Timeout);
        }
        let env = parse_env(s.env, PLACEHOLDERS).map_err(|(name, source)| CommandConfigError::Env { name, source })?;
        Ok(CommandConfig { command, timeout: s.timeout, env, dir: s.dir })
    }
}

/// Parses environment values as one-word templates (quotes in them are kept as written).
pub(crate) fn parse_env(
    env: Vec<(String, String)>,
    known: &[&str],
) -> Result<Vec<(String, CommandTemplate)>, (String, TemplateError)> {
    env.into_iter()
        .map(|(name, value)| {
            // A whole value is one word: quote it so that blanks and quotes stay as written.
            let quoted = format!("'{}'", value.replace('\'', r"'\''"));
            match CommandTemplate::parse(&quoted, known) {
                Ok(t) => Ok((name, t)),
                Err(e) => Err((name, e)),
            }
        })
        .collect()
}

/// Why the command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line, expanded.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited with a status other than 0.
    #[error("`{command}` failed ({status}){}", stderr_suffix(stderr))]
    Failed {
        /// The command line, expanded.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// The end of its standard error.
        stderr: String,
    },
    /// It ran past the timeout and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed{}", stderr_suffix(stderr))]
    TimedOut {
        /// The command line, expanded.
        command: String,
        /// The timeout.
        timeout: Duration,
        /// The end of its standard error.
        stderr: String,
    },
    /// Waiting for it failed.
    #[error("waiting for `{command}`: {source}")]
    Wait {
        /// The command line, expanded.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() { String::new() } else { format!(": {stderr}") }
}

impl CommandError {
    /// Timeouts may pass; a command that says no or does not exist needs a person.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CommandError::TimedOut { .. })
    }
}

/// Runs a command with the desired count; see the [module](self) docs.
#[derive(Debug)]
pub struct CommandActuator {
    config: CommandConfig,
    last: Option<u32>,
}

// === impl CommandActuator ===

impl CommandActuator {
    /// An actuator that has not run its command yet.
    pub fn new(config: CommandConfig) -> Self {
        CommandActuator { config, last: None }
    }

    async fn run(&self, replicas: u32) -> Result<(), CommandError> {
        let count = replicas.to_string();
        let values = [("replicas", count.as_str())];
        let argv = self.config.command.expand(&values);
        let shown = display_argv(&argv);
        let (program, args) = argv.split_first().unwrap_or((&shown, &[]));
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for (name, value) in &self.config.env {
            cmd.env(name, value.expand(&values).concat());
        }
        if let Some(dir) = &self.config.dir {
            cmd.current_dir(dir);
        }
        let child = process::isolate(&mut cmd)
            .spawn()
            .map_err(|source| CommandError::Spawn { command: shown.clone(), source })?;
        let mut group = Group::new(child);
        let tail = Tail::default();
        let reader = group.child_mut().stderr.take().map(|stderr| {
            let tail = tail.clone();
            tokio::spawn(async move { tail.read(stderr, STDERR_LIMIT).await })
        });
        let outcome = tokio::time::timeout(self.config.timeout, group.wait()).await;
        if outcome.is_err() {
            group.kill().await;
        }
        if let Some(mut reader) = reader
            && tokio::time::timeout(STDERR_LINGER, &mut reader).await.is_err()
        {
            reader.abort();
        }
        let stderr = tail.text();
        match outcome {
            Err(_) => Err(CommandError::TimedOut { command: shown, timeout: self.config.timeout, stderr }),
            Ok(Err(source)) => Err(CommandError::Wait { command: shown, source }),
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(CommandError::Failed { command: shown, status, stderr }),
        }
    }
}

impl Actuator for CommandActuator {
    async fn scale_to(&mut self, replicas: u32) -> Result<(), ActuatorError> {
        self.run(replicas).await?;
        self.last = Some(replicas);
        Ok(())
    }

    /// The count of the last command that succeeded; the command actuator cannot see more.
    async fn observe(&mut self) -> Result<Observed, ActuatorError> {
        Ok(Observed { desired: self.last, current: None })
    }

    fn replicas(&self) -> Vec<Replica> {
        Vec::new()
    }

    fn kind(&self) -> &'static str {
        "command"
    }
}

/// Words joined for a message, each quoted when it holds a blank or a quote.
pub(crate) fn display_argv(argv: &[String]) -> String {
    struct Word<'a>(&'a str);
    impl fmt::Display for Word<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if !self.0.is_empty() && !self.0.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"' || c == '\\')
            {
                f.write_str(self.0)
            } else {
                write!(f, "'{}'", self.0.replace('\'', r"'\''"))
            }
        }
    }
    argv.iter().map(|w| Word(w).to_string()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::split;

    #[test]
    fn argv_display_round_trips_through_the_splitter() {
        let argv: Vec<String> = ["sh", "-c", "echo 'hi' > \"f g\"", "", "plain"].map(String::from).into();
        let shown = display_argv(&argv);
        assert_eq!(shown, r#"sh -c 'echo '\''hi'\'' > "f g"' '' plain"#);
        assert_eq!(split(&shown).unwrap(), argv);
    }

    #[test]
    fn settings_are_checked() {
        let bad = |s: CommandSettings| CommandConfig::try_new(s).unwrap_err().to_string();
        assert_eq!(
            bad(CommandSettings::new("scale {count}")),
            "command: unknown placeholder {count} (known: {replicas})"
        );
        assert_eq!(bad(CommandSettings::new("")), "command: the command is empty");
        assert_eq!(
            bad(CommandSettings { timeout: Duration::ZERO, ..CommandSettings::new("x") }),
            "timeout must be longer than zero"
        );
        let env = vec![("N".to_owned(), "{n}".to_owned())];
        assert_eq!(
            bad(CommandSettings { env, ..CommandSettings::new("x") }),
            "env.N: unknown placeholder {n} (known: {replicas})"
        );
    }

    #[test]
    fn env_values_stay_whole() {
        let env = parse_env(vec![("A".into(), "it's \"{replicas}\" x".into())], PLACEHOLDERS).unwrap();
        assert_eq!(env[0].1.expand(&[("replicas", "4")]), ["it's \"4\" x"]);
    }
}
