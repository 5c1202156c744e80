//! Routes kept in Consul KV: one blocking `?recurse` query on a prefix, decoded into key →
//! document bytes. Turning documents into routes is the configuration layer's job, not this one's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::client::ConsulClient;
use super::client::{Answer, QueryMeta};
use super::error::ConsulError;
use super::sync::ServiceSync;
use super::watch::blocking_loop;

/// Answer of `GET /v1/kv/<prefix>?recurse`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvAnswer {
    /// `X-Consul-Index` as sent.
    pub index: u64,
    /// Full key → decoded value, for keys with a value; folder keys and `null` values are left
    /// out. Empty when nothing is under the prefix (Consul answers 404).
    pub entries: BTreeMap<String, Vec<u8>>,
    /// `X-Consul-Knownleader`; `true` when absent.
    pub known_leader: bool,
    /// `X-Consul-Lastcontact`.
    pub last_contact: Duration,
    /// `X-Consul-Results-Filtered-By-ACLs: true`.
    pub filtered_by_acls: bool,
}

impl Answer for KvAnswer {
    fn meta(&self) -> QueryMeta {
        QueryMeta {
            index: self.index,
            known_leader: self.known_leader,
            last_contact: self.last_contact,
            filtered_by_acls: self.filtered_by_acls,
        }
    }
}

/// One entry of the list; the other fields (`Flags`, `LockIndex`, indexes) are not needed.
#[derive(Deserialize)]
struct KvEntry {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value", default, deserialize_with = "base64_value")]
    value: Option<Vec<u8>>,
}

impl ConsulClient {
    /// `GET /v1/kv/<prefix>?recurse`, blocking like the other reads when `index` is set. A 404
    /// (nothing under the prefix) is an empty answer, not an error.
    pub async fn kv_list(&self, prefix: &str, index: Option<u64>) -> Result<KvAnswer, ConsulError> {
        let mut segments = vec!["kv"];
        segments.extend(prefix.split('/'));
        let mut url = self.url(&segments, index, false);
        url.query_pairs_mut().append_key_only("recurse");
        let (meta, body) = self.get_or_missing(url, true).await?;
        let entries = match body {
            None => BTreeMap::new(),
            Some(body) => decode_kv(&body).map_err(|source| ConsulError::Decode { source })?,
        };
        Ok(KvAnswer {
            index: meta.index,
            entries,
            known_leader: meta.known_leader,
            last_contact: meta.last_contact,
            filtered_by_acls: meta.filtered_by_acls,
        })
    }
}

/// The list body into key → value; keys without a value (folders, `null`) are skipped.
pub fn decode_kv(body: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, serde_json::Error> {
    let list: Vec<KvEntry> = serde_json::from_slice(body)?;
    Ok(list
        .into_iter()
        .filter_map(|e| Some((e.key, e.value?)))
        .filter(|(k, _)| !k.ends_with('/'))
        .collect())
}

fn base64_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|t| {
        decode_base64(&t).ok_or_else(|| serde::de::Error::custom("Value is not valid base64"))
    })
    .transpose()
}

/// Standard base64 with padding, as Go's `encoding/json` writes `[]byte`; `None` when invalid.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Watches `prefix` with a blocking `?recurse` query until `cancel`, and calls `on_change` with
/// every key and value under it whenever that set really changed (deletions included: it is
/// the whole set each time). Same duties and guarantees as [`super::watch_catalog`]: the first
/// success always publishes, failures never do (the last good routes stay), the index resets
/// when it goes backwards. `sync` is marked synced after the first `on_change` returns.
pub async fn watch_kv(
    client: ConsulClient,
    prefix: Arc<str>,
    sync: Arc<ServiceSync>,
    mut on_change: impl FnMut(BTreeMap<String, Vec<u8>>) + Send,
    cancel: CancellationToken,
) {
    let label = format!("kv/{prefix}");
    let span = tracing::info_span!("consul_watch", consul.watch = %label);
    let mut last: Option<BTreeMap<String, Vec<u8>>> = None;
    let fetch = |index| {
        let client = client.clone();
        let prefix = prefix.clone();
        async move { client.kv_list(&prefix, index).await }
    };
    let on_answer = |answer: KvAnswer, _fresh: bool| {
        sync.set_instances(answer.entries.len());
        if last.as_ref() != Some(&answer.entries) {
            tracing::info!(
                consul.index = answer.index,
                keys = answer.entries.len(),
                "routes in Consul KV changed"
            );
            on_change(answer.entries.clone());
            last = Some(answer.entries);
        }
        sync.mark_synced();
    };
    blocking_loop(&label, &*sync, &cancel, fetch, on_answer)
        .instrument(span)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_go_encodings() {
        assert_eq!(
            decode_base64("eyJuaWNlIjoianNvbiJ9").unwrap(),
            br#"{"nice":"json"}"#
        );
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert_eq!(decode_base64("YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert!(decode_base64("YQ=").is_none());
        assert!(decode_base64("Y===").is_none());
        assert!(decode_base64("YQ==YQ==").is_none());
        assert!(decode_base64("a$bc").is_none());
    }

    #[test]
    fn kv_prefix_must_be_a_folder() {
        let resolve = |p: &str| {
            super::super::settings::RawConsul {
                kv_prefix: Some(p.to_owned()),
                ..Default::default()
            }
            .resolve(&|_| None)
        };
        let ok = resolve("meshgate/routes/").unwrap();
        assert_eq!(ok.kv_prefix.as_deref(), Some("meshgate/routes/"));
        for bad in ["meshgate/routes", "/meshgate/routes/", "/", ""] {
            let errors = resolve(bad).unwrap_err();
            assert_eq!(errors.len(), 1, "{bad:?}: {errors:?}");
            assert_eq!(errors[0].0, "kv_prefix");
        }
    }

    #[test]
    fn real_capture_decodes_and_skips_folders() {
        let body = include_bytes!("../../../tests/fixtures/consul/kv-recurse-real-capture.json");
        let entries = decode_kv(body).unwrap();
        assert_eq!(entries["foo/bar"], br#"{"nice":"json"}"#);
        assert_eq!(entries["foo/bar2"], br#"{"more":"json"}"#);
        let folder = br#"[{"Key":"r/","Value":null,"Flags":0},{"Key":"r/a","Value":null}]"#;
        assert!(decode_kv(folder).unwrap().is_empty());
        assert!(decode_kv(br#"[{"Key":"r/a","Value":"!!"}]"#).is_err());
    }
}
