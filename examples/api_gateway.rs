//! The seed's API gateway built in code: targets, balancers, a rewrite chain, header changes
//! and a custom error handler written as a closure. Runs with its own mock services:
//! `cargo run --example api_gateway`, then `curl http://127.0.0.1:8080/api/v1/users`.

use std::time::Duration;

use bytes::Bytes;
use meshgate::balancer::Policy;
use meshgate::builder::{GatewayBuilder, RouteBuilder};
use meshgate::proxy::ProxyError;
use meshgate::Listeners;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mocks = CancellationToken::new();
    for (port, name) in [
        (8081, "user-service"),
        (8082, "user-service"),
        (8083, "order-service"),
        (8084, "order-service"),
    ] {
        meshgate::mock::spawn(([127, 0, 0, 1], port).into(), name, mocks.clone()).await?;
    }

    let gateway = GatewayBuilder::new()
        .listen("127.0.0.1:8080")
        .admin("127.0.0.1:9901")
        // A service resolved through (static) discovery, weighted 3:1.
        .static_service("order-service", [("http://127.0.0.1:8083", 3), ("http://127.0.0.1:8084", 1)])
        .route(
            RouteBuilder::new("users", "/api/v1/users")
                .targets(["http://127.0.0.1:8081", "http://127.0.0.1:8082"])
                .balancer(Policy::RoundRobin)
                .strip_prefix("/api/v1")
                .timeout(Duration::from_secs(30))
                .add_request_header("X-Gateway", "meshgate")
                .add_response_header("X-Served-By", "meshgate")
                .remove_response_header("Server")
                // The seed's custom error handler: one JSON answer for every gateway error.
                .error_handler(|err: &ProxyError| {
                    let body = format!(r#"{{"error":"Service unavailable","message":"Please try again later","cause":{:?}}}"#, err.message());
                    http::Response::builder()
                        .status(503)
                        .header("content-type", "application/json")
                        .body(Bytes::from(body))
                        .ok()
                }),
        )
        .route(
            RouteBuilder::new("orders", "/api/v1/orders")
                .service("order-service")
                .balancer(Policy::WeightedRoundRobin)
                .strip_prefix("/api/v1"),
        )
        .build()?;

    let listeners = Listeners {
        main: tokio::net::TcpListener::bind("127.0.0.1:8080").await?,
        admin: Some(tokio::net::TcpListener::bind("127.0.0.1:9901").await?),
        tls: None,
    };
    println!("try: curl http://127.0.0.1:8080/api/v1/users   (Ctrl-C to stop)");
    gateway
        .run(listeners, meshgate::server::shutdown_signal())
        .await?;
    mocks.cancel();
    Ok(())
}
