//! Where per-key state goes when it does not fit its memory share: an embedded on-disk B-tree
//! ([redb](https://docs.rs/redb)), one table per input partition, in an anonymous file (created
//! unlinked in `[state] dir`, so it vanishes with the process, even after a kill -9).
//!
//! Why redb: pure Rust (no C++ toolchain, no minutes of RocksDB build), one file, a page cache
//! of a size we set (it counts in the state's memory share), ACID transactions we do not need
//! the durability of. The changelog topic stays the only source of truth: the file is a cache
//! of evicted entries, emptied for a partition before its restore, never read after a restart.
//! So its commits skip the fsync ([`Durability::Eventual`]: written, pages recycled, not
//! flushed).
//!
//! Reads go through the in-memory tier first (`super::Inner`): this file is reached only for a
//! key that was evicted, or never seen (a miss costs one B-tree lookup, mostly in the page
//! cache).

use std::fs::File;
use std::path::Path;

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

/// A disk error, said once with what was attempted.
#[derive(Debug, thiserror::Error)]
#[error("state spill file: {0}")]
pub struct SpillError(String);

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> SpillError + '_ {
    move |e| SpillError(format!("{what}: {e}"))
}

/// The spill file of one pipeline's state.
pub struct Spill {
    db: Database,
    /// The same file (another descriptor), for its size.
    file: File,
    /// Table names, by partition (`TableDefinition` borrows its name).
    names: Vec<String>,
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
            names: (0..partitions).map(|p| format!("p{p}")).collect(),
        })
    }

    fn table(&self, partition: i32) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
        TableDefinition::new(&self.names[partition as usize])
    }

    /// The value of `key` in `partition`'s table, with the time of its last change (ms).
    pub fn get(&self, partition: i32, key: &[u8]) -> Result<Option<(i64, Bytes)>, SpillError> {
        let e = err("read");
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        let table = match txn.open_table(self.table(partition)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(x) => return Err(e(&x)),
        };
        let v = table.get(key).map_err(|x| e(&x))?;
        Ok(v.map(|v| split(v.value())))
    }

    /// Writes `changes` (a value with the time of its change, or `None`: removed) to
    /// `partition`'s table in one transaction.
    pub fn write<'a>(
        &self,
        partition: i32,
        changes: impl IntoIterator<Item = (&'a [u8], Option<(i64, &'a [u8])>)>,
    ) -> Result<(), SpillError> {
        let e = err("write");
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(Durability::Eventual);
        {
            let mut table = txn.open_table(self.table(partition)).map_err(|x| e(&x))?;
            let mut row = Vec::new();
            for (k, v) in changes {
                match v {
                    Some((at, v)) => {
                        row.clear();
                        row.extend_from_slice(&at.to_be_bytes());
                        row.extend_from_slice(v);
                        table.insert(k, row.as_slice()).map_err(|x| e(&x))?;
                    }
                    None => {
                        table.remove(k).map_err(|x| e(&x))?;
                    }
                }
            }
        }
        txn.commit().map_err(|x| e(&x))
    }

    /// Empties `partition`'s table (before a restore, after a revocation).
    pub fn clear(&self, partition: i32) -> Result<(), SpillError> {
        let e = err("clear");
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(Durability::Eventual);
        txn.delete_table(self.table(partition)).map_err(|x| e(&x))?;
        txn.commit().map_err(|x| e(&x))
    }

    /// Keys in `partition`'s table.
    pub fn len(&self, partition: i32) -> Result<u64, SpillError> {
        let e = err("count");
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        match txn.open_table(self.table(partition)) {
            Ok(t) => t.len().map_err(|x| e(&x)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(x) => Err(e(&x)),
        }
    }

    /// Every key and value of `partition`'s table (tests, `/debug`-free snapshots).
    pub fn entries(&self, partition: i32) -> Result<Vec<(Bytes, Bytes)>, SpillError> {
        let e = err("scan");
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        let table = match txn.open_table(self.table(partition)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(&x)),
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
        s.write(
            0,
            [(&b"a"[..], Some((7, &b"1"[..]))), (&b"b"[..], Some((8, &b"2"[..])))],
        )
        .unwrap();
        s.write(1, [(&b"a"[..], Some((9, &b"x"[..])))]).unwrap();
        s.write(0, [(&b"b"[..], None)]).unwrap();
        assert_eq!(s.get(0, b"a").unwrap(), Some((7, Bytes::from_static(b"1"))));
        assert_eq!(s.get(0, b"b").unwrap(), None);
        assert_eq!(s.len(0).unwrap(), 1);
        s.clear(0).unwrap();
        assert_eq!(s.get(0, b"a").unwrap(), None);
        assert_eq!(s.get(1, b"a").unwrap(), Some((9, Bytes::from_static(b"x"))));
        // The file is anonymous: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(s.file_bytes() > 0);
    }
}
