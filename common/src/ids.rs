//! Identifier newtypes shared by both sides.
//!
//! A [`HostId`] is the Common Name of a host's client certificate. It is validated once, where it
//! enters (certificate, CLI argument, URL), so everything past that point can use it in sled
//! keys, file names and URLs without escaping.

use std::fmt;
use std::str::FromStr;

/// The most bytes a host id may have.
pub const HOST_ID_MAX_LEN: usize = 63;

/// A host's identity: 1..=63 characters of `a-z`, `0-9`, `-`, `_` and `.`, starting with a letter
/// or digit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct HostId(String);

/// Why a string is not a valid [`HostId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid host id {given:?}: use 1-{HOST_ID_MAX_LEN} characters of a-z, 0-9, '-', '_' and '.', \
     starting with a letter or digit"
)]
pub struct HostIdError {
    /// The rejected input.
    pub given: String,
}

impl HostId {
    /// Validates `s` as a host id.
    pub fn new(s: &str) -> Result<Self, HostIdError> {
        let valid_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
        let starts_well = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if s.len() <= HOST_ID_MAX_LEN && starts_well && s.chars().all(valid_char) {
            Ok(Self(s.to_owned()))
        } else {
            Err(HostIdError { given: s.to_owned() })
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HostId {
    type Err = HostIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> serde::Deserialize<'de> for HostId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A telemetry batch number: starts at 1 per spool and increases by 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_are_validated() {
        for good in ["gpu-01", "a", "host_3.rack-7", "0abc"] {
            assert!(HostId::new(good).is_ok(), "{good}");
        }
        for bad in ["", "-lead", "UPPER", "a b", "a/b", "x\0", &"a".repeat(64)] {
            let err = HostId::new(bad).unwrap_err();
            assert!(err.to_string().contains("invalid host id"), "{bad}");
        }
    }
}
