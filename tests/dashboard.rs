//! The admin dashboard rendered by a real headless Chromium against a real gateway: the page
//! must show the route, service and endpoint figures that `/status` and `/health` report.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it). Without it the test fails when `CI` is
//! set, and otherwise prints a loud notice and returns, so local `cargo test` keeps working.

mod support;

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::consul::{ConsulEmulator, EmulatorOptions};
use support::gateway::{client, eventually, start};
use support::upstream::TestUpstream;
use tokio::time::Instant;

/// Requests sent through the gateway before the page is rendered.
const SENT: u64 = 7;
/// Upper bound for one Chromium run (it normally takes about a second).
const CHROMIUM_LIMIT: Duration = Duration::from_secs(30);

/// `chromium` on `PATH`, if installed.
fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `extra` arguments and a fresh profile; returns stdout.
/// Polls for exit (bounded) instead of blocking the runtime that serves the gateway.
async fn chromium(bin: &Path, url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (out_dir.path().join("stdout"), out_dir.path().join("stderr"));
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-dev-shm-usage",
            "--no-proxy-server",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut status = None;
    let exited = eventually(CHROMIUM_LIMIT, || {
        status = child.try_wait().expect("waiting for chromium");
        std::future::ready(status.is_some())
    })
    .await;
    let stderr = || std::fs::read_to_string(&err_path).unwrap_or_default();
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "chromium did not finish within {CHROMIUM_LIMIT:?}; stderr:\n{}",
            stderr()
        );
    }
    let status = status.unwrap();
    assert!(
        status.success(),
        "chromium failed ({status}); stderr:\n{}",
        stderr()
    );
    std::fs::read_to_string(&out_path).unwrap()
}

/// The `<tr ...>...</tr>` whose opening tag contains `marker` (e.g. `data-route="api"`).
fn row<'a>(dom: &'a str, marker: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no element with {marker} in the rendered page:\n{dom}"));
    let start = dom[..at].rfind("<tr").expect("marker is not on a <tr>");
    let end = at + dom[at..].find("</tr>").expect("unterminated row");
    &dom[start..end]
}

/// The text of the cell `data-field="NAME"` in `row`, tags stripped and entities decoded.
fn field(row: &str, name: &str) -> String {
    let marker = format!("data-field=\"{name}\"");
    let at = row
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker} in row:\n{row}"));
    let open_end = at + row[at..].find('>').unwrap() + 1;
    let close = open_end + row[open_end..].find("</td>").expect("unterminated cell");
    let mut text = String::new();
    let mut in_tag = false;
    for c in row[open_end..close].chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .trim()
        .to_owned()
}

fn number(text: &str, what: &str) -> f64 {
    text.parse()
        .unwrap_or_else(|_| panic!("{what}: expected a number on the page, got {text:?}"))
}

/// The inner text of the element with `id="ID"` (no nested tags expected).
fn by_id<'a>(dom: &'a str, id: &str) -> (&'a str, &'a str) {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the rendered page"));
    let start = dom[..at].rfind('<').unwrap();
    let open_end = at + dom[at..].find('>').unwrap();
    let close = open_end + dom[open_end..].find('<').unwrap();
    (&dom[start..=open_end], &dom[open_end + 1..close])
}

/// Chromium, or `None` after a loud notice when it is missing and `CI` is not set (with `CI`
/// set a missing Chromium fails the test).
fn chromium_or_skip() -> Option<PathBuf> {
    let found = find_chromium();
    if found.is_none() {
        let msg = "`chromium` is not installed, so the dashboard test cannot run. \
                   `.ci/run` installs it (apt-get install chromium); locally: \
                   `apt-get install -y chromium`.";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
        let bar = "!".repeat(78);
        let _ = writeln!(
            std::io::stderr(),
            "\n{bar}\n!!! SKIPPED dashboard test (CI not set): {msg}\n{bar}"
        );
    }
    found
}

