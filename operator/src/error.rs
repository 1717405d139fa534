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

    /// A bounded label naming the kind of error (metrics, condition reasons).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(e) if e.code == 409 => "conflict",
                kube::Error::Api(e) if e.code == 403 => "forbidden",
                kube::Error::Api(e) if e.code == 404 => "not_found",
                kube::Error::Api(e) if e.code == 422 || e.code == 400 => "invalid",
                kube::Error::Api(_) => "api",
                _ => "transport",
            },
            Error::WaitingForDelivery(_) => "waiting_for_delivery",
            Error::DnsCleanup(_) => "dns_cleanup",
            Error::NoNamespace => "no_namespace",
            Error::Finalizer(e) => match &**e {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.kind(),
                finalizer::Error::AddFinalizer(_) | finalizer::Error::RemoveFinalizer(_) => {
                    "finalizer"
                }
                _ => "finalizer",
            },
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
