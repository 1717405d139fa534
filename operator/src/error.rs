//! The operator's error type. [`Error::kind`] gives a bounded label for metrics and logs;
//! whether to retry is decided in one place, the controller's error policy.

use kube::runtime::finalizer;

/// An error of one reconcile pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    /// Deletion waits for queued mail (not a failure: retried until the queues are empty).
    #[error("waiting for queued mail to be delivered: {0}")]
    WaitingForDelivery(String),
    /// Removing the DNS records on deletion failed (retried; the finalizer stays).
    #[error("removing DNS records: {0}")]
    DnsCleanup(String),
    /// The object has no namespace (BackupMx is namespaced, so this is a bug or a bad client).
    #[error("the BackupMx has no namespace")]
    NoNamespace,
    /// The finalizer wrapper failed (adding/removing the finalizer, or apply/cleanup inside it).
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// Adds what was being done to a kube error.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }

    /// What kind of error this is: the metrics label and the retry decision come from it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(e) if e.code == 409 => ErrorKind::Conflict,
                kube::Error::Api(e) if e.code == 403 => ErrorKind::Forbidden,
                kube::Error::Api(e) if e.code == 404 => ErrorKind::NotFound,
                kube::Error::Api(e) if e.code == 422 || e.code == 400 => ErrorKind::Invalid,
                kube::Error::Api(_) => ErrorKind::Api,
                _ => ErrorKind::Transport,
            },
            Error::WaitingForDelivery(_) => ErrorKind::WaitingForDelivery,
            Error::DnsCleanup(_) => ErrorKind::DnsCleanup,
            Error::NoNamespace => ErrorKind::NoNamespace,
            Error::Finalizer(e) => match &**e {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.kind(),
                _ => ErrorKind::Finalizer,
            },
        }
    }
}

/// The kind of a reconcile error: a bounded label (`backupmx_reconcile_errors_total{kind}`)
/// and what the controller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 409 from the API server: someone else wrote the object first; retried soon.
    Conflict,
    Forbidden,
    NotFound,
    Invalid,
    Api,
    /// The API server could not be reached.
    Transport,
    /// Deletion waits for queued mail: not a failure.
    WaitingForDelivery,
    DnsCleanup,
    NoNamespace,
    Finalizer,
}

impl ErrorKind {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Conflict => "conflict",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Api => "api",
            ErrorKind::Transport => "transport",
            ErrorKind::WaitingForDelivery => "waiting_for_delivery",
            ErrorKind::DnsCleanup => "dns_cleanup",
            ErrorKind::NoNamespace => "no_namespace",
            ErrorKind::Finalizer => "finalizer",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
