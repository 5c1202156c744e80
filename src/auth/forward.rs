//! Forward auth (Traefik's ForwardAuth, nginx's auth_request): ask an HTTP service about each
//! request's head; a 2xx lets it through with chosen answer headers, anything else goes back.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// The largest refusal body relayed to the client.
const MAX_BODY: usize = 64 * 1024;

/// What a timeout or connection failure of the service means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// 503: the gateway cannot decide (default).
    Unavailable,
    /// 401: refuse as if the service had said no.
    Deny,
}

/// `auth.forward`, validated.
pub struct ForwardAuth {
    /// The service's URL (`GET`).
    pub url: reqwest::Url,
    /// Request headers sent to the service; `None` sends all but hop-by-hop ones and `Host`.
    pub copy_request_headers: Option<Vec<HeaderName>>,
    /// Headers of a 2xx answer copied onto the upstream request (their incoming copies are
    /// always removed first).
    pub copy_response_headers: Vec<HeaderName>,
    /// Time allowed for the service's answer.
    pub timeout: Duration,
    /// Timeout or connection failure: 503 or 401.
    pub on_error: OnError,
    client: OnceLock<Result<reqwest::Client, String>>,
}

impl Clone for ForwardAuth {
    fn clone(&self) -> Self {
        Self::new(
            self.url.clone(),
            self.copy_request_headers.clone(),
            self.copy_response_headers.clone(),
            self.timeout,
            self.on_error,
        )
    }
}

impl PartialEq for ForwardAuth {
    fn eq(&self, o: &Self) -> bool {
        self.url == o.url
            && self.copy_request_headers == o.copy_request_headers
            && self.copy_response_headers == o.copy_response_headers
            && self.timeout == o.timeout
            && self.on_error == o.on_error
    }
}

impl fmt::Debug for ForwardAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardAuth")
            .field("url", &crate::error::redact_url(self.url.as_str()))
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// The service's decision.
pub enum Verdict {
    /// 2xx: forward, with these headers added to the upstream request.
    Allow(HeaderMap),
    /// Anything else: this answer goes back to the client as it came.
    Deny {
        /// The service's status.
        status: StatusCode,
        /// Its headers, hop-by-hop ones removed.
        headers: HeaderMap,
        /// Its body (up to 64 KiB).
        body: Bytes,
    },
}

/// The service could not decide: not reached, too slow, or an unreadable answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The HTTP client could not be built.
    #[error("forward auth client setup failed: {0}")]
    Setup(String),
    /// No answer in time.
    #[error("forward auth service {url} did not answer within {after:?}")]
    Timeout {
        /// The service.
        url: String,
        /// The configured timeout.
        after: Duration,
    },
    /// Connection or protocol failure.
    #[error("forward auth service {url} failed")]
    Failed {
        /// The service.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// A refusal whose body is over 64 KiB.
    #[error("forward auth service {url} sent a refusal body over 64 KiB")]
    BodyTooLarge {
        /// The service.
        url: String,
    },
}

/// The request facts the service gets as `X-Forwarded-*` headers.
pub struct Asked<'a> {
    /// The client's method.
    pub method: &'a Method,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The client's host, if any.
    pub host: Option<&'a HeaderValue>,
    /// The client's path and query.
    pub uri: &'a str,
    /// The client's address.
    pub client: std::net::IpAddr,
}

impl ForwardAuth {
    /// A forward-auth check; the client is built on first use.
    pub fn new(
        url: reqwest::Url,
        copy_request_headers: Option<Vec<HeaderName>>,
        copy_response_headers: Vec<HeaderName>,
        timeout: Duration,
        on_error: OnError,
    ) -> Self {
        Self {
            url,
            copy_request_headers,
            copy_response_headers,
            timeout,
            on_error,
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<&reqwest::Client, ForwardError> {
        self.client
            .get_or_init(|| {
                let tls = crate::tls::client_config(&crate::tls::UpstreamTls::default())
                    .map_err(|e| crate::error::Chain(&e).to_string())?;
                reqwest::Client::builder()
                    .tls_backend_preconfigured(tls)
                    // A redirect to a login page is the service's answer for the client.
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .build()
                    .map_err(|e| crate::error::Chain(&e).to_string())
            })
            .as_ref()
            .map_err(|e| ForwardError::Setup(e.clone()))
    }

    /// Asks the service about a request with these headers.
    pub async fn check(
        &self,
        asked: Asked<'_>,
        incoming: &HeaderMap,
    ) -> Result<Verdict, ForwardError> {
        let client = self.client()?;
        let mut headers = HeaderMap::new();
        match &self.copy_request_headers {
            Some(names) => {
                for name in names {
                    for v in incoming.get_all(name) {
                        headers.append(name.clone(), v.clone());
                    }
                }
            }
            None => {
                for (name, v) in incoming {
                    if name != header::HOST && name != header::CONTENT_LENGTH {
                        headers.append(name.clone(), v.clone());
                    }
                }
                strip_hop_by_hop(&mut headers);
            }
        }
        if let Ok(m) = HeaderValue::from_str(asked.method.as_str()) {
            headers.insert(HeaderName::from_static("x-forwarded-method"), m);
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(asked.proto),
        );
        // The gateway's own view, never the client's: a missing host removes the client's.
        let forwarded_host = HeaderName::from_static("x-forwarded-host");
        match asked.host {
            Some(h) => {
                headers.insert(forwarded_host, h.clone());
            }
            None => {
                headers.remove(forwarded_host);
            }
        }
        if let Ok(u) = HeaderValue::from_str(asked.uri) {
            headers.insert(HeaderName::from_static("x-forwarded-uri"), u);
        }
        if let Ok(ip) = HeaderValue::from_str(&asked.client.to_string()) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), ip);
        }
        let url = || crate::error::redact_url(self.url.as_str());
        let fail = |source: reqwest::Error| {
            if source.is_timeout() {
                ForwardError::Timeout {
                    url: url(),
                    after: self.timeout,
                }
            } else {
                ForwardError::Failed {
                    url: url(),
                    source: source.without_url(),
                }
            }
        };
        let call = async {
            let mut resp = client
                .get(self.url.clone())
                .headers(headers)
                .send()
                .await
                .map_err(fail)?;
            let status = resp.status();
            if status.is_success() {
                let mut add = HeaderMap::new();
                for name in &self.copy_response_headers {
                    for v in resp.headers().get_all(name) {
                        add.append(name.clone(), v.clone());
                    }
                }
                // Read out (bounded, within the timeout), so the connection goes back to the
                // pool instead of being closed under an unread body.
                let mut read = 0;
                while let Ok(Some(chunk)) = resp.chunk().await {
                    read += chunk.len();
                    if read > MAX_BODY {
                        break;
                    }
                }
                return Ok(Verdict::Allow(add));
            }
            let mut headers = std::mem::take(resp.headers_mut());
            strip_hop_by_hop(&mut headers);
            headers.remove(header::CONTENT_LENGTH);
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(fail)? {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(ForwardError::BodyTooLarge { url: url() });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Verdict::Deny {
                status,
                headers,
                body: body.into(),
            })
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(ForwardError::Timeout {
                url: url(),
                after: self.timeout,
            }),
        }
    }
}

/// The gateway's hop-by-hop removal (headers named in `Connection` included), plus the proxy
/// credentials, which are for the hop to the gateway.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    crate::rules::headers::remove_hop_by_hop(headers);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
}
