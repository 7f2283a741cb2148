//! The distlock protocol: messages and the `Locks` gRPC service, generated
//! from `proto/distlock.proto`, the framing of the multiplexed transport
//! ([`mux`]), the conversions between its messages and distlock's types
//! ([`convert`]), and the [`ErrorKind`](distlock_core::ErrorKind) a client
//! reports for each of the server's codes ([`kinds`]). Clients in other
//! languages generate theirs from the same file.

pub mod convert;
pub mod kinds;

/// The port a distlock server listens on unless told otherwise: the one
/// definition the server, the client and the CLI use.
pub const DEFAULT_PORT: u16 = 7890;

/// Version 1 of the protocol.
#[allow(missing_docs, clippy::all, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("distlock.v1");
}

/// Framing of the multiplexed transport (see `MuxRequest` in the `.proto`):
/// a preface, then protobuf messages each behind a 4-byte big-endian length.
pub mod mux {
    use bytes::{BufMut, BytesMut};
    use prost::Message;
    use tokio_util::codec::LengthDelimitedCodec;

    /// What a client writes first. Its first byte tells it apart from the
    /// HTTP/2 preface (`PRI …`) and a TLS handshake on the same port.
    pub const PREFACE: &[u8; 8] = b"DLMUX/1\n";

    /// Splits a byte stream into frames of at most `max_frame` bytes.
    pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
        LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(max_frame)
            .new_codec()
    }

    /// Appends `message` to `buf` as one frame.
    pub fn put_frame(buf: &mut BytesMut, message: &impl Message) {
        let len = message.encoded_len();
        buf.reserve(4 + len);
        buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        message
            .encode(buf)
            .expect("the buffer was reserved to the message's length");
    }
}
