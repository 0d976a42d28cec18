//! A private Postgres cluster, and a streaming standby of it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{children_of, free_port, process_runs, unique, Owned, START_WAIT};

/// A private Postgres cluster (initdb) on a free port, in a temporary directory, stopped and removed on
/// drop. Run as the `postgres` user when the tests run as root (initdb refuses root).
///
/// [`PgServer::standby`] makes a streaming standby of it (`pg_basebackup -R`), which
/// [`PgServer::promote`] turns into a primary, as after [`PgServer::kill`] of the primary.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    /// Its WAL, where it is not under `dir`.
    wal: Option<PathBuf>,
    /// The server's log, outside its data directory (which may be on a disk that fills).
    log: PathBuf,
    bin: PathBuf,
    as_root: bool,
    /// The server's process, where this process started it itself ([`PgServer::start_tied`]);
    /// `pg_ctl` starts the others.
    postmaster: Owned,
}

impl PgServer {
    pub fn start() -> PgServer {
        Self::start_in(&std::env::temp_dir())
    }

    /// A private Postgres whose data directory (WAL included) is a new directory under `parent` (a
    /// small disk of the test's own, say). Its WAL segments are of 1 MiB, so that a cluster fits in
    /// some 30 MiB.
    pub fn start_in(parent: &Path) -> PgServer {
        Self::start_at(parent, None)
    }

    /// [`PgServer::start_in`], its WAL (`pg_wal`) in a new directory under `wal_parent` instead.
    pub fn start_with_wal_in(parent: &Path, wal_parent: &Path) -> PgServer {
        Self::start_at(parent, Some(wal_parent))
    }

    fn start_at(parent: &Path, wal_parent: Option<&Path>) -> PgServer {
        let server = Self::init_at(parent, wal_parent);
        server.resume();
        server
    }

