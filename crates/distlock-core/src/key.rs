//! The rule every key follows, on every store.

use crate::error::{Error, Result};

/// The longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Checks a key: any UTF-8 string of 1..=1024 bytes.
///
/// Stores that limit names (file names, `GET_LOCK`) map longer or odd keys
/// themselves; users never see those limits.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_key(
            "lock key is empty; a key is any UTF-8 string of 1 to 1024 bytes",
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::invalid_key(format!(
            "lock key is {} bytes long; a key is any UTF-8 string of 1 to {MAX_KEY_BYTES} bytes \
             (hash longer names before using them as keys)",
            key.len()
        )));
    }
    Ok(())
}

/// A 64-bit hash of a key (FNV-1a): stable across versions, platforms and
/// processes, unlike `std`'s hasher, for stores that must map a key to a
/// shorter name (a file, an advisory-lock number, a named lock). Two keys
/// may share a hash; stores say what that means for them.
pub fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn accepts_one_to_1024_bytes() {
        assert!(validate_key("a").is_ok());
        assert!(validate_key(&"k".repeat(1024)).is_ok());
        assert!(validate_key("coupons/batch 7/ünïcödé/🔒").is_ok());
    }

    #[test]
    fn rejects_empty_and_long_keys_with_the_rule() {
        for key in [String::new(), "k".repeat(1025)] {
            let err = validate_key(&key).expect_err("must be rejected");
            assert_eq!(err.kind(), ErrorKind::InvalidKey);
            assert!(err.to_string().contains("1 to 1024 bytes"), "{err}");
        }
    }
}
