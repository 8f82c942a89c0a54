//! Kubernetes resource quantities (`50Gi`, `500M`, `1.5Ti`, `2e9`) as byte counts.

/// A text that is not a storage quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a storage quantity (e.g. 50Gi, 500M)")]
pub struct QuantityError(pub String);

/// Bytes in a quantity, rounded down. Errors on malformed or negative quantities.
pub fn to_bytes(q: &str) -> Result<u64, QuantityError> {
    let bad = || QuantityError(q.to_string());
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "m" => 1e-3,
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    let bytes = value * factor;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.floor() as u64)
}

/// Reads an optional byte count given as a number or as a quantity string (`10Gi`).
pub fn deserialize_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Bytes;
    impl serde::de::Visitor<'_> for Bytes {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number of bytes or a storage quantity (e.g. 10Gi, 500M)")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("{v} is negative")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            to_bytes(v).map(Some).map_err(E::custom)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Bytes)
}

/// Reads a byte count given as a number or as a quantity string (`16Ki`).
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    deserialize_opt(d)?
        .ok_or_else(|| serde::de::Error::custom("a number of bytes or a quantity is needed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_quantities() {
        assert_eq!(to_bytes("50Gi").unwrap(), 50 << 30);
        assert_eq!(to_bytes("500M").unwrap(), 500_000_000);
        assert_eq!(to_bytes("1.5Ki").unwrap(), 1536);
        assert_eq!(to_bytes("2e3").unwrap(), 2000);
        assert_eq!(to_bytes("1024").unwrap(), 1024);
        for bad in ["", "Gi", "-1Gi", "1Qi", "1.2.3G"] {
            assert!(to_bytes(bad).is_err(), "{bad}");
        }
    }
}
