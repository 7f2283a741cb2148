//! Connections, and the server's errors as distlock's.

use distlock_core::{Error, ErrorKind};
use mysql_async::{Conn, Opts, Pool};

use crate::CONNECT_TIMEOUT;

/// A connection of its own (a session's).
pub(crate) async fn dedicated(opts: &Opts, target: &str) -> Result<Conn, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts.clone())).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(connect_error(target, err)),
        Err(_) => Err(no_answer(target)),
    }
}

/// A connection from the store's pool.
pub(crate) async fn pooled(pool: &Pool, target: &str) -> Result<Conn, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, pool.get_conn()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(connect_error(target, err)),
        Err(_) => Err(no_answer(target)),
    }
}

fn no_answer(target: &str) -> Error {
    Error::unavailable(format!(
        "cannot reach MySQL at {target} (no answer in {CONNECT_TIMEOUT:?}); check the URL and \
         that the server runs"
    ))
}

/// Why a connection could not be made, and what to do; the driver's error
/// is the source.
fn connect_error(target: &str, err: mysql_async::Error) -> Error {
    let error = match &err {
        // Access denied: the login.
        mysql_async::Error::Server(server) if server.code == 1045 => Error::config(format!(
            "MySQL at {target} refused the login ({}); check the user and password in the URL",
            server.message
        )),
        // Access denied: the database, to a login that was good.
        mysql_async::Error::Server(server) if server.code == 1044 => Error::config(format!(
            "MySQL at {target}: {}; grant the user access to the database, or name another \
             in the URL",
            server.message
        )),
        // Unknown database.
        mysql_async::Error::Server(server) if server.code == 1049 => Error::config(format!(
            "MySQL at {target}: {}; create it or name another in the URL",
            server.message
        )),
        other => Error::unavailable(format!(
            "cannot reach MySQL at {target} ({other}); check the URL and that the server runs"
        )),
    };
    error.with_source(err)
}

/// The server's error code behind `err`, if the server refused a statement.
pub(crate) fn server_code(err: &Error) -> Option<u16> {
    match std::error::Error::source(err)?.downcast_ref::<mysql_async::Error>()? {
        mysql_async::Error::Server(server) => Some(server.code),
        _ => None,
    }
}

/// An error of a statement on a connection that was up; the driver's error
/// is the source.
pub(crate) fn query_error(target: &str, err: mysql_async::Error) -> Error {
    let kind = if err.is_fatal() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Store
    };
    Error::new(kind, format!("MySQL at {target}: {err}")).with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: u16, message: &str) -> Error {
        let server = mysql_async::ServerError {
            code,
            message: message.to_owned(),
            state: "HY000".to_owned(),
        };
        connect_error("127.0.0.1:3306", mysql_async::Error::Server(server))
    }

    #[test]
    fn each_refusal_at_connect_says_what_to_do() {
        // Code, the server's message, the kind, and what ours must say. Too
        // many connections: the server is there, and may take one later.
        let cases = [
            (
                1045,
                "Access denied for user 'u'",
                ErrorKind::Config,
                "user and password",
            ),
            (
                1044,
                "Access denied for user 'u' to database 'd'",
                ErrorKind::Config,
                "grant the user access",
            ),
            (
                1049,
                "Unknown database 'nowhere'",
                ErrorKind::Config,
                "create it",
            ),
            (
                1040,
                "Too many connections",
                ErrorKind::Unavailable,
                "Too many connections",
            ),
        ];
        for (code, message, kind, says) in cases {
            let err = refused(code, message);
            assert_eq!(err.kind(), kind, "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}
