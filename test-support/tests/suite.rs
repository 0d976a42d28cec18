//! The suite's private servers ([`gpu_coordinator_test_support::suite`]) end with the test process that
//! started them: stopped and their files removed when it exits, killed by the kernel when it is killed
//! (their files then removed by the next process that starts the suite's servers).
//!
//! Each test runs this binary again as a child (the test [`as_a_child`], with `SUITE_CHILD` set), which
//! starts the servers and then exits or waits to be killed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpu_coordinator_test_support::{children_of, process_name, process_runs, suite};

const CHILD: &str = "SUITE_CHILD";

/// How long the servers may take to start, and to go.
const DEADLINE: Duration = Duration::from_secs(30);

/// In a child only: starts the suite's servers, says so, then returns (`exit`) or waits until its
/// standard input closes, which the parent never does (`wait`: the parent kills it).
#[test]
fn as_a_child() {
    let Ok(mode) = std::env::var(CHILD) else {
        return;
    };
    let servers = suite::servers();
    assert!(!servers.named, "the child must start private servers");
    let pids: Vec<String> = servers_of(std::process::id())
        .iter()
        .map(u32::to_string)
        .collect();
    println!(
        "READY {} {} {} {}",
        servers.nats,
        servers.redis,
        servers.postgres,
        pids.join(",")
    );
    if mode == "wait" {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
}

/// Runs [`as_a_child`] in a child process in `mode`, with no `GPU_IT_*` variable set, and returns it
/// once it has started its servers, with the URLs and the servers' process ids it printed.
fn start_child(mode: &str) -> (Child, Vec<String>, Vec<u32>) {
    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--exact",
            "as_a_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, mode)
        .env_remove(suite::NATS_VAR)
        .env_remove(suite::REDIS_VAR)
        .env_remove(suite::POSTGRES_VAR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run this test binary again");
    let stdout = child.stdout.take().expect("the child's output");
    // Read to the end, so that the child never writes into a closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness may print the test's name on the same line first.
            if let Some((_, ready)) = line.split_once("READY ") {
                let _ = tx.send(ready.to_owned());
            }
        }
    });
    let ready = rx
        .recv()
        .expect("the child started its servers and said so");
    let words: Vec<String> = ready.split_whitespace().map(String::from).collect();
    let pids = words[3]
        .split(',')
        .map(|p| p.parse().expect("a process id"))
        .collect();
    (child, words[..3].to_vec(), pids)
}

/// The files under the temporary directory that the servers of process `pid` have.
fn files_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .expect("the temporary directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            ["nats_store_", "pg_cluster_"].iter().any(|prefix| {
                name.strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with(&format!("{pid}_")))
            })
        })
        .collect()
}

/// The three servers of process `pid`: a nats-server, a redis-server and a postgres, its own children.
fn servers_of(pid: u32) -> Vec<u32> {
    let servers = children_of(pid);
    let names: Vec<String> = servers.iter().filter_map(|p| process_name(*p)).collect();
    for want in ["nats-server", "redis-server", "postgres"] {
        assert!(
            names.iter().any(|n| n == want),
            "the process runs a {want} of its own (its children: {names:?})"
        );
    }
    servers
}

fn wait_until(what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "{what} after {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_servers_answer_and_end_with_a_process_that_exits() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let (mut child, urls, servers) = start_child("exit");
    assert!(urls[0].starts_with("nats://127.0.0.1:") && !urls[0].ends_with(":4222"));
    assert!(urls[1].starts_with("redis://127.0.0.1:") && !urls[1].ends_with(":6379"));
    assert!(urls[2].starts_with("postgres://postgres@127.0.0.1:") && !urls[2].ends_with(":5432"));
    let pid = child.id();
    let status = child.wait().expect("the child ends");
    assert!(status.success(), "the child passed");
    // Its exit stopped the servers and removed their files before the process ended.
    assert_eq!(files_of(pid), Vec::<String>::new(), "files left by {pid}");
    for server in servers {
        wait_until(&format!("server {server} of the child still runs"), || {
            !process_runs(server)
        });
    }
}

#[test]
fn the_servers_die_with_a_killed_process_and_the_next_run_removes_their_files() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let (mut child, _, servers) = start_child("wait");
    let pid = child.id();
    assert!(!files_of(pid).is_empty(), "the servers' files are there");
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    for server in servers {
        wait_until(
            &format!("server {server} of the killed child still runs"),
            || !process_runs(server),
        );
    }
    assert!(
        !files_of(pid).is_empty(),
        "a killed process removes nothing"
    );
    // The next process to start the suite's servers removes them.
    let (mut next, _, _) = start_child("exit");
    assert!(next.wait().expect("the next child ends").success());
    assert_eq!(files_of(pid), Vec::<String>::new(), "files left by {pid}");
}
