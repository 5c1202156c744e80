//! Several serving threads (`workers` > 1): each runs a runtime of its own and accepts on the
//! same listener; connections spread over them, the drain waits for the requests of every
//! thread, and the threads end with the gateway.

mod support;

use std::time::Duration;

use meshgate::config::{Config, Env};
use meshgate::Gateway;
use support::gateway::{client, start_gateway};
use support::upstream::TestUpstream;

/// This process's serving threads: (thread id, CPU ticks used so far).
fn serving_threads() -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let dir = task.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !comm.starts_with("meshgate-serve-") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        found.push((task.file_name().to_string_lossy().into_owned(), ticks));
    }
    found
}

// One test: the thread count is the whole process's, so a second test would see its threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_every_thread_and_the_drain_and_a_drop_end_them() {
    let up = TestUpstream::builder()
        .route("/", 200, "ok")
        .route("/slow", 200, "slow")
        .delay("/slow", Duration::from_millis(400))
        .start()
        .await;
    let mut config = Config::from_toml(
        &format!(
            r#"
            [[routes]]
            path = "/"
            targets = ["{}"]
            "#,
            up.url()
        ),
        &Env::default(),
    )
    .unwrap();
    config.server.drain_delay = Duration::ZERO;
    let mut gw = start_gateway(Gateway::build(config).unwrap().with_serving_threads(3)).await;
    // Two threads besides the one running the gateway, started as `run` begins.
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async {
            serving_threads().len() == 2
        })
        .await
    );
    let status = support::util::status(&client(), &gw).await;
    assert_eq!(status["workers"], 3);
    let before = serving_threads();

    // Many connections, each with its own client, several requests each.
    let mut load = Vec::new();
    for _ in 0..60 {
        let url = gw.url("/");
        load.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..20 {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(r.text().await.unwrap(), "ok");
            }
        }));
    }
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(up.hits_on("/"), 1200);
    // Every extra thread accepted and served some of them.
    let after = serving_threads();
    for (tid, ticks) in &after {
        let was = before.iter().find(|(t, _)| t == tid).map_or(0, |b| b.1);
        assert!(*ticks > was, "serving thread {tid} did no work");
    }

    // Slow requests in flight on several connections when the drain starts: all are answered.
    let mut slow = Vec::new();
    for _ in 0..9 {
        let url = gw.url("/slow");
        slow.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async {
            up.hits_on("/slow") == 9
        })
        .await
    );
    gw.signal_stop();
    for s in slow {
        assert_eq!(s.await.unwrap(), (200, "slow".to_owned()));
    }
    gw.join(Duration::from_secs(10)).await.unwrap();
    // The threads ended with the gateway.
    assert!(serving_threads().is_empty());

    // A gateway dropped while serving (its `run` cancelled, no shutdown) ends its threads too.
    let config = Config::from_toml(
        &format!("[[routes]]\npath = \"/\"\ntargets = [\"{}\"]\n", up.url()),
        &Env::default(),
    )
    .unwrap();
    let mut gw = start_gateway(Gateway::build(config).unwrap().with_serving_threads(3)).await;
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async {
            serving_threads().len() == 2
        })
        .await
    );
    gw.abort();
    assert!(
        support::gateway::eventually(Duration::from_secs(5), || async {
            serving_threads().is_empty()
        })
        .await
    );
}
