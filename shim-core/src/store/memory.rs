//! A store that keeps everything in memory: for tests and embedders who persist elsewhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Ack, EventHistory, Store};
use crate::error::Result;
use crate::event::Event;
use crate::record::ServiceRecord;

/// In-memory [`Store`]; nothing survives the process.
#[derive(Debug)]
pub struct MemoryStore {
    records: Mutex<HashMap<String, Arc<ServiceRecord>>>,
    events: EventHistory,
}

impl MemoryStore {
    /// A store keeping `history` events per service.
    pub fn new(history: usize) -> Self {
        Self {
            records: Mutex::default(),
            events: EventHistory::new(history),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(200)
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn save(&self, record: &Arc<ServiceRecord>) -> Ack {
        self.records
            .lock()
            .expect("store lock")
            .insert(record.id.clone(), Arc::clone(record));
        Box::pin(async { Ok(()) })
    }

    fn append_event(&self, event: &Event) -> Ack {
        self.events.push(event);
        Box::pin(async { Ok(()) })
    }

    async fn load_live(&self) -> Result<Vec<ServiceRecord>> {
        Ok(self
            .records
            .lock()
            .expect("store lock")
            .values()
            .filter(|r| r.is_live())
            .map(|r| ServiceRecord::clone(r))
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<ServiceRecord>> {
        Ok(self
            .records
            .lock()
            .expect("store lock")
            .get(id)
            .map(|r| ServiceRecord::clone(r)))
    }

    async fn events(&self, id: &str, limit: usize) -> Result<Vec<Event>> {
        Ok(self.events.newest(id, limit))
    }
}
