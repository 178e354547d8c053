//! Byte sizes as users write them: `512M`, `1G`, `1.5GiB`, `268435456`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes. Suffixes are binary (K = 1024) like docker's `--memory`;
/// a bare number is bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a size did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid size {input:?}: write a number with an optional K, M, G or T suffix, e.g. 512M or 2G"
)]
pub struct ParseSizeError {
    pub input: String,
}

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        Self(n * MIB)
    }

    pub fn as_mib(self) -> u64 {
        self.0 / MIB
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || ParseSizeError {
            input: input.to_owned(),
        };
        let text = input.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let shift = match suffix.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(err()),
        };
        if number.is_empty() {
            return Err(err());
        }
        let bytes = if number.contains('.') {
            let value: f64 = number.parse().map_err(|_| err())?;
            let bytes = value * (1u64 << shift) as f64;
            if !bytes.is_finite() || bytes >= u64::MAX as f64 {
                return Err(err());
            }
            bytes as u64
        } else {
            let value: u64 = number.parse().map_err(|_| err())?;
            value.checked_mul(1u64 << shift).ok_or_else(err)?
        };
        Ok(Self(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        for (shift, unit) in units {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    /// Accepts a number of bytes or a string such as "512M".
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(bytes) => Ok(Self(bytes)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_users_write() {
        assert_eq!("512M".parse(), Ok(ByteSize(512 * MIB)));
        assert_eq!("1GiB".parse(), Ok(ByteSize(GIB)));
        assert_eq!("1.5g".parse(), Ok(ByteSize(GIB + GIB / 2)));
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert!("12X".parse::<ByteSize>().is_err());
        assert!("M".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().is_err());
    }

    #[test]
    fn displays_compactly_and_round_trips_in_json() {
        assert_eq!(ByteSize(256 * MIB).to_string(), "256M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        let size: ByteSize = serde_json::from_str("\"2G\"").unwrap();
        assert_eq!(serde_json::to_string(&size).unwrap(), (2 * GIB).to_string());
    }
}
