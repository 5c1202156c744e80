//! The `meshgate` binary: `check` reports every problem with its key path and exits 64.

use std::process::Command;

fn meshgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_shipped_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.toml");
    let out = meshgate(&["check", "--config", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

#[test]
fn check_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
        listen = "0.0.0.0:80800"
        [cors]
        allowed_origins = ["*"]
        allow_credentials = true
        [[routes]]
        path = "/a"
        targets = ["http://127.0.0.1:1"]
        [[routes]]
        path = "/b"
        targets = ["http://127.0.0.1:2"]
        [[routes]]
        path = "/c"
        targets = ["http://127.0.0.1:3"]
        load_balancer = "round-robbin"
        timeout = "soon"
        "#,
    )
    .unwrap();
    let out = meshgate(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "listen: invalid address",
        "cors.allow_credentials: cannot be true",
        r#"routes[2].load_balancer: unknown policy "round-robbin", expected one of round_robin, weighted_round_robin, random, least_connections, ip_hash"#,
        r#"routes[2].timeout: invalid duration "soon""#,
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // The same validation runs when starting: it refuses to start, with the same code.
    let out = meshgate(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn missing_file_and_type_errors_exit_64_with_the_key() {
    let out = meshgate(&["check", "--config", "/nonexistent/meshgate.toml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/meshgate.toml"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typed.toml");
    std::fs::write(&path, "[upstream]\nmax_idle_per_host = \"many\"\n").unwrap();
    let out = meshgate(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_idle_per_host"), "{err}");
}

#[test]
fn environment_overrides_the_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["check", "--config", path])
        .env("MESHGATE_ROUTES", "not a list")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["check", "--config", path])
        .env("MESHGATE_LISTEN", "127.0.0.1:9000")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn json_and_yaml_files_are_read_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("g.json");
    std::fs::write(
        &json,
        r#"{"routes":[{"path":"/","targets":["http://127.0.0.1:1"],"load_balancer":"bogus"}]}"#,
    )
    .unwrap();
    let out = meshgate(&["check", "--config", json.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes[0].load_balancer"));
    let yaml = dir.path().join("g.yaml");
    std::fs::write(
        &yaml,
        "routes:\n  - path: /\n    targets: [\"http://127.0.0.1:1\"]\n",
    )
    .unwrap();
    let out = meshgate(&["check", "--config", yaml.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn variables_alone_configure_the_gateway_and_nothing_at_all_is_refused() {
    let bare = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meshgate"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MESHGATE_") {
                c.env_remove(k);
            }
        }
        c.env_remove("RUST_LOG");
        c
    };
    // What docker-compose.yml's gateway does: `meshgate run` with MESHGATE_* variables only.
    let out = bare()
        .arg("check")
        .env("MESHGATE_LISTEN", "0.0.0.0:8080")
        .env(
            "MESHGATE_ROUTES",
            r#"[{path="/", targets=["http://127.0.0.1:9001"]}]"#,
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration is valid: 1 routes"
    );
    // The variables are validated like a file.
    let out = bare()
        .arg("check")
        .env("MESHGATE_LISTEN", "not an address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
    // Neither a file nor a variable: refused, with what to do.
    let out = bare().arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MESHGATE_* variables"));
}

#[test]
fn check_accepts_the_mesh_example_with_its_compose_variables() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/mesh/gateway.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["check", "--config", path])
        .env("CONSUL_HTTP_ADDR", "consul-mesh:8500")
        .env(
            "MESHGATE_DISCOVERY__CONSUL__REGISTER__ADDRESS",
            "mesh-gateway",
        )
        .env("MESHGATE_ADMIN_TOKEN", "demo-admin-token")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration is valid: 3 routes"
    );
}
