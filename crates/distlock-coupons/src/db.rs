//! The coupon database: SQLite (embedded, the default) or PostgreSQL, behind
//! the few calls the coupon system makes. Statements use PostgreSQL's `$1`,
//! `$2`, … placeholders; for SQLite they become `?1`, `?2`, … (its `$NAME`
//! would be numbered by first use).

use std::path::PathBuf;
use std::time::Duration;

use crate::Error;

/// A value bound to a statement or read from a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer (`BIGINT`, SQLite `INTEGER`).
    Int(i64),
    /// Text.
    Text(String),
}

impl Value {
    /// The integer, if it is one.
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(*value),
            _ => None,
        }
    }

    /// The text, if it is text.
    pub fn text(&self) -> Option<&str> {
        match self {
            Value::Text(value) => Some(value),
            _ => None,
        }
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Int(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

/// A statement and its parameters.
pub type Statement<'a> = (&'a str, Vec<Value>);

/// Where the coupons are: `postgres://…`, or an SQLite file (`sqlite://PATH`
/// or a plain path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl Location {
    /// Reads `--db`.
    pub fn parse(text: &str) -> Location {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Location::Postgres(text.to_owned());
        }
        let path = text.strip_prefix("sqlite://").unwrap_or(text);
        Location::Sqlite(PathBuf::from(path))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Location::Postgres(url) => f.write_str(url),
        }
    }
}

/// One connection to the coupon database.
pub enum Db {
    /// SQLite: calls block, so they run with `block_in_place`.
    Sqlite(rusqlite::Connection),
    /// PostgreSQL.
    Postgres(tokio_postgres::Client),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Sqlite(_) => f.write_str("Db::Sqlite"),
            Db::Postgres(_) => f.write_str("Db::Postgres"),
        }
    }
}

fn db_error(err: impl std::fmt::Display) -> Error {
    Error::Db(err.to_string())
}

/// Runs a blocking SQLite call without stalling the runtime's other tasks.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(call)
}

/// `$N` placeholders as SQLite's `?N`.
fn sqlite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

fn sqlite_params(params: &[Value]) -> Vec<rusqlite::types::Value> {
    params
        .iter()
        .map(|value| match value {
            Value::Null => rusqlite::types::Value::Null,
            Value::Int(value) => rusqlite::types::Value::Integer(*value),
            Value::Text(value) => rusqlite::types::Value::Text(value.clone()),
        })
        .collect()
}

fn sqlite_value(value: rusqlite::types::ValueRef<'_>) -> Value {
    match value {
        rusqlite::types::ValueRef::Integer(value) => Value::Int(value),
        rusqlite::types::ValueRef::Text(text) => {
            Value::Text(String::from_utf8_lossy(text).into_owned())
        }
        // The schema has no other types.
        _ => Value::Null,
    }
}

fn postgres_params(params: &[Value]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|value| -> &(dyn tokio_postgres::types::ToSql + Sync) {
            match value {
                Value::Null => &None::<i64>,
                Value::Int(value) => value,
                Value::Text(value) => value,
            }
        })
        .collect()
}

fn postgres_row(row: &tokio_postgres::Row) -> Vec<Value> {
    use tokio_postgres::types::Type;
    (0..row.len())
        .map(|i| match *row.columns()[i].type_() {
            Type::INT8 => row.get::<_, Option<i64>>(i).map_or(Value::Null, Value::Int),
            Type::INT4 => row
                .get::<_, Option<i32>>(i)
                .map_or(Value::Null, |value| Value::Int(value.into())),
            _ => row
                .get::<_, Option<String>>(i)
                .map_or(Value::Null, Value::Text),
        })
        .collect()
}

