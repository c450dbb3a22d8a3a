//! Where per-key state goes when it does not fit its memory share: an embedded on-disk B-tree
//! ([redb](https://docs.rs/redb)), one table per input partition, in an anonymous file (created
//! unlinked in `[state] dir`, so it vanishes with the process, even after a kill -9).
//!
//! Why redb: pure Rust (no C++ toolchain, no minutes of RocksDB build), one file, a page cache
//! of a size we set (it counts in the state's memory share), ACID transactions we do not need
//! the durability of. The changelog topic stays the only source of truth: the file is a cache
//! of evicted entries, emptied for a partition before its restore, never read after a restart.
//! So its commits are not durable ([`Durability::None`]: no fsync); one in
//! [`DURABLE_EVERY`] is ([`Durability::Eventual`], an fdatasync), because redb recycles the
//! pages freed by earlier commits only at such a commit.
//!
//! Besides the values, each partition has an **expiry index** of `dedup` ids (key: the time the
//! id completed, big-endian, then the id's state key): the ids' index leaves memory with the
//! values once the partition spills, and is read from its oldest end as ids expire.
//!
//! Reads go through the in-memory tier first (`super::Inner`): this file is reached only for a
//! key that was evicted, or never seen (a miss costs one B-tree lookup, mostly in the page
//! cache).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use redb::{
    Database, Durability, ReadOnlyTable, ReadableTable, ReadableTableMetadata, TableDefinition,
};

/// A disk error, said once with what was attempted.
#[derive(Debug, thiserror::Error)]
#[error("state spill file: {0}")]
pub struct SpillError(String);

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> SpillError + '_ {
    move |e| SpillError(format!("{what}: {e}"))
}

/// One write commit in this many is durable (see the module's doc).
pub const DURABLE_EVERY: u64 = 64;

/// What one eviction writes for a partition, in one transaction.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    /// A value with the time of its change, or `None`: removed.
    pub changes: Vec<(&'a [u8], Option<(i64, &'a [u8])>)>,
    /// Dedup ids entering the expiry index: (state key, completion time).
    pub index_add: &'a [(Bytes, i64)],
    /// Index entries up to this one (included) were expired: removed.
    pub index_done_through: Option<&'a [u8]>,
}

/// The spill file of one pipeline's state.
pub struct Spill {
    db: Database,
    /// The same file (another descriptor), for its size.
    file: File,
    /// Table names, by partition (`TableDefinition` borrows its name): values, expiry index.
    names: Vec<(String, String)>,
    commits: AtomicU64,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spill")
            .field("partitions", &self.names.len())
            .finish()
    }
}

impl Spill {
    /// An empty spill file in `dir` for `partitions` partitions, with a page cache of `cache`
    /// bytes.
    pub fn create(dir: &Path, partitions: usize, cache: usize) -> Result<Self, SpillError> {
        std::fs::create_dir_all(dir).map_err(|e| err("create its directory")(&e))?;
        let file = tempfile::tempfile_in(dir)
            .map_err(|e| err(&format!("create it in {}", dir.display()))(&e))?;
        let size = file.try_clone().map_err(|e| err("open it")(&e))?;
        let db = Database::builder()
            .set_cache_size(cache)
            .create_file(file)
            .map_err(|e| err("create the database")(&e))?;
        Ok(Spill {
            db,
            file: size,
            names: (0..partitions)
                .map(|p| (format!("p{p}"), format!("x{p}")))
                .collect(),
            commits: AtomicU64::new(0),
        })
    }

