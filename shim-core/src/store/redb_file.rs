//! The embedded default store: one redb file, written by a single thread that commits queued
//! writes in batches (group commit), so many writes share one fsync and none is lost on kill -9.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Ack, Store};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::record::ServiceRecord;

const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
/// Key: (service id, per-service sequence number).
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");

/// Most writes folded into one transaction.
const BATCH: usize = 4096;

enum Write {
    Record { id: String, bytes: Vec<u8> },
    Event { id: String, bytes: Vec<u8> },
}

struct Queued {
    write: Write,
    ack: oneshot::Sender<Result<()>>,
}

/// A [`Store`] in one redb file.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    writer: mpsc::Sender<Queued>,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens (or creates) the database at `path`, keeping `history` events per service.
    ///
    /// # Errors
    /// When the file cannot be created or is not a redb database (or is locked by another shim).
    pub fn open(path: impl AsRef<Path>, history: usize) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(Error::store)?;
        }
        let db = Arc::new(Database::create(&path).map_err(Error::store)?);
        {
            // Create the tables up front so readers never meet a missing table.
            let txn = db.begin_write().map_err(Error::store)?;
            txn.open_table(SERVICES).map_err(Error::store)?;
            txn.open_table(EVENTS).map_err(Error::store)?;
            txn.commit().map_err(Error::store)?;
        }
        let (writer, queue) = mpsc::channel();
        let thread_db = db.clone();
        std::thread::Builder::new()
            .name("shim-store-writer".into())
            .spawn(move || write_loop(&thread_db, &queue, history as u64))
            .map_err(Error::store)?;
        Ok(Self { db, writer, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn enqueue(&self, write: Write) -> Ack {
        let (ack, done) = oneshot::channel();
        if self.writer.send(Queued { write, ack }).is_err() {
            return Box::pin(async { Err(Error::Config("store writer stopped".into())) });
        }
        Box::pin(async move {
            done.await
                .unwrap_or_else(|_| Err(Error::Config("store writer stopped".into())))
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> std::result::Result<T, redb::Error> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(Error::store)?
            .map_err(Error::store)
    }
}

fn write_loop(db: &Database, queue: &mpsc::Receiver<Queued>, history: u64) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let writes: Vec<&Write> = batch.iter().map(|q| &q.write).collect();
        let outcome = commit(db, &writes, history).map_err(|e| e.to_string());
        for queued in batch {
            let result = outcome
                .clone()
                .map_err(|message| Error::Store(message.into()));
            let _ = queued.ack.send(result);
        }
    }
}

fn commit(db: &Database, writes: &[&Write], history: u64) -> std::result::Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut services = txn.open_table(SERVICES)?;
        let mut events = txn.open_table(EVENTS)?;
        for write in writes {
            match write {
                Write::Record { id, bytes } => {
                    services.insert(id.as_str(), bytes.as_slice())?;
                }
                Write::Event { id, bytes } => {
                    let last = events
                        .range((id.as_str(), 0)..=(id.as_str(), u64::MAX))?
                        .next_back()
                        .transpose()?
                        .map_or(0, |(key, _)| key.value().1);
                    let seq = last + 1;
                    events.insert((id.as_str(), seq), bytes.as_slice())?;
                    if seq > history {
                        events.remove((id.as_str(), seq - history))?;
                    }
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[async_trait]
impl Store for RedbStore {
    fn save(&self, record: &ServiceRecord) -> Ack {
        match serde_json::to_vec(record) {
            Ok(bytes) => self.enqueue(Write::Record {
                id: record.id.clone(),
                bytes,
            }),
            Err(e) => Box::pin(async move { Err(Error::store(e)) }),
        }
    }

    fn append_event(&self, event: &Event) -> Ack {
        match serde_json::to_vec(event) {
            Ok(bytes) => self.enqueue(Write::Event {
                id: event.service_id.clone(),
                bytes,
            }),
            Err(e) => Box::pin(async move { Err(Error::store(e)) }),
        }
    }

    async fn load_live(&self) -> Result<Vec<ServiceRecord>> {
        let raw = self
            .read(|db| {
                let txn = db.begin_read()?;
                let table = txn.open_table(SERVICES)?;
                let mut out = Vec::new();
                for row in table.iter()? {
                    let (_, value) = row?;
                    out.push(value.value().to_vec());
                }
                Ok(out)
            })
            .await?;
        let mut records = Vec::with_capacity(raw.len());
        for bytes in raw {
            let record: ServiceRecord = serde_json::from_slice(&bytes).map_err(Error::store)?;
            if record.is_live() {
                records.push(record);
            }
        }
        Ok(records)
    }

    async fn get(&self, id: &str) -> Result<Option<ServiceRecord>> {
        let id = id.to_string();
        let raw = self
            .read(move |db| {
                let txn = db.begin_read()?;
                let table = txn.open_table(SERVICES)?;
                Ok(table.get(id.as_str())?.map(|v| v.value().to_vec()))
            })
            .await?;
        raw.map(|bytes| serde_json::from_slice(&bytes).map_err(Error::store))
            .transpose()
    }

    async fn events(&self, id: &str, limit: usize) -> Result<Vec<Event>> {
        let id = id.to_string();
        let raw = self
            .read(move |db| {
                let txn = db.begin_read()?;
                let table = txn.open_table(EVENTS)?;
                let mut out = Vec::new();
                for row in table
                    .range((id.as_str(), 0)..=(id.as_str(), u64::MAX))?
                    .rev()
                    .take(limit)
                {
                    let (_, value) = row?;
                    out.push(value.value().to_vec());
                }
                out.reverse();
                Ok(out)
            })
            .await?;
        raw.iter()
            .map(|bytes| serde_json::from_slice(bytes).map_err(Error::store))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::event::EventKind;
    use crate::phase::Phase;
    use crate::spec::DeploySpec;

    fn event(id: &str, n: u64) -> Event {
        Event {
            time: Utc::now(),
            service_id: id.into(),
            generation: n,
            kind: EventKind::Accepted {
                action: "deploy".into(),
            },
        }
    }

    #[tokio::test]
    async fn records_and_events_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = RedbStore::open(&path, 3).unwrap();
            let mut live =
                ServiceRecord::new("aaaa0001".into(), DeploySpec::named("qwen"), Utc::now());
            live.phase = Phase::Running;
            live.endpoint = "http://127.0.0.1:1/v1/chat/completions".into();
            let mut gone =
                ServiceRecord::new("aaaa0002".into(), DeploySpec::named("old"), Utc::now());
            gone.phase = Phase::Deleted;
            store.save(&live).await.unwrap();
            store.save(&gone).await.unwrap();
            for n in 1..=5 {
                store.append_event(&event("aaaa0001", n)).await.unwrap();
            }
        }
        // The writer thread holds the database until its channel closes; wait for the file lock.
        let store = loop {
            match RedbStore::open(&path, 3) {
                Ok(store) => break store,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        let live = store.load_live().await.unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, "aaaa0001");
        assert_eq!(live[0].phase, Phase::Running);
        assert_eq!(
            store.get("aaaa0002").await.unwrap().unwrap().phase,
            Phase::Deleted
        );
        let history: Vec<u64> = store
            .events("aaaa0001", 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.generation)
            .collect();
        assert_eq!(history, [3, 4, 5], "bounded to the newest 3");
        let newest: Vec<u64> = store
            .events("aaaa0001", 2)
            .await
            .unwrap()
            .iter()
            .map(|e| e.generation)
            .collect();
        assert_eq!(newest, [4, 5]);
    }

    #[tokio::test]
    async fn writes_land_in_call_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), 10).unwrap();
        let mut record = ServiceRecord::new("bbbb0001".into(), DeploySpec::named("m"), Utc::now());
        let mut acks = Vec::new();
        for generation in 1..=50 {
            record.generation = generation;
            acks.push(store.save(&record));
        }
        for ack in acks {
            ack.await.unwrap();
        }
        assert_eq!(store.get("bbbb0001").await.unwrap().unwrap().generation, 50);
    }
}
