//! A real `redis-server` (Debian's package) on a loopback port chosen at run time, without
//! persistence, that tests can stop and start again on the same port.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// A running (or stopped) redis-server.
pub struct Redis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `requirepass`, when the server wants one.
    password: Option<String>,
    /// A TLS port as well, with this certificate and key (PEM files in `dir`).
    tls: Option<(u16, PathBuf, PathBuf)>,
}

/// `redis-server` on `PATH`, if installed.
fn find() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file())
    })
}

/// Starts redis-server, or returns `None` after a loud message when it is not installed
/// (panics instead when `CI` is set: `.ci/run` installs it).
pub async fn start(test: &str) -> Option<Redis> {
    start_with_password(test, None).await
}

/// Like [`start`], with `requirepass` set when `password` is given.
pub async fn start_with_password(test: &str, password: Option<&str>) -> Option<Redis> {
    let Some(bin) = find() else {
        let msg = "`redis-server` is not installed, so the Redis rate-limit tests cannot run. \
                   `.ci/run` installs it (apt-get install redis-server); locally: \
                   `apt-get install -y redis-server`.";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
        let bar = "!".repeat(78);
        let _ = writeln!(
            std::io::stderr(),
            "\n{bar}\n!!! SKIPPED {test} (CI not set): {msg}\n{bar}"
        );
        return None;
    };
    let port = super::util::free_port().await;
    let mut r = Redis {
        port,
        bin,
        dir: tempfile::tempdir().unwrap(),
        child: None,
        password: password.map(str::to_owned),
        tls: None,
    };
    r.start_again().await;
    Some(r)
}

/// Like [`start`], with a TLS port too, serving `cert_pem` with `key_pem` (no client
/// certificates asked for). The plain port stays for the test's own commands.
pub async fn start_tls(test: &str, cert_pem: &str, key_pem: &str) -> Option<Redis> {
    let mut r = start(test).await?;
    r.stop();
    let (cert, key) = (r.dir.path().join("cert.pem"), r.dir.path().join("key.pem"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    r.tls = Some((super::util::free_port().await, cert, key));
    r.start_again().await;
    Some(r)
}

impl Redis {
    /// `redis://127.0.0.1:PORT`, without credentials.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT`, when started with [`start_tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|(port, _, _)| format!("rediss://127.0.0.1:{port}"))
    }

    fn admin_url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.url(),
        }
    }

    /// Starts the server on its port and waits for PING.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut args: Vec<String> = Vec::new();
        if let Some(p) = &self.password {
            args.extend(["--requirepass".to_owned(), p.clone()]);
        }
        if let Some((port, cert, key)) = &self.tls {
            args.extend([
                "--tls-port".to_owned(),
                port.to_string(),
                "--tls-cert-file".to_owned(),
                cert.display().to_string(),
                "--tls-key-file".to_owned(),
                key.display().to_string(),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ]);
        }
        let child = Command::new(&self.bin)
            .args(&args)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping().await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True when the server answers PING.
    pub async fn ping(&self) -> bool {
        self.cmd(&["PING"]).await.is_ok()
    }

    /// Runs one command on a fresh connection.
    pub async fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.admin_url())?;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timeout")))??;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
