//! Where desired state and history live: a trait, an embedded file database (redb) and an
//! in-memory store for tests and embedders.

mod history;
mod memory;
mod redb_file;

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;

pub use history::EventHistory;
pub use memory::MemoryStore;
pub use redb_file::RedbStore;

use crate::error::Result;
use crate::event::Event;
use crate::record::ServiceRecord;

/// Resolves once a queued write is durable.
pub type Ack = BoxFuture<'static, Result<()>>;

/// Persistent state of the engine.
///
/// Writes are queued synchronously and applied in call order, so a caller that orders its calls
/// under a lock gets that order on disk without holding the lock across I/O; the returned
/// [`Ack`] says when the write is durable.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes (or overwrites) a service record. A store that keeps records in memory keeps
    /// this `Arc`, shared with the engine, rather than a copy.
    fn save(&self, record: &Arc<ServiceRecord>) -> Ack;

    /// Appends to a service's event history, dropping the oldest beyond the configured bound.
    fn append_event(&self, event: &Event) -> Ack;

    /// Every record that is not deleted.
    async fn load_live(&self) -> Result<Vec<ServiceRecord>>;

    /// One record, deleted ones included (they stay as history).
    async fn get(&self, id: &str) -> Result<Option<ServiceRecord>>;

    /// The newest `limit` events of a service, oldest first.
    async fn events(&self, id: &str, limit: usize) -> Result<Vec<Event>>;
}