impl Db {
    /// Connects to the database.
    pub async fn open(location: &Location) -> Result<Db, Error> {
        match location {
            Location::Sqlite(path) => {
                let connection = blocking(|| rusqlite::Connection::open(path)).map_err(|err| {
                    Error::Db(format!(
                        "cannot open SQLite database {}: {err}",
                        path.display()
                    ))
                })?;
                blocking(|| {
                    connection.busy_timeout(Duration::from_secs(30))?;
                    // Readers do not block the writer, nor it them.
                    connection.pragma_update(None, "journal_mode", "WAL")?;
                    connection.pragma_update(None, "synchronous", "NORMAL")
                })
                .map_err(db_error)?;
                Ok(Db::Sqlite(connection))
            }
            Location::Postgres(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .map_err(|err| {
                        Error::Db(format!(
                            "cannot connect to PostgreSQL at {url}: {err}; check the URL and \
                             that the server runs"
                        ))
                    })?;
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!("PostgreSQL connection ended: {err}");
                    }
                });
                Ok(Db::Postgres(client))
            }
        }
    }

    /// True for SQLite.
    pub fn is_sqlite(&self) -> bool {
        matches!(self, Db::Sqlite(_))
    }

    /// Runs statements with no parameters, one after the other (schema).
    pub async fn batch(&mut self, sql: &str) -> Result<(), Error> {
        match self {
            Db::Sqlite(connection) => blocking(|| connection.execute_batch(sql)).map_err(db_error),
            Db::Postgres(client) => client.batch_execute(sql).await.map_err(db_error),
        }
    }

    /// Runs a query and returns its rows.
    pub async fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, Error> {
        match self {
            Db::Sqlite(connection) => blocking(|| {
                let mut statement = connection.prepare_cached(&sqlite_sql(sql))?;
                let columns = statement.column_count();
                let mut rows =
                    statement.query(rusqlite::params_from_iter(sqlite_params(params)))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let mut values = Vec::with_capacity(columns);
                    for i in 0..columns {
                        values.push(sqlite_value(row.get_ref(i)?));
                    }
                    out.push(values);
                }
                Ok(out)
            })
            .map_err(|err: rusqlite::Error| db_error(err)),
            Db::Postgres(client) => {
                let params = postgres_params(params);
                let rows = client.query(sql, &params).await.map_err(db_error)?;
                Ok(rows.iter().map(postgres_row).collect())
            }
        }
    }

    /// Runs statements in one transaction. The first is the fenced write:
    /// if it changes no row, the transaction is rolled back and `false`
    /// returned (the token was stale, or its condition failed).
    pub async fn fenced(&mut self, statements: &[Statement<'_>]) -> Result<bool, Error> {
        self.fenced_by(1, statements).await
    }

    /// As [`Db::fenced`], with the first `fences` statements each a fenced
    /// write (one per lock the change is made under): if any changes no
    /// row, nothing is written.
    pub async fn fenced_by(
        &mut self,
        fences: usize,
        statements: &[Statement<'_>],
    ) -> Result<bool, Error> {
        match self {
            Db::Sqlite(connection) => blocking(|| {
                // IMMEDIATE: take the write lock first, so no reader's
                // snapshot has to be upgraded (which SQLite refuses).
                let transaction = connection
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                for (i, (sql, params)) in statements.iter().enumerate() {
                    let changed = transaction
                        .prepare_cached(&sqlite_sql(sql))?
                        .execute(rusqlite::params_from_iter(sqlite_params(params)))?;
                    if i < fences && changed == 0 {
                        return Ok(false);
                    }
                }
                transaction.commit()?;
                Ok(true)
            })
            .map_err(|err: rusqlite::Error| db_error(err)),
            Db::Postgres(client) => {
                let transaction = client.transaction().await.map_err(db_error)?;
                for (i, (sql, params)) in statements.iter().enumerate() {
                    let params = postgres_params(params);
                    let changed = transaction.execute(*sql, &params).await.map_err(db_error)?;
                    if i < fences && changed == 0 {
                        return Ok(false);
                    }
                }
                transaction.commit().await.map_err(db_error)?;
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_keep_their_numbers_in_sqlite() {
        assert_eq!(
            sqlite_sql("SET fence = $2 WHERE id = $1 AND fence <= $2 AND x = '$'"),
            "SET fence = ?2 WHERE id = ?1 AND fence <= ?2 AND x = '$'"
        );
    }
}
