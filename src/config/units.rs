//! Human units in the config file: durations (`"250ms"`, `"2s"`, `"1m"`) and byte sizes
//! (`65536`, `"64KiB"`, `"10MiB"`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration a config may give: a deadline that far ahead still fits in a
/// clock reading, where one of billions of years would overflow it.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A duration written as a humantime string; serialises back to the same form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        HumanDuration(Duration::from_millis(ms))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration such as "250ms", "2s" or "1m""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                let d = humantime::parse_duration(v.trim()).map_err(|e| {
                    E::custom(format!(r#"invalid duration "{v}": {e} (write e.g. "250ms", "2s", "1m")"#))
                })?;
                if d > MAX_DURATION {
                    return Err(E::custom(format!(r#"duration "{v}" is too long: at most 100 years"#)));
                }
                Ok(HumanDuration(d))
            }
        }
        d.deserialize_str(V)
    }
}

/// A byte count, written as an integer or a string with a binary or decimal unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> Self {
        ByteSize(n * 1024)
    }
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }

    /// Parses `"64KiB"`, `"10MiB"`, `"1GiB"`, `"500KB"`, `"1024"`, `"12B"`.
    pub fn parse(s: &str) -> Option<ByteSize> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" | "m" => 1 << 20,
            "GiB" | "G" | "g" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        n.checked_mul(mult).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, name) in UNITS {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{}", self.0 / size, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a size in bytes, or a string such as "64KiB" or "10MiB""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v)
                    .ok_or_else(|| E::custom(format!(r#"invalid size "{v}" (write bytes, or e.g. "64KiB", "10MiB")"#)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_round_trip() {
        assert_eq!(ByteSize::parse("64KiB"), Some(ByteSize(65536)));
        assert_eq!(ByteSize::parse("10MiB"), Some(ByteSize(10 << 20)));
        assert_eq!(ByteSize::parse("1500"), Some(ByteSize(1500)));
        assert_eq!(ByteSize::parse("2MB"), Some(ByteSize(2_000_000)));
        assert_eq!(ByteSize::parse("ten"), None);
        assert_eq!(ByteSize::parse("10XB"), None);
        assert_eq!(ByteSize(65536).to_string(), "64KiB");
        assert_eq!(ByteSize(1500).to_string(), "1500B");
        assert_eq!(ByteSize::parse(&ByteSize(1500).to_string()), Some(ByteSize(1500)));
    }

    #[test]
    fn durations_print_in_config_syntax() {
        assert_eq!(HumanDuration::millis(250).to_string(), "250ms");
        assert_eq!(HumanDuration::secs(60).to_string(), "1m");
    }
}