    /// A private server killed with the thread that starts it ([`suite`]'s, which lasts as long as
    /// the process): `postgres` itself is that thread's child (`pg_ctl` would detach it), with room
    /// for a whole suite's connections.
    pub(crate) fn start_tied() -> PgServer {
        use std::os::unix::process::CommandExt;
        let mut server = Self::init_at(&std::env::temp_dir(), None);
        server.postmaster.tied = true;
        let mut cmd = Command::new(server.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&server.dir)
            .args(["-p", &server.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", server.dir.display()))
            .args(["-c", "fsync=off", "-c", "max_connections=300"]);
        if server.as_root {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .expect("id postgres");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("the postgres user's ids")
            };
            cmd.gid(id("-g")).uid(id("-u"));
        }
        server.postmaster.respawn(cmd, server.port);
        let start = Instant::now();
        while !server.accepting() {
            assert!(start.elapsed() < START_WAIT, "postgres did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// A new cluster (`initdb`), not started.
    fn init_at(parent: &Path, wal_parent: Option<&Path>) -> PgServer {
        let mut server = PgServer::empty_in(parent, "pg_cluster");
        server.wal = wal_parent.map(|p| p.join(unique("pg_wal")));
        let mut initdb = vec![
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "--wal-segsize=1",
            "-E",
            "UTF8",
        ];
        let waldir = server
            .wal
            .as_ref()
            .map(|w| w.to_string_lossy().into_owned());
        if let Some(waldir) = &waldir {
            initdb.extend(["-X", waldir.as_str()]);
        }
        initdb.push("-D");
        server.run("initdb", &initdb, true);
        server
    }

    /// A server not made yet: its tools, a free port and an empty directory (owned by `postgres`
    /// when running as root).
    fn empty(tag: &str) -> PgServer {
        Self::empty_in(&std::env::temp_dir(), tag)
    }

    /// [`PgServer::empty`], its directory under `parent`; its log outside it (the directory may be on
    /// a disk that fills).
    fn empty_in(parent: &Path, tag: &str) -> PgServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Postgres under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let dir = parent.join(unique(tag));
        std::fs::create_dir_all(&dir).expect("create the cluster dir");
        let server = PgServer {
            port: free_port(),
            dir,
            wal: None,
            log: std::env::temp_dir().join(format!("{}.log", unique("pg_log"))),
            bin,
            as_root,
            postmaster: Owned::default(),
        };
        if as_root {
            server.run("chown", &["-R", "postgres:postgres"], true);
            std::fs::File::create(&server.log).expect("the log file can be made");
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&server.log)
                .status();
        }
        server
    }

    /// A streaming standby of this server, started on a port of its own: a base backup
    /// (`pg_basebackup -R`, which writes `primary_conninfo` and `standby.signal`), replaying what the
    /// primary writes. It is asynchronous until [`PgServer::set_synchronous`] on the primary.
    pub fn standby(&self) -> PgServer {
        let standby = PgServer::empty("pg_standby");
        let port = self.port.to_string();
        standby.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
                "-D",
            ],
            true,
        );
        // Postgres starts only on a directory of its owner alone; it was made with the default mode.
        std::fs::set_permissions(
            &standby.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("the standby's directory made private");
        standby.resume();
        standby
    }

    /// Runs `sql` on the `postgres` database through `psql`, failing the test if it fails; its
    /// output, unaligned, without headers (`-At`).
    pub fn sql(&self, sql: &str) -> String {
        self.sql_on("postgres", sql)
    }

    /// [`PgServer::sql`] on `database`.
    pub fn sql_on(&self, database: &str, sql: &str) -> String {
        self.try_sql_on(database, sql)
            .unwrap_or_else(|e| panic!("{sql} failed: {e}"))
    }

    /// [`PgServer::sql_on`], its failure (the server's message) returned.
    pub fn try_sql_on(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
            ])
            .arg(sql)
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Polls `sql` on `database` until it answers `want` (a failure, as of a database not made
    /// yet, counts as another answer), for at most `START_WAIT` (20 s).
    pub fn wait_for_on(&self, database: &str, sql: &str, want: &str) {
        let start = Instant::now();
        loop {
            let got = self.try_sql_on(database, sql);
            if got.as_deref() == Ok(want) {
                return;
            }
            assert!(
                start.elapsed() < START_WAIT,
                "{sql} answers {got:?}, not {want:?}, after {START_WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`PgServer::wait_for_on`] the `postgres` database.
    pub fn wait_for(&self, sql: &str, want: &str) {
        self.wait_for_on("postgres", sql, want)
    }

    /// On a primary: with `true`, a commit waits until a standby has it on disk
    /// (`synchronous_standby_names = '*'`), and this returns once one streams synchronously; with
    /// `false`, commits wait for no standby.
    pub fn set_synchronous(&self, on: bool) {
        let names = if on { "*" } else { "" };
        self.sql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
        ));
        self.sql("SELECT pg_reload_conf()");
        if on {
            self.wait_for(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                "1",
            );
        }
    }

    /// On a standby: stops receiving the primary's WAL (`primary_conninfo` emptied), and returns
    /// once its receiver has stopped. What the primary commits from then on is missing here, as on a
    /// standby that fell behind.
    pub fn stop_receiving(&self) {
        self.sql("ALTER SYSTEM SET primary_conninfo = ''");
        self.sql("SELECT pg_reload_conf()");
        self.wait_for("SELECT count(*) FROM pg_stat_wal_receiver", "0");
    }

    /// On a standby: makes it a primary (`pg_ctl promote`), and returns once it takes writes.
    pub fn promote(&self) {
        self.run("pg_ctl", &["-w", "promote", "-D"], true);
        self.wait_for("SELECT pg_is_in_recovery()", "f");
    }

    /// Kills the server with SIGKILL, the postmaster first (so that it restarts nothing), then every
    /// process it started, as the loss of its machine would; returns once the postmaster is gone.
    pub fn kill(&self) {
        let pid_file = self.dir.join("postmaster.pid");
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
        else {
            return;
        };
        let children = children_of(pid);
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        for child in children {
            let _ = Command::new("kill")
                .args(["-KILL", &child.to_string()])
                .status();
        }
        let start = Instant::now();
        while process_runs(pid) {
            assert!(start.elapsed() < START_WAIT, "postmaster {pid} still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
        // So that `pg_ctl` finds no server, whatever runs under that id later.
        let _ = std::fs::remove_file(pid_file);
    }

    /// A Postgres tool (or `chown`), as the `postgres` user when running as root.
    fn command(&self, tool: &str) -> Command {
        let program = if tool == "chown" {
            PathBuf::from("chown")
        } else {
            self.bin.join(tool)
        };
        if self.as_root && tool != "chown" {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Runs a tool with the cluster directory as its last argument, failing the test if it fails.
    fn run(&self, tool: &str, args: &[&str], dir_last: bool) {
        let mut cmd = self.command(tool);
        cmd.args(args);
        if dir_last {
            cmd.arg(&self.dir);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "{tool} failed: {}\nthe server's log ends with:\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// A URL for a database on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// What the server wrote to its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the server runs and accepts connections (`pg_isready`).
    pub fn accepting(&self) -> bool {
        self.command("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Whether the server's process runs (`pg_ctl status`): not once it shut down by itself (after a
    /// crash it could not recover from).
    pub fn running(&self) -> bool {
        self.command("pg_ctl")
            .args(["status", "-D"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the server at once (`-m immediate`, like a crash).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-m", "immediate", "-w", "stop", "-D"], true);
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = &self.log;
        self.run(
            "pg_ctl",
            &[
                "-w",
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "start",
                "-D",
            ],
            true,
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-m", "immediate", "-w", "stop", "-D"])
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(wal) = &self.wal {
            let _ = std::fs::remove_dir_all(wal);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
