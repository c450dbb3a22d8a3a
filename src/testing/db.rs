//! The database of a test file's `sql` processors (`[database] url_env = "VAR"`): the runner's
//! own connection to it, for the setup file, the per-case reset and `expect.rows`.
//!
//! The `sql` processors themselves are the pipeline's, pointed at the same connection string and
//! recording their source positions under the consumer name [`CONSUMER`], whose rows are
//! deleted before each case (messages of every case start at offset 0). The runner connects
//! like `tls = "prefer"` (encrypted when the server offers it, certificate not checked; the URL's
//! `sslmode` applies): it is a test database. Errors never show the connection string.

use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;

/// The `consumer` of every `sql` processor under `keyflow test`.
pub const CONSUMER: &str = "keyflow-test";

/// How long the runner waits for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The runner's connection, open for one test file.
pub struct Db {
    client: tokio_postgres::Client,
}

/// A database error as text: SQLSTATE and the server's message, or the client's error.
fn error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("SQLSTATE {}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

impl Db {
    pub async fn connect(url: &str) -> Result<Db, String> {
        let mut cfg = tokio_postgres::Config::from_str(url)
            .map_err(|_| "not a PostgreSQL connection string".to_string())?;
        cfg.connect_timeout(CONNECT_TIMEOUT);
        let mut ssl = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls())
            .map_err(|e| format!("tls: {e}"))?;
        ssl.set_verify(openssl::ssl::SslVerifyMode::NONE);
        let mut tls = postgres_openssl::MakeTlsConnector::new(ssl.build());
        tls.set_callback(|c, _| {
            c.set_verify_hostname(false);
            Ok(())
        });
        let (client, connection) = cfg
            .connect(tls)
            .await
            .map_err(|e| format!("cannot connect: {}", error(&e)))?;
        // Ends when `client` is dropped (or the server goes away).
        tokio::spawn(connection);
        Ok(Db { client })
    }

    /// Runs `sql` (one or more statements, e.g. a DDL file).
    pub async fn execute(&self, sql: &str) -> Result<(), String> {
        self.client.batch_execute(sql).await.map_err(|e| error(&e))
    }

    /// Forgets the positions recorded in each of `applied_tables` under [`CONSUMER`], so that a
    /// case's offsets are new to the `sql` processors.
    pub async fn forget_positions(&self, applied_tables: &[String]) -> Result<(), String> {
        for t in applied_tables {
            // `t` is an identifier (`SqlConfig::validate`); the table may not exist yet.
            let exists: bool = self
                .client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[t])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| error(&e))?;
            if exists {
                self.client
                    .execute(
                        &format!("DELETE FROM {t} WHERE consumer = $1"),
                        &[&CONSUMER],
                    )
                    .await
                    .map_err(|e| format!("{t}: {}", error(&e)))?;
            }
        }
        Ok(())
    }

    /// The rows `query` returns, as a JSON array of rows, each an array of its columns in order
    /// (values as PostgreSQL's `to_json` renders them: numbers, strings, booleans, null, JSON).
    pub async fn rows(&self, query: &str) -> Result<Value, String> {
        let rows = self
            .client
            .query(&wrap(query), &[])
            .await
            .map_err(|e| error(&e))?;
        rows.iter()
            .map(|r| {
                let text: Option<String> = r.try_get(0).map_err(|e| error(&e))?;
                match text {
                    // A row without columns.
                    None => Ok(Value::Array(Vec::new())),
                    Some(t) => serde_json::from_str(&t).map_err(|e| format!("row as JSON: {e}")),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array)
    }
}

/// `query` with each row turned into a JSON array of its columns, in column order (`json`, unlike
/// `jsonb`, keeps the order and repeated names).
fn wrap(query: &str) -> String {
    let q = query.trim().trim_end_matches(';');
    format!(
        "SELECT (SELECT json_agg(c.value ORDER BY c.n) \
         FROM json_each(row_to_json(q)) WITH ORDINALITY AS c(name, value, n))::text \
         FROM (\n{q}\n) AS q"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_query_is_wrapped_without_its_final_semicolon() {
        assert_eq!(
            super::wrap(" SELECT 1, 'a' ; \n"),
            "SELECT (SELECT json_agg(c.value ORDER BY c.n) FROM json_each(row_to_json(q)) \
             WITH ORDINALITY AS c(name, value, n))::text FROM (\nSELECT 1, 'a' \n) AS q"
        );
    }
}
