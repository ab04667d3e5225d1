//! The CLI entry point as a real process: a crash fault exits with status 70, SIGTERM stops it
//! gracefully with status 0. The test binary runs itself as the child (an ignored helper test
//! that calls `fulcrum_mock::main`, the function `fulcrum mock-backend` calls).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;

const ARGS_ENV: &str = "FULCRUM_MOCK_CHILD_ARGS";
const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: fulcrum_mock::Args,
}

#[test]
#[ignore = "helper: the child process of the tests below"]
fn child() {
    let args = std::env::var(ARGS_ENV).expect("run by the tests below");
    let cli = Cli::parse_from(std::iter::once("mock-backend").chain(args.split(' ')));
    let code = fulcrum_mock::main(cli.args);
    assert_eq!(code, std::process::ExitCode::SUCCESS);
}

/// Starts the child with `args` and returns it with the address it prints.
fn spawn(args: &str) -> (Child, SocketAddr) {
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new(exe)
        .args(["cli::child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ARGS_ENV, args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the child starts");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + PATIENCE;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let addr = line.split("listening on http://").nth(1).and_then(|rest| rest.split_whitespace().next());
        if let Some(addr) = addr.and_then(|a| a.parse().ok()) {
            return (child, addr);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the child never said where it listens");
}

fn wait(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn post(addr: SocketAddr) -> String {
    let body = r#"{"model": "mock-llm", "prompt": "hi", "max_tokens": 1}"#;
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).expect("a timeout");
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

const FAST: &str = "--port 0 --itl-base-ms 1 --prefill-overhead-ms 0";

#[test]
fn a_crash_fault_exits_the_process_with_status_70() {
    let (mut child, addr) = spawn(&format!("{FAST} --crash-after-requests 2"));
    assert!(post(addr).starts_with("HTTP/1.1 200"));
    assert_eq!(post(addr), "", "the crashing request is not answered");
    let status = wait(&mut child);
    assert_eq!(status.code(), Some(fulcrum_mock::CRASH_EXIT_CODE));
}

#[test]
fn a_timed_crash_exits_the_process() {
    let (mut child, _) = spawn(&format!("{FAST} --crash-after-secs 0.2"));
    assert_eq!(wait(&mut child).code(), Some(fulcrum_mock::CRASH_EXIT_CODE));
}

#[cfg(unix)]
#[test]
fn sigterm_stops_the_process_gracefully() {
    let (mut child, addr) = spawn(FAST);
    assert!(post(addr).starts_with("HTTP/1.1 200"));
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    assert_eq!(wait(&mut child).code(), Some(0));
}
