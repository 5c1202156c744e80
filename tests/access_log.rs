//! The access log end to end: known traffic through the real gateway, lines captured through an
//! injected writer and parsed.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgate::config::{Config, Env};
use meshgate::telemetry::{AccessFormat, AccessLog, RequestTelemetry};
use meshgate::Gateway;
use serde_json::Value;
use support::gateway::{client, start_gateway, TestGateway};
use support::upstream::TestUpstream;
use support::util::{chunked_request, dead_port, raw_exchange};

/// A `Write` into shared memory.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn start_logged(toml: &str, format: AccessFormat) -> (TestGateway, SharedBuf) {
    let config = Config::from_toml(toml, &Env::default()).unwrap_or_else(|e| panic!("{e}"));
    let buf = SharedBuf::default();
    let access = AccessLog::to_writer(format, buf.clone()).unwrap();
    let gw =
        Gateway::build_with_telemetry(config, RequestTelemetry::new(None, Some(access))).unwrap();
    (start_gateway(gw).await, buf)
}

/// Every line written so far, once all queued lines are out.
async fn lines(gw: &TestGateway, buf: &SharedBuf) -> Vec<String> {
    gw.state
        .proxy
        .telemetry
        .access_log()
        .unwrap()
        .flush(Duration::from_secs(5))
        .await;
    buf.text().lines().map(str::to_owned).collect()
}

fn by_path<'a>(lines: &'a [Value], path: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["path"] == path)
        .unwrap_or_else(|| panic!("no line for {path} in {lines:#?}"))
}

#[tokio::test]
async fn json_lines_describe_each_request() {
    let dead = dead_port().await;
    let up = TestUpstream::builder()
        .route("/api/hello", 200, "hello")
        .start_on("127.0.0.2:0".parse().unwrap())
        .await;
    let toml = format!(
        r#"
        [server]
        drain_delay = "0s"
        [[routes]]
        name = "api"
        path = "/api"
        targets = ["{up}"]
        [[routes]]
        name = "retry"
        path = "/retry"
        targets = ["http://127.0.0.1:{dead}", "{up}"]
        retry = {{ attempts = 2, backoff = "1ms" }}
        [[routes]]
        name = "stream"
        path = "/stream"
        targets = ["{up}"]
        retry = {{ attempts = 1 }}
        "#,
        up = up.url()
    );
    let (gw, buf) = start_logged(&toml, AccessFormat::Json).await;
    let c = client();

    let resp = c
        .get(gw.url("/api/hello"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let hello_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(resp.text().await.unwrap(), "hello");

    let resp = c
        .post(gw.url("/api/upload"))
        .body("hello world")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();

    let resp = c.get(gw.url("/none")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let not_found_body = resp.bytes().await.unwrap();

    let resp = c.get(gw.url("/retry/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();

    // A chunked upload without Content-Length that streams (one attempt: no replay buffer).
    let reply = raw_exchange(
        gw.addr,
        &chunked_request("POST /stream/up HTTP/1.1\r\nHost: gw", &[b"12345", b"6789"]),
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.text.starts_with("HTTP/1.1 200"), "{}", reply.text);

    let raw = lines(&gw, &buf).await;
    assert_eq!(raw.len(), 5, "{raw:#?}");
    let parsed: Vec<Value> = raw
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();

    let hello = by_path(&parsed, "/api/hello");
    assert_eq!(hello["method"], "GET");
    assert_eq!(hello["proto"], "HTTP/1.1");
    assert_eq!(hello["status"], 200);
    assert_eq!(hello["route"], "api");
    assert_eq!(hello["service"], "api");
    assert_eq!(hello["upstream"], up.addr().to_string());
    assert_eq!(hello["attempts"], 1);
    assert_eq!(hello["bytes_in"], 0);
    assert_eq!(hello["bytes_out"], 5);
    assert_eq!(hello["request_id"], hello_id.as_str());
    assert_eq!(hello["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hello["complete"], true);
    assert!(hello["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let t = hello["time"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(t).is_ok(), "time {t}");
    let (total, ttfb, upstream) = (
        hello["duration_ms"].as_f64().unwrap(),
        hello["ttfb_ms"].as_f64().unwrap(),
        hello["upstream_ms"].as_f64().unwrap(),
    );
    assert!(
        upstream > 0.0 && upstream <= ttfb && ttfb <= total,
        "upstream {upstream} <= ttfb {ttfb} <= total {total}"
    );

    let upload = by_path(&parsed, "/api/upload");
    assert_eq!(upload["method"], "POST");
    assert_eq!(upload["bytes_in"], 11);
    assert_eq!(upload["bytes_out"], "upstream".len());

    let none = by_path(&parsed, "/none");
    assert_eq!(none["status"], 404);
    assert_eq!(none["route"], Value::Null);
    assert_eq!(none["upstream"], Value::Null);
    assert_eq!(none["upstream_ms"], Value::Null);
    assert_eq!(none["attempts"], 0);
    assert_eq!(none["bytes_out"], not_found_body.len());
    assert_eq!(none["trace_id"], Value::Null);

    let retried = by_path(&parsed, "/retry/x");
    assert_eq!(retried["route"], "retry");
    assert_eq!(retried["attempts"], 2);
    assert_eq!(
        retried["upstream"],
        up.addr().to_string(),
        "the last attempt's endpoint"
    );

    let streamed = by_path(&parsed, "/stream/up");
    assert_eq!(streamed["bytes_in"], 9, "counted as it streamed");
    assert_eq!(
        up.requests()
            .iter()
            .find(|r| r.path() == "/stream/up")
            .unwrap()
            .body_len,
        9
    );
    gw.stop().await;
}

#[tokio::test]
async fn text_lines_are_logfmt() {
    let up = TestUpstream::builder()
        .route("/api/x", 201, "made")
        .start()
        .await;
    let toml = format!(
        r#"
        [server]
        drain_delay = "0s"
        [[routes]]
        name = "api"
        path = "/api"
        targets = ["{}"]
        "#,
        up.url()
    );
    let (gw, buf) = start_logged(&toml, AccessFormat::Text).await;
    let resp = client().get(gw.url("/api/x?q=1")).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    resp.bytes().await.unwrap();
    let lines = lines(&gw, &buf).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    for part in [
        " method=GET path=/api/x proto=HTTP/1.1 status=201 route=api service=api ",
        &format!(" upstream={} attempts=1 bytes_in=0 bytes_out=4 ", up.addr()),
        " trace_id=- complete=true",
    ] {
        assert!(line.contains(part), "{part:?} not in {line}");
    }
    assert!(
        !line.contains("q=1"),
        "the query stays out of the log: {line}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn access_log_is_off_by_default_and_validated() {
    let c = Config::from_toml("", &Env::default()).unwrap();
    assert_eq!(c.log.access, meshgate::config::AccessLogFormat::Off);
    let e = Config::from_toml("[log]\naccess = \"yes\"", &Env::default()).unwrap_err();
    assert!(
        e.problems().iter().any(|p| p.starts_with("log.access:")),
        "{:?}",
        e.problems()
    );
}
