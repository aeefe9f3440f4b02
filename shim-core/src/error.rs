//! The error type of shim-core's public API.

use crate::spec::FieldError;

/// Result with shim-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong when calling the [`Engine`](crate::Engine) or building one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request named a service that does not exist (never deployed, or deleted).
    #[error("service {0} does not exist")]
    NotFound(String),
    /// The deploy or update body broke a rule; each entry names the field.
    #[error("invalid request: {}", FieldError::join(.0))]
    Invalid(Vec<FieldError>),
    /// A plugin name was not registered; the message lists the known names.
    #[error("unknown {kind} {name:?}; known {kind}s: {known}")]
    UnknownPlugin {
        /// "shimlet" or "pipeline".
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The registered names, comma separated.
        known: String,
    },
    /// Two plugins registered the same name.
    #[error("{kind} {name:?} is registered twice")]
    DuplicatePlugin {
        /// "shimlet" or "pipeline".
        kind: &'static str,
        /// The duplicated name.
        name: String,
    },
    /// The engine was built without a required part.
    #[error("engine misconfigured: {0}")]
    Config(String),
    /// The runtime (shimlet) failed.
    #[error(transparent)]
    Shimlet(#[from] crate::shimlet::ShimletError),
    /// The store failed to read or write.
    #[error("store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A dry run's pipeline stopped at a step (e.g. the model directory does not exist).
    #[error("dry run stopped: {0}")]
    DryRun(#[source] crate::pipeline::StepFailure),
    /// The request does not fit the GPUs (`engine.fitCheck: enforce`); the message has the
    /// numbers and what would fit.
    #[error("does not fit: {message}")]
    Unfit {
        /// The estimate in words.
        message: String,
        /// The estimate.
        estimate: Box<crate::admission::Estimate>,
    },
    /// The engine is shutting down and takes no new work.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl Error {
    /// Wraps any store backend error.
    pub fn store(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Store(Box::new(err))
    }

    /// Whether the store failed because its disk is full (ENOSPC anywhere in the chain; redb
    /// keeps only the message of some I/O errors, so the words count too). The API answers
    /// 507 Insufficient Storage.
    pub fn is_storage_full(&self) -> bool {
        let Error::Store(err) = self else {
            return false;
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
        while let Some(err) = next {
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && (io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28))
            {
                return true;
            }
            if err
                .to_string()
                .to_ascii_lowercase()
                .contains("no space left on device")
            {
                return true;
            }
            next = err.source();
        }
        false
    }
}
