//! Connections, and PostgreSQL's errors as distlock's.

use distlock_core::store::root_cause;
use distlock_core::{Error, ErrorKind};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// Opens a connection; its driver runs in a task that ends when it closes.
pub(crate) async fn open(config: &Config, target: &str) -> Result<Client, Error> {
    // The whole start-up, not only the TCP connect the config bounds.
    let connecting = tokio::time::timeout(crate::CONNECT_TIMEOUT, config.connect(NoTls));
    let (client, connection) = connecting
        .await
        .map_err(|_| {
            Error::unavailable(format!(
                "PostgreSQL at {target} did not finish connecting in {:?}; check the URL \
                 and that the server runs",
                crate::CONNECT_TIMEOUT
            ))
        })?
        .map_err(|err| connect_error(target, err))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!("PostgreSQL connection ended: {err}");
        }
    });
    Ok(client)
}

/// Why a connection could not be made, and what to do; the driver's error
/// is the source.
fn connect_error(target: &str, err: tokio_postgres::Error) -> Error {
    let code = err.code();
    let detail = err
        .as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_else(|| root_cause(&err));
    let error = if code == Some(&SqlState::INVALID_PASSWORD)
        || code == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    {
        Error::config(format!(
            "PostgreSQL at {target} refused the login ({detail}); check the user and password \
             in the URL"
        ))
    } else if code == Some(&SqlState::INVALID_CATALOG_NAME) {
        Error::config(format!(
            "PostgreSQL at {target}: {detail}; create it or name another in the URL"
        ))
    } else {
        Error::unavailable(format!(
            "cannot reach PostgreSQL at {target} ({detail}); check the URL and that the server \
             runs"
        ))
    };
    error.with_source(err)
}

/// An error of a query on a connection that was up; the driver's error is
/// the source.
pub(crate) fn query_error(target: &str, err: tokio_postgres::Error) -> Error {
    let kind = if err.is_closed() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Store
    };
    // The server's hint, when it gives one, says what to change.
    let detail = err
        .as_db_error()
        .map(|db| match db.hint() {
            Some(hint) => format!("{}; {hint}", db.message()),
            None => db.message().to_owned(),
        })
        .unwrap_or_else(|| root_cause(&err));
    Error::new(kind, format!("PostgreSQL at {target}: {detail}")).with_source(err)
}