    fn table(&self, partition: i32) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
        TableDefinition::new(&self.names[partition as usize].0)
    }

    fn index(&self, partition: i32) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
        TableDefinition::new(&self.names[partition as usize].1)
    }

    /// `def` in a read transaction of its own; `None` when the table was never written (or
    /// was cleared): empty.
    fn open_read(
        &self,
        def: TableDefinition<'_, &'static [u8], &'static [u8]>,
        e: &impl Fn(&dyn std::fmt::Display) -> SpillError,
    ) -> Result<Option<ReadOnlyTable<&'static [u8], &'static [u8]>>, SpillError> {
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        match txn.open_table(def) {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(x) => Err(e(&x)),
        }
    }

    /// The value of `key` in `partition`'s table, with the time of its last change (ms).
    pub fn get(&self, partition: i32, key: &[u8]) -> Result<Option<(i64, Bytes)>, SpillError> {
        let e = err("read");
        let Some(table) = self.open_read(self.table(partition), &e)? else {
            return Ok(None);
        };
        let v = table.get(key).map_err(|x| e(&x))?;
        Ok(v.map(|v| split(v.value())))
    }

    /// Writes `batch` for `partition` in one transaction, committed only if `still()` holds
    /// then (checked under redb's writer lock: a partition reset after the batch was taken
    /// makes it void). Returns whether it was committed.
    pub fn write(
        &self,
        partition: i32,
        batch: &Batch<'_>,
        still: impl FnOnce() -> bool,
    ) -> Result<bool, SpillError> {
        let e = err("write");
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        let n = self.commits.fetch_add(1, Relaxed);
        txn.set_durability(if n % DURABLE_EVERY == DURABLE_EVERY - 1 {
            Durability::Eventual
        } else {
            Durability::None
        });
        {
            let mut table = txn.open_table(self.table(partition)).map_err(|x| e(&x))?;
            let mut row = Vec::new();
            for (k, v) in &batch.changes {
                match v {
                    Some((at, v)) => {
                        row.clear();
                        row.extend_from_slice(&at.to_be_bytes());
                        row.extend_from_slice(v);
                        table.insert(*k, row.as_slice()).map_err(|x| e(&x))?;
                    }
                    None => {
                        table.remove(*k).map_err(|x| e(&x))?;
                    }
                }
            }
            if !batch.index_add.is_empty() || batch.index_done_through.is_some() {
                let mut index = txn.open_table(self.index(partition)).map_err(|x| e(&x))?;
                if let Some(through) = batch.index_done_through {
                    index
                        .retain_in::<&[u8], _>(..=through, |_, _| false)
                        .map_err(|x| e(&x))?;
                }
                for (key, at) in batch.index_add {
                    row.clear();
                    row.extend_from_slice(&at.to_be_bytes());
                    row.extend_from_slice(key);
                    index.insert(row.as_slice(), &[][..]).map_err(|x| e(&x))?;
                }
            }
        }
        if !still() {
            txn.abort().map_err(|x| e(&x))?;
            return Ok(false);
        }
        txn.commit().map_err(|x| e(&x))?;
        Ok(true)
    }

    /// Up to `most` expiry index entries of `partition` after `after` (excluded) whose time is
    /// at or before `before_ms`, oldest first: (index entry, completion time, state key).
    pub fn expired(
        &self,
        partition: i32,
        after: Option<&[u8]>,
        before_ms: i64,
        most: usize,
    ) -> Result<Vec<(Bytes, i64, Bytes)>, SpillError> {
        let e = err("read the expiry index");
        let Some(index) = self.open_read(self.index(partition), &e)? else {
            return Ok(Vec::new());
        };
        let range = match after {
            Some(a) => {
                index.range::<&[u8]>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
            }
            None => index.range::<&[u8]>(..),
        }
        .map_err(|x| e(&x))?;
        let mut out = Vec::new();
        for row in range {
            if out.len() >= most {
                break;
            }
            let (k, _) = row.map_err(|x| e(&x))?;
            let k = k.value();
            let Some((at, key)) = k.split_first_chunk::<8>() else {
                continue;
            };
            let at = i64::from_be_bytes(*at);
            if at > before_ms {
                break;
            }
            out.push((Bytes::copy_from_slice(k), at, Bytes::copy_from_slice(key)));
        }
        Ok(out)
    }

    /// Empties `partition`'s tables (before a restore, after a revocation).
    pub fn clear(&self, partition: i32) -> Result<(), SpillError> {
        let e = err("clear");
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(Durability::Eventual);
        txn.delete_table(self.table(partition)).map_err(|x| e(&x))?;
        txn.delete_table(self.index(partition)).map_err(|x| e(&x))?;
        txn.commit().map_err(|x| e(&x))
    }

    /// Keys in `partition`'s table.
    pub fn len(&self, partition: i32) -> Result<u64, SpillError> {
        let e = err("count");
        match self.open_read(self.table(partition), &e)? {
            Some(t) => t.len().map_err(|x| e(&x)),
            None => Ok(0),
        }
    }

    /// Every key and value of `partition`'s table (tests, `/debug`-free snapshots).
    pub fn entries(&self, partition: i32) -> Result<Vec<(Bytes, Bytes)>, SpillError> {
        let e = err("scan");
        let Some(table) = self.open_read(self.table(partition), &e)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|x| e(&x))? {
            let (k, v) = row.map_err(|x| e(&x))?;
            out.push((Bytes::copy_from_slice(k.value()), split(v.value()).1));
        }
        Ok(out)
    }

    /// The file's size on disk (`keyflow_state_disk_bytes`).
    pub fn file_bytes(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }
}

