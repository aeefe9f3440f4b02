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

/// The error for a state file that cannot be read: which file, what is wrong, how to recover.
fn damaged(path: &Path, detail: &str) -> Error {
    let path = path.display();
    Error::store(std::io::Error::other(format!(
        "the state file {path} is damaged or unreadable: {detail}. The shim will not start from an empty state, \
         which would forget every service while its workloads keep running. To recover, restore \
         {path} from a backup, or move it aside (mv {path} {path}.broken) to start empty: the \
         workloads still running are then reported as orphans and left alone"
    )))
}

impl RedbStore {
    /// Opens (or creates) the database at `path`, keeping `history` events per service.
    ///
    /// A damaged file (truncated, empty, not a redb file) is refused with a message that names
    /// it and says how to recover, never opened as an empty state: starting empty would forget
    /// every service while their workloads keep running.
    ///
    /// # Errors
    /// When the file cannot be created, is damaged, or is locked by another shim.
    pub fn open(path: impl AsRef<Path>, history: usize) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(Error::store)?;
        }
        // redb would initialise a zero-length file as a new, empty database.
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            return Err(damaged(&path, "the file is empty (truncated?)"));
        }
        // redb may panic on some damaged files rather than return an error.
        let opened = std::panic::catch_unwind(|| Database::create(&path))
            .map_err(|_| damaged(&path, "reading it made the database library panic"))?;
        let db = opened.map_err(|err| match err {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                Error::store(std::io::Error::other(format!(
                    "the state file {} is in use by another process (is another shim running \
                     with the same data directory?)",
                    path.display()
                )))
            }
            other => damaged(&path, &other.to_string()),
        })?;
        let db = Arc::new(db);
        // Create the tables up front so readers never meet a missing table.
        let tables = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let txn = db.begin_write()?;
            txn.open_table(SERVICES)?;
            txn.open_table(EVENTS)?;
            txn.commit()?;
            Ok::<_, redb::Error>(())
        }));
        match tables {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(damaged(&path, &err.to_string())),
            Err(_) => {
                return Err(damaged(&path, "reading it made the database library panic"));
            }
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
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(result) => result.map_err(Error::store),
            // redb panics on some damaged pages instead of returning an error.
            Err(join) if join.is_panic() => {
                Err(damaged(&path, "reading it made the database library panic"))
            }
            Err(join) => Err(Error::store(join)),
        }
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
    fn save(&self, record: &Arc<ServiceRecord>) -> Ack {
        match serde_json::to_vec(&**record) {
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
            let record: ServiceRecord = serde_json::from_slice(&bytes).map_err(|e| {
                damaged(
                    &self.path,
                    &format!("a service record does not decode: {e}"),
                )
            })?;
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
            store.save(&Arc::new(live)).await.unwrap();
            store.save(&Arc::new(gone)).await.unwrap();
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
            acks.push(store.save(&Arc::new(record.clone())));
        }
        for ack in acks {
            ack.await.unwrap();
        }
        assert_eq!(store.get("bbbb0001").await.unwrap().unwrap().generation, 50);
    }

    /// A store with 50 services, closed; returns the file.
    async fn filled(dir: &Path) -> PathBuf {
        let path = dir.join("state.redb");
        let store = RedbStore::open(&path, 10).unwrap();
        for i in 0..50u32 {
            let record = ServiceRecord::new(format!("{i:08x}"), DeploySpec::named("m"), Utc::now());
            store.save(&Arc::new(record)).await.unwrap();
        }
        drop(store);
        // The writer thread lets go of the file once it sees the store is gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while let Err(err) = Database::create(&path).map(drop) {
            assert!(std::time::Instant::now() < deadline, "{err}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        path
    }

    #[tokio::test]
    async fn a_damaged_file_is_refused_with_its_name_and_the_way_out_never_read_as_empty() {
        type Damage = fn(&mut Vec<u8>);
        let damages: [(&str, Damage); 4] = [
            ("truncated to half", |b| b.truncate(b.len() / 2)),
            ("truncated to nothing", Vec::clear),
            ("overwritten header", |b| b[..64].fill(0x41)),
            ("overwritten middle", |b| {
                let m = b.len() / 2;
                b[m..m + 4096].fill(0xAB);
            }),
        ];
        for (what, damage) in damages {
            let dir = tempfile::tempdir().unwrap();
            let path = filled(dir.path()).await;
            let mut bytes = std::fs::read(&path).unwrap();
            damage(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let loaded = match RedbStore::open(&path, 10) {
                Ok(store) => store.load_live().await,
                Err(err) => Err(err),
            };
            match loaded {
                // Damage where no data lives may go unnoticed, but then nothing is missing.
                Ok(live) => assert_eq!(live.len(), 50, "{what}: a partial state was read"),
                Err(err) => {
                    let message = err.to_string();
                    assert!(
                        message.contains(&path.display().to_string())
                            && message.contains("damaged")
                            && message.contains("mv "),
                        "{what}: {message}"
                    );
                }
            }
            // The three that damage data or layout must be refused.
            if what != "overwritten middle" {
                assert!(
                    RedbStore::open(&path, 10).is_err(),
                    "{what}: opened a damaged file"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_second_shim_on_the_same_file_is_told_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _first = RedbStore::open(&path, 10).unwrap();
        let err = RedbStore::open(&path, 10).unwrap_err().to_string();
        assert!(err.contains("in use by another process"), "{err}");
    }
}