async fn health(admin_url: &str) -> Value {
    client()
        .get(admin_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_live_figures_in_headless_chromium() {
    let started = Instant::now();
    let Some(bin) = chromium_or_skip() else {
        return;
    };

    let up = TestUpstream::builder().name("dash-up").start().await;
    // Weight 0: listed, but excluded from balancing, so the page must say why.
    let idle = TestUpstream::builder().name("dash-idle").start().await;
    let gw = start(&format!(
        r#"
        [[routes]]
        name = "dash-route"
        path = "/dash"
        targets = ["{}", {{ url = "{}", weight = 0 }}]
        load_balancer = "round_robin"
        "#,
        up.url(),
        idle.url()
    ))
    .await;

    let c = client();
    for i in 0..SENT {
        let resp = c.get(gw.url(&format!("/dash/{i}"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "dash-up");
    }
    assert_eq!(up.hits() as u64, SENT);
    assert_eq!(idle.hits(), 0);
    // Counters are recorded when the response completes; wait until /health shows them all.
    let health_url = gw.admin_url("/health");
    assert!(
        eventually(Duration::from_secs(5), || async {
            health(&health_url).await["routes"][0]["requests"].as_u64() >= Some(SENT)
        })
        .await,
        "/health never counted the {SENT} requests"
    );
    let status: Value = c
        .get(gw.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let service = status["routes"][0]["service"].as_str().unwrap().to_owned();

    // --- Rendered DOM -------------------------------------------------------------------
    let dashboard = gw.admin_url("/dashboard");
    let dom = chromium(&bin, &dashboard, &["--dump-dom"]).await;
    let after: Value = health(&health_url).await;

    // The first poll succeeded: timestamp set, no error banner.
    let (_, updated) = by_id(&dom, "last-updated");
    assert!(
        !updated.is_empty() && updated != "never",
        "last updated: {updated:?}"
    );
    let (banner, _) = by_id(&dom, "error-banner");
    assert!(
        banner.contains("hidden"),
        "error banner shown: {banner}\n{dom}"
    );
    let (_, overall) = by_id(&dom, "overall-status");
    assert_eq!(overall, "healthy");

    // Routes: name, path, service, balancer, counts, rate, success, latency.
    assert!(dom.contains("id=\"routes\""));
    let r = row(&dom, "data-route=\"dash-route\"");
    assert_eq!(field(r, "name"), "dash-route");
    assert_eq!(field(r, "path"), "/dash");
    assert_eq!(field(r, "service"), service);
    assert_eq!(field(r, "balancer"), "round_robin");
    let shown = number(&field(r, "requests"), "route requests");
    let now = after["routes"][0]["requests"].as_u64().unwrap() as f64;
    assert!(
        shown >= SENT as f64 && shown <= now,
        "route requests on the page: {shown}, sent {SENT}, /health now {now}"
    );
    assert_eq!(field(r, "failures"), "0");
    // Several polls ran within the virtual time budget, so a rate was computed.
    let rps = number(&field(r, "rps"), "route req/s");
    assert!(rps >= 0.0, "req/s {rps}");
    assert_eq!(field(r, "success_rate"), "100%");
    let latency = field(r, "latency");
    assert!(
        latency == "\u{2014}" || (latency.contains(" / ") && latency.ends_with(" ms")),
        "latency cell: {latency:?}"
    );
    if after["routes"][0]["latency_ms"].is_object() {
        assert_ne!(
            latency, "\u{2014}",
            "/health reports latency but the page does not"
        );
    }

    // Services: static source, 1 of 2 endpoints available, no Consul sync.
    assert!(dom.contains("id=\"services\""));
    let s = row(&dom, &format!("data-service=\"{service}\""));
    assert_eq!(field(s, "name"), service);
    assert_eq!(field(s, "source"), "static");
    assert_eq!(field(s, "endpoints"), "1 / 2");
    assert_eq!(field(s, "sync"), "n/a");

    // Endpoints: the real upstream address with its counts, and the excluded one with why.
    assert!(dom.contains("id=\"endpoints\""));
    let e = row(&dom, &format!("data-endpoint=\"{}\"", up.addr()));
    assert_eq!(field(e, "address"), up.addr().to_string());
    assert_eq!(field(e, "weight"), "1");
    assert_eq!(field(e, "status"), "passing");
    assert!(field(e, "state").contains("healthy"), "{e}");
    assert!(field(e, "state").contains("available"), "{e}");
    assert_eq!(field(e, "excluded_because"), "\u{2014}");
    assert_eq!(field(e, "in_flight"), "0");
    let ep_requests = number(&field(e, "requests"), "endpoint requests");
    assert!(
        ep_requests >= SENT as f64,
        "endpoint requests {ep_requests} < {SENT}"
    );
    assert_eq!(field(e, "failures"), "0");
    let x = row(&dom, &format!("data-endpoint=\"{}\"", idle.addr()));
    assert_eq!(field(x, "weight"), "0");
    assert!(field(x, "state").contains("excluded"), "{x}");
    assert_eq!(field(x, "excluded_because"), "weight 0");
    assert_eq!(field(x, "requests"), "0");

    // --- Screenshot, kept for humans under target/tmp -----------------------------------
    let png = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    chromium(&bin, &dashboard, &[&shot, "--window-size=1280,900"]).await;
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "screenshot is not a PNG"
    );
    // IHDR: width and height, big-endian, at bytes 16..24.
    let dim = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((dim(16), dim(20)), (1280, 900), "screenshot size");
    assert!(
        bytes.len() > 20_000,
        "screenshot is only {} bytes; the page probably rendered empty",
        bytes.len()
    );
    eprintln!(
        "dashboard screenshot: {} ({} bytes); test took {:?}",
        png.display(),
        bytes.len(),
        started.elapsed()
    );

    gw.stop().await;
    up.shutdown().await;
    idle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_mesh_identity() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let consul = ConsulEmulator::start_with(EmulatorOptions {
        jitter: false,
        ..EmulatorOptions::default()
    })
    .await;
    let gw = start(&format!(
        r#"
        [discovery]
        provider = "consul"
        [discovery.consul]
        address = "{}"
        wait = "2s"
        startup_timeout = "5s"
        [[routes]]
        name = "web"
        path = "/web"
        service = "web"
        connect = true
        "#,
        consul.url()
    ))
    .await;
    let status_url = gw.admin_url("/status");
    let status = || async { health(&status_url).await };
    assert!(
        eventually(Duration::from_secs(10), || async {
            status().await["mesh"]["loaded"] == true
        })
        .await,
        "the mesh identity never loaded: {}",
        status().await
    );
    let mesh = status().await["mesh"].clone();

    let dom = chromium(&bin, &gw.admin_url("/dashboard"), &["--dump-dom"]).await;
    let (section, _) = by_id(&dom, "mesh");
    assert!(
        !section.contains("hidden"),
        "mesh section hidden: {section}"
    );
    let r = row(&dom, "data-mesh=\"meshgate\"");
    assert!(field(r, "service").starts_with("meshgate"), "{r}");
    assert!(field(r, "service").contains("loaded"), "{r}");
    assert_eq!(field(r, "spiffe_id"), consul.service_uri("meshgate"));
    assert_eq!(field(r, "serial"), mesh["leaf"]["serial"].as_str().unwrap());
    assert_eq!(
        field(r, "valid_until"),
        mesh["leaf"]["valid_until"].as_str().unwrap()
    );
    let roots: Vec<&str> = mesh["roots"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!roots.is_empty());
    assert_eq!(field(r, "roots"), roots.join(", "));
    assert_eq!(field(r, "error"), "\u{2014}");

    // Without a mesh route the section stays hidden.
    let up = TestUpstream::builder().name("plain").start().await;
    let plain = start(&format!(
        r#"
        [[routes]]
        path = "/p"
        targets = ["{}"]
        "#,
        up.url()
    ))
    .await;
    let dom = chromium(&bin, &plain.admin_url("/dashboard"), &["--dump-dom"]).await;
    let (section, _) = by_id(&dom, "mesh");
    assert!(section.contains("hidden"), "mesh section shown: {section}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_each_routes_policies() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    // Marked public: on a route with auth only shareable answers are cached.
    let up = TestUpstream::builder()
        .name("pol-up")
        .route("/pol/x", 200, "pol")
        .header("/pol/x", "cache-control", "public")
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    let key_hash = meshgate::auth::api_keys::sha256_hex("k1");
    std::fs::write(&keys, format!("team {key_hash}\n")).unwrap();
    let gw = start(&format!(
        r#"
        [[routes]]
        name = "pol"
        path = "/pol"
        targets = ["{}"]
        auth = {{ api_keys = {{ keys_file = "{}" }} }}
        rate_limit = {{ rate = "3/m", burst = 3 }}
        cache = {{ default_ttl = "1h" }}
        "#,
        up.url(),
        keys.display()
    ))
    .await;
    let c = client();
    let send = |key: Option<&'static str>| {
        let mut req = c.get(gw.url("/pol/x"));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Refused by auth, then three admitted (a miss and two hits), then refused by the limit.
    assert_eq!(send(None).await, 401);
    for _ in 0..3 {
        assert_eq!(send(Some("k1")).await, 200);
    }
    assert_eq!(send(Some("k1")).await, 429);
    assert_eq!(up.hits(), 1, "one miss reached the upstream");

    let dom = chromium(&bin, &gw.admin_url("/dashboard"), &["--dump-dom"]).await;
    let r = row(&dom, "data-route=\"pol\"");
    let auth = field(r, "auth");
    assert!(
        auth.starts_with("api_keys") && auth.ends_with("1 refused"),
        "auth cell: {auth:?}"
    );
    let rl = field(r, "rate_limit");
    assert!(rl.ends_with("1 limited of 4"), "rate limit cell: {rl:?}");
    assert_eq!(field(r, "cache"), "66.7% of 3");
}
