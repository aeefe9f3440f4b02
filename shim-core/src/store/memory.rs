//! A store that keeps everything in memory: for tests and embedders who persist elsewhere.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Ack, Store};
use crate::error::Result;
use crate::event::Event;
use crate::record::ServiceRecord;

/// In-memory [`Store`]; nothing survives the process.
#[derive(Debug)]
pub struct MemoryStore {
    history: usize,
    records: Mutex<HashMap<String, ServiceRecord>>,
    events: Mutex<HashMap<String, VecDeque<Event>>>,
}

impl MemoryStore {
    /// A store keeping `history` events per service.
    pub fn new(history: usize) -> Self {
        Self {
            history,
            records: Mutex::default(),
            events: Mutex::default(),
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
    fn save(&self, record: &ServiceRecord) -> Ack {
        self.records
            .lock()
            .expect("store lock")
            .insert(record.id.clone(), record.clone());
        Box::pin(async { Ok(()) })
    }

    fn append_event(&self, event: &Event) -> Ack {
        let mut events = self.events.lock().expect("store lock");
        let list = events.entry(event.service_id.clone()).or_default();
        list.push_back(event.clone());
        while list.len() > self.history {
            list.pop_front();
        }
        Box::pin(async { Ok(()) })
    }

    async fn load_live(&self) -> Result<Vec<ServiceRecord>> {
        Ok(self
            .records
            .lock()
            .expect("store lock")
            .values()
            .filter(|r| r.is_live())
            .cloned()
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<ServiceRecord>> {
        Ok(self.records.lock().expect("store lock").get(id).cloned())
    }

    async fn events(&self, id: &str, limit: usize) -> Result<Vec<Event>> {
        let events = self.events.lock().expect("store lock");
        let list = events
            .get(id)
            .map(|l| l.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        Ok(list[list.len().saturating_sub(limit)..].to_vec())
    }
}
