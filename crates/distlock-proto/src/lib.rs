//! The distlock gRPC protocol: messages and the `Locks` service, generated
//! from `proto/distlock.proto`. Clients in other languages generate theirs
//! from the same file.

#![allow(missing_docs, clippy::all, reason = "generated code")]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("distlock.v1");
}