/// A row: the time of the change (8 bytes, big-endian ms), then the value.
fn split(row: &[u8]) -> (i64, Bytes) {
    match row.split_first_chunk::<8>() {
        Some((at, v)) => (i64::from_be_bytes(*at), Bytes::copy_from_slice(v)),
        None => (0, Bytes::copy_from_slice(row)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reads_and_clears_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spill::create(dir.path(), 2, 1 << 20).unwrap();
        assert_eq!(s.get(0, b"a").unwrap(), None);
        let write = |p, changes| {
            let batch = Batch {
                changes,
                ..Batch::default()
            };
            assert!(s.write(p, &batch, || true).unwrap());
        };
        write(
            0,
            vec![
                (&b"a"[..], Some((7, &b"1"[..]))),
                (&b"b"[..], Some((8, &b"2"[..]))),
            ],
        );
        write(1, vec![(&b"a"[..], Some((9, &b"x"[..])))]);
        write(0, vec![(&b"b"[..], None)]);
        // A batch whose partition was reset meanwhile is not committed.
        let void = Batch {
            changes: vec![(&b"z"[..], Some((1, &b"1"[..])))],
            ..Batch::default()
        };
        assert!(!s.write(0, &void, || false).unwrap());
        assert_eq!(s.get(0, b"z").unwrap(), None);
        assert_eq!(s.get(0, b"a").unwrap(), Some((7, Bytes::from_static(b"1"))));
        assert_eq!(s.get(0, b"b").unwrap(), None);
        assert_eq!(s.len(0).unwrap(), 1);
        s.clear(0).unwrap();
        assert_eq!(s.get(0, b"a").unwrap(), None);
        assert_eq!(s.get(1, b"a").unwrap(), Some((9, Bytes::from_static(b"x"))));
        // The expiry index: oldest first, up to a time, after a cursor; a done prefix removed.
        let ids = [
            (Bytes::from_static(b"id-b"), 20),
            (Bytes::from_static(b"id-a"), 10),
            (Bytes::from_static(b"id-c"), 30),
        ];
        assert!(s
            .write(
                1,
                &Batch {
                    index_add: &ids,
                    ..Batch::default()
                },
                || true
            )
            .unwrap());
        let due = s.expired(1, None, 20, 10).unwrap();
        assert_eq!(
            due.iter().map(|e| (e.1, &e.2[..])).collect::<Vec<_>>(),
            [(10, &b"id-a"[..]), (20, &b"id-b"[..])]
        );
        assert_eq!(s.expired(1, Some(&due[0].0), 20, 10).unwrap().len(), 1);
        let done = Batch {
            index_done_through: Some(&due[1].0),
            ..Batch::default()
        };
        assert!(s.write(1, &done, || true).unwrap());
        assert_eq!(s.expired(1, None, 99, 10).unwrap().len(), 1, "id-c is left");
        // The file is anonymous: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(s.file_bytes() > 0);
    }
}
