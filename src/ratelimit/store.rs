//! The global scope's store: GCRA in Redis, one Lua script per decision on Redis's own clock,
//! over a few multiplexed connections that reconnect by themselves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::decision::{Decision, Via};

/// `[redis]`, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL (credentials may be in it).
    pub url: String,
    /// ACL user, overriding the URL's.
    pub username: Option<String>,
    /// Password, overriding the URL's.
    pub password: Option<String>,
    /// Multiplexed connections.
    pub pool_size: usize,
    /// Longest wait for one decision; beyond it `on_store_error` decides.
    pub timeout: Duration,
    /// `redis.ca_file`'s PEM: the roots for `rediss://` in place of the system's.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisSettings {
    // The password stays out of logs and `/status`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &crate::error::redact_url(&self.url))
            .field("username", &self.username)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_pem.is_some())
            .finish()
    }
}

/// Why the store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No `[redis]` section (refused by validation; kept for the library API).
    #[error("no [redis] store is configured")]
    NotConfigured,
    /// The URL could not be used.
    #[error("invalid redis settings")]
    Settings(#[source] redis::RedisError),
    /// No answer within `redis.timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// A connection or command error, or an error reply.
    #[error("redis request failed")]
    Redis(#[source] redis::RedisError),
    /// The script answered something that is not its three integers.
    #[error("redis answered an unexpected reply: {0}")]
    Reply(String),
}

/// GCRA with Redis's clock. KEYS[1] the bucket; ARGV[1] the emission interval and ARGV[2] the
/// burst, in microseconds and requests. Returns {allowed, remaining, reset_us, retry_after_us}.
/// The key expires once its bucket is full again, so idle keys cost Redis nothing.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local limit = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local ahead = tat + interval - now
if ahead > limit then
  return {0, 0, tat - now, ahead - limit}
end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(ahead / 1000) + 1)
return {1, math.floor((limit - ahead) / interval), ahead, 0}
"#;

/// A Redis store shared by every global limit of a gateway.
pub struct RedisStore {
    settings: RedisSettings,
    client: Result<redis::Client, String>,
    conns: Box<[OnceLock<ConnectionManager>]>,
    next: AtomicUsize,
    script: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("settings", &self.settings)
            .finish()
    }
}

impl RedisStore {
    /// A store for `settings`. Nothing connects until the first decision; connections are
    /// made, and remade after a failure, in the background.
    pub fn new(settings: RedisSettings) -> Self {
        let client = client(&settings).map_err(|e| e.to_string());
        Self {
            conns: (0..settings.pool_size.max(1))
                .map(|_| OnceLock::new())
                .collect(),
            next: AtomicUsize::new(0),
            script: redis::Script::new(GCRA),
            client,
            settings,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let client = self.client.as_ref().map_err(|e| {
            StoreError::Settings(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "invalid redis url",
                e.clone(),
            )))
        })?;
        let slot = &self.conns[self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len()];
        if let Some(c) = slot.get() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.timeout.max(Duration::from_millis(100))))
            .set_response_timeout(Some(self.settings.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = client
            .get_connection_manager_lazy(config)
            .map_err(StoreError::Redis)?;
        Ok(slot.get_or_init(|| conn).clone())
    }

    /// Charges one request to `key`.
    pub async fn gcra(
        &self,
        key: &[u8],
        interval_us: u64,
        burst: u64,
    ) -> Result<Decision, StoreError> {
        let mut conn = self.connection()?;
        let mut call = self.script.prepare_invoke();
        call.key(key).arg(interval_us).arg(burst);
        let reply: redis::Value =
            tokio::time::timeout(self.settings.timeout, call.invoke_async(&mut conn))
                .await
                .map_err(|_| StoreError::Timeout(self.settings.timeout))?
                .map_err(StoreError::Redis)?;
        decision(&reply)
    }

    /// PING, for `/status`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        let cmd = redis::cmd("PING");
        let r: Result<String, _> =
            tokio::time::timeout(self.settings.timeout, cmd.query_async(&mut conn))
                .await
                .map_err(|_| StoreError::Timeout(self.settings.timeout))?;
        r.map(|_| ()).map_err(StoreError::Redis)
    }
}

fn client(s: &RedisSettings) -> Result<redis::Client, redis::RedisError> {
    use redis::IntoConnectionInfo;
    if s.url.starts_with("rediss://") {
        // rustls needs a process-wide provider; ring is the one the gateway uses everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let mut info = s.url.as_str().into_connection_info()?;
    let mut redis = info.redis_settings().clone();
    if let Some(u) = &s.username {
        redis = redis.set_username(u);
    }
    if let Some(p) = &s.password {
        redis = redis.set_password(p);
    }
    info = info.set_redis_settings(redis);
    match &s.ca_pem {
        Some(pem) if s.url.starts_with("rediss://") => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        ),
        _ => redis::Client::open(info),
    }
}

/// The script's reply, checked: four non-negative integers.
fn decision(reply: &redis::Value) -> Result<Decision, StoreError> {
    let redis::Value::Array(items) = reply else {
        return Err(StoreError::Reply(
            format!("{reply:?}").chars().take(200).collect(),
        ));
    };
    let ints: Vec<i64> = items
        .iter()
        .map(|v| match v {
            redis::Value::Int(n) if *n >= 0 => Some(*n),
            _ => None,
        })
        .collect::<Option<_>>()
        .filter(|v: &Vec<i64>| v.len() == 4)
        .ok_or_else(|| StoreError::Reply(format!("{reply:?}").chars().take(200).collect()))?;
    let us = |n: i64| Duration::from_micros(n as u64);
    Ok(Decision {
        allowed: ints[0] == 1,
        remaining: ints[1] as u64,
        reset: us(ints[2]),
        retry_after: us(ints[3]),
        via: Via::Store,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_replies_are_errors() {
        use redis::Value;
        for v in [
            Value::Nil,
            Value::Okay,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![
                Value::Int(1),
                Value::Int(-1),
                Value::Int(0),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::Nil,
                Value::Int(0),
                Value::Int(0),
            ]),
        ] {
            assert!(decision(&v).is_err(), "{v:?}");
        }
        let ok = Value::Array(vec![
            Value::Int(1),
            Value::Int(2),
            Value::Int(3),
            Value::Int(0),
        ]);
        assert!(decision(&ok).unwrap().allowed);
    }
}
