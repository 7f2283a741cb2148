//! What the server's codes mean to a client: the one mapping from the
//! protocol's [`Code`]s (in a `Failed` or an `End`) and gRPC statuses to
//! distlock's [`ErrorKind`]. The server names codes; a client reports
//! these kinds.

use distlock_core::ErrorKind;

use crate::v1::Code;

/// The kind of error a client reports for a `Failed` with `code`.
///
/// A code this version does not know (one a newer server added) is a
/// `Store` error, as an unknown code has always been; its message still
/// says what happened.
pub fn kind_of(code: i32) -> ErrorKind {
    match Code::try_from(code) {
        Ok(Code::InvalidKey) => ErrorKind::InvalidKey,
        Ok(Code::InvalidArgument | Code::Unauthenticated) => ErrorKind::Config,
        Ok(Code::NotHeld) => ErrorKind::NotHeld,
        Ok(Code::SessionLost) => ErrorKind::Lost,
        Ok(Code::AlreadyHeld) => ErrorKind::Conflict,
        Ok(Code::ResourceExhausted | Code::Unavailable) => ErrorKind::Unavailable,
        Ok(Code::Unspecified) | Err(_) => ErrorKind::Store,
    }
}

/// The kind of error a client reports for an `End` with `code`: without a
/// code the stream was closed; with one, as in a `Failed`.
pub fn kind_of_end(code: i32) -> ErrorKind {
    if code == i32::from(Code::Unspecified) {
        ErrorKind::Closed
    } else {
        kind_of(code)
    }
}

/// The kind of error a client reports for a gRPC status, from the server
/// or from the client's own transport.
pub fn kind_of_status(code: tonic::Code) -> ErrorKind {
    use tonic::Code;
    match code {
        Code::Unauthenticated | Code::InvalidArgument | Code::FailedPrecondition => {
            ErrorKind::Config
        }
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Cancelled => {
            ErrorKind::Unavailable
        }
        // A server older than the client, without the call.
        Code::Unimplemented => ErrorKind::Unsupported,
        _ => ErrorKind::Store,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind, with the codes that a client reads as it. Written out by
    /// hand: a new kind or code belongs here.
    const KINDS: [(ErrorKind, &[Code]); 10] = [
        (ErrorKind::InvalidKey, &[Code::InvalidKey]),
        (ErrorKind::Timeout, &[]),
        (ErrorKind::Lost, &[Code::SessionLost]),
        (ErrorKind::NotHeld, &[Code::NotHeld]),
        (ErrorKind::Conflict, &[Code::AlreadyHeld]),
        (
            ErrorKind::Unavailable,
            &[Code::Unavailable, Code::ResourceExhausted],
        ),
        (
            ErrorKind::Config,
            &[Code::InvalidArgument, Code::Unauthenticated],
        ),
        (ErrorKind::Unsupported, &[]),
        (ErrorKind::Store, &[Code::Unspecified]),
        (ErrorKind::Closed, &[]),
    ];

    #[test]
    fn every_kind_comes_back_from_its_codes() {
        for (kind, codes) in KINDS {
            for &code in codes {
                assert_eq!(kind_of(code.into()), kind, "{code:?}");
            }
        }
    }

    #[test]
    fn every_code_means_one_kind() {
        let mut known = 0;
        while let Ok(code) = Code::try_from(known) {
            let rows = KINDS.iter().filter(|(_, codes)| codes.contains(&code));
            assert_eq!(rows.count(), 1, "{code:?} is not in exactly one row");
            known += 1;
        }
        assert!(known > 8, "CODE_INVALID_KEY is 8");
    }

    #[test]
    fn an_unknown_code_is_a_store_error_and_an_end_without_one_is_closed() {
        assert_eq!(kind_of(i32::MAX), ErrorKind::Store);
        assert_eq!(kind_of_end(i32::MAX), ErrorKind::Store);
        assert_eq!(kind_of_end(Code::Unspecified.into()), ErrorKind::Closed);
        assert_eq!(kind_of_end(Code::Unauthenticated.into()), ErrorKind::Config);
    }

    #[test]
    fn grpc_statuses_are_config_unavailable_or_store() {
        for code in [tonic::Code::Unavailable, tonic::Code::DeadlineExceeded] {
            assert_eq!(kind_of_status(code), ErrorKind::Unavailable);
        }
        assert_eq!(
            kind_of_status(tonic::Code::Unauthenticated),
            ErrorKind::Config
        );
        assert_eq!(kind_of_status(tonic::Code::Internal), ErrorKind::Store);
    }
}
