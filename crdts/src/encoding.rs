//! The one encoding of states for disk and wire: a version byte, then MessagePack
//! with named fields.
//!
//! Named fields make the encoding self-describing, so fields can be added without a
//! new version; the version byte is for changes that named fields cannot absorb.
//! Decoding validates as it goes (a dot counter of 0, for example, is refused), so a
//! decoded state is one that the mutators could have built.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format version written in front of every encoded state.
pub const FORMAT_VERSION: u8 = 1;

/// Why bytes could not be decoded into a state.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// There were no bytes at all.
    #[error("empty input: expected a version byte")]
    Empty,
    /// The version byte is not one this build reads.
    #[error("unsupported format version {found} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The MessagePack body does not describe a valid state of the expected type.
    #[error("malformed state: {source}")]
    Malformed {
        /// What the MessagePack decoder said.
        #[source]
        source: rmp_serde::decode::Error,
    },
    /// The body decoded, but bytes were left over after it.
    #[error("{extra} bytes left over after the state")]
    TrailingBytes {
        /// How many bytes were left.
        extra: usize,
    },
}

/// Why a state could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode state: {source}")]
pub struct EncodeError {
    #[source]
    source: rmp_serde::encode::Error,
}

/// Encodes a state: [`FORMAT_VERSION`], then MessagePack with named fields.
pub fn encode<T: Serialize + ?Sized>(state: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![FORMAT_VERSION];
    let mut serializer = rmp_serde::Serializer::new(&mut out).with_struct_map();
    state.serialize(&mut serializer).map_err(|source| EncodeError { source })?;
    Ok(out)
}

/// Decodes a state written by [`encode`], refusing other versions and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (&version, mut body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    let state = T::deserialize(&mut rmp_serde::Deserializer::new(&mut body))
        .map_err(|source| DecodeError::Malformed { source })?;
    if !body.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: body.len() });
    }
    Ok(state)
}
