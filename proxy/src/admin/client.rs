//! A blocking client for the admin API, used by the `sluice` CLI (and tests).
use serde::de::DeserializeOwned;

/// Why a call to the admin API failed. Every variant names the URL that was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer to read: the request could not be built, the connection failed, or the body
    /// could not be read. A non-2xx status is not this error.
    #[error("admin API at {url}: {source}")]
    Http {
        /// The URL requested (base and path).
        url: String,
        /// What ureq reported.
        source: Box<ureq::Error>,
    },
    /// [`AdminClient::json`] got an answer outside 200..300.
    #[error("admin API at {url} answered {status}: {body}")]
    Status {
        /// The URL requested (base and path).
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The body as sent, usually the API's error message.
        body: String,
    },
    /// [`AdminClient::json`] got a 2xx answer whose body is not the JSON it expected.
    #[error("admin API at {url}: unexpected answer: {source}")]
    Decode {
        /// The URL requested (base and path).
        url: String,
        /// Where and why the body failed to decode.
        source: serde_json::Error,
    },
}

/// A blocking HTTP client for one admin listener, sending the bearer token (if any) with every
/// request.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// A raw answer: status and body.
pub struct Answer {
    /// The HTTP status code, whatever it is.
    pub status: u16,
    /// The whole body, read as UTF-8.
    pub body: String,
}

impl AdminClient {
    /// `base` like `http://127.0.0.1:9090`.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            agent,
        }
    }

    /// Any request; the status is returned, not turned into an error.
    pub fn request(&self, method: &str, path: &str) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base);
        let fail = |source| ClientError::Http {
            url: url.clone(),
            source: Box::new(source),
        };
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header("Authorization", format!("Bearer {token}"));
        }
        let request = builder.body(()).map_err(|e| fail(ureq::Error::Http(e)))?;
        let mut response = self.agent.run(request).map_err(fail)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(fail)?;
        Ok(Answer { status, body })
    }

    /// A request that must succeed with JSON.
    pub fn json<T: DeserializeOwned>(&self, method: &str, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let answer = self.request(method, path)?;
        if !(200..300).contains(&answer.status) {
            return Err(ClientError::Status {
                url,
                status: answer.status,
                body: answer.body,
            });
        }
        serde_json::from_str(&answer.body).map_err(|source| ClientError::Decode { url, source })
    }
}
