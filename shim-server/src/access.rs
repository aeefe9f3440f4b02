//! Who may do what, and the record of what was done.
//!
//! Tokens carry a role: a `viewer` reads, an `operator` also changes. `service.authToken` is an
//! operator token (named `admin`) as before. Reads stay open unless `protectReads` is set,
//! because the existing client polls status without a token. Every request that changes state
//! (POST, PUT, PATCH, DELETE), allowed or refused, is appended to the audit log as one JSON line:
//! who, what, which service, and the result.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::envelope::ApiError;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Reads: status, lists, events, logs.
    Viewer,
    /// Reads and changes: deploy, update, delete.
    Operator,
}

/// One API token (`service.tokens[]`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiToken {
    /// Who holds it, as the audit log names them.
    pub name: String,
    /// The bearer token.
    pub token: String,
    /// What it allows.
    pub role: Role,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub name: String,
    pub role: Role,
}

/// The server's tokens and audit log.
pub(crate) struct Access {
    tokens: Vec<ApiToken>,
    protect_reads: bool,
    audit: Option<AuditLog>,
}

impl Access {
    /// `admin_token` (the legacy `authToken`) joins `tokens` as an operator.
    pub(crate) fn new(
        admin_token: Option<String>,
        mut tokens: Vec<ApiToken>,
        protect_reads: bool,
        audit_log: Option<&Path>,
    ) -> std::io::Result<Self> {
        // An empty token would let anyone in with `Authorization: Bearer `.
        tokens.retain(|t| !t.token.is_empty());
        if let Some(token) = admin_token.filter(|t| !t.is_empty()) {
            tokens.push(ApiToken {
                name: "admin".into(),
                token,
                role: Role::Operator,
            });
        }
        let audit = audit_log.map(AuditLog::open).transpose()?;
        Ok(Self {
            tokens,
            protect_reads,
            audit,
        })
    }

    /// Whether any token is configured (changes need one then).
    pub(crate) fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The caller of a request (`None`: anonymous), and the response refusing it, if it is
    /// refused: 401 without a known token where one is needed, 403 for a viewer asking to
    /// change something.
    pub(crate) fn authorize(
        &self,
        method: &Method,
        headers: &HeaderMap,
    ) -> (Option<Caller>, Option<Response>) {
        let reading = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if self.tokens.is_empty() || (reading && !self.protect_reads) {
            return (None, None);
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        let known = presented.and_then(|presented| {
            // Every token is compared, so the time taken says nothing about which matched.
            let mut found = None;
            for t in &self.tokens {
                if constant_time_eq(presented.as_bytes(), t.token.as_bytes()) && found.is_none() {
                    found = Some(t);
                }
            }
            found
        });
        let Some(token) = known else {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized: this request needs the header 'Authorization: Bearer <token>'",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return (None, Some(response));
        };
        let caller = Caller {
            name: token.name.clone(),
            role: token.role,
        };
        if !reading && token.role != Role::Operator {
            let refused = ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "forbidden: token {:?} is a viewer; changes need an operator token",
                    token.name
                ),
            )
            .into_response();
            return (Some(caller), Some(refused));
        }
        (Some(caller), None)
    }

    /// Appends one changing request to the audit log (when there is one).
    pub(crate) fn audit(&self, entry: &AuditEntry<'_>) {
        if let Some(log) = &self.audit {
            log.append(entry);
        }
    }

    pub(crate) fn auditing(&self) -> bool {
        self.audit.is_some()
    }
}

/// One line of the audit log.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AuditEntry<'a> {
    pub time: String,
    /// The token's name, or `anonymous`.
    pub who: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub method: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_id: Option<&'a str>,
    /// The HTTP status answered.
    pub status: u16,
}

/// JSON lines appended to a file.
struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    fn append(&self, entry: &AuditEntry<'_>) {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        // One write per line under the lock, so lines never interleave.
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(err) = file.write_all(&line) {
            tracing::error!(path = %self.path.display(), error = %err, "cannot write the audit log");
        }
    }
}

/// The service a changing request is about, from its path (`/api/v1/modserv/{id}...`).
pub(crate) fn service_of_path(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/api/v1/modserv/")?.split('/').next()?;
    (!id.is_empty() && id != "deploy" && id != "list").then_some(id)
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
        }
        h
    }

    fn access(protect_reads: bool) -> Access {
        Access::new(
            Some("root-token".into()),
            vec![ApiToken {
                name: "dashboard".into(),
                token: "view-token".into(),
                role: Role::Viewer,
            }],
            protect_reads,
            None,
        )
        .unwrap()
    }

    fn status(
        (caller, refused): (Option<Caller>, Option<Response>),
    ) -> Result<Option<String>, u16> {
        match refused {
            Some(r) => Err(r.status().as_u16()),
            None => Ok(caller.map(|c| c.name)),
        }
    }

    #[test]
    fn viewers_read_operators_change_and_reads_stay_open_unless_protected() {
        let open = access(false);
        assert_eq!(
            status(open.authorize(&Method::GET, &headers(None))),
            Ok(None)
        );
        assert_eq!(
            status(open.authorize(&Method::POST, &headers(None))),
            Err(401)
        );
        assert_eq!(
            status(open.authorize(&Method::POST, &headers(Some("wrong")))),
            Err(401)
        );
        assert_eq!(
            status(open.authorize(&Method::DELETE, &headers(Some("view-token")))),
            Err(403)
        );
        assert_eq!(
            status(open.authorize(&Method::PUT, &headers(Some("root-token")))),
            Ok(Some("admin".into()))
        );
        let closed = access(true);
        assert_eq!(
            status(closed.authorize(&Method::GET, &headers(None))),
            Err(401)
        );
        assert_eq!(
            status(closed.authorize(&Method::GET, &headers(Some("view-token")))),
            Ok(Some("dashboard".into()))
        );
    }

    #[test]
    fn bearer_tokens_are_parsed_and_compared_exactly() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn the_service_of_a_path() {
        assert_eq!(
            service_of_path("/api/v1/modserv/ab12cd34"),
            Some("ab12cd34")
        );
        assert_eq!(
            service_of_path("/api/v1/modserv/ab12cd34/logs"),
            Some("ab12cd34")
        );
        assert_eq!(service_of_path("/api/v1/modserv/deploy"), None);
        assert_eq!(service_of_path("/api/v1/plugins"), None);
    }
}
