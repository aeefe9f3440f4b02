//! Kubernetes resource quantities ("500m", "4", "16Gi", "1e9"), parsed the way the API server does.

/// Parses a Kubernetes quantity into its value in base units (cores, bytes).
///
/// # Errors
/// A message saying why the text is not a quantity.
pub fn parse(text: &str) -> Result<f64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("is empty".into());
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a quantity (expected e.g. \"4\", \"500m\", \"16Gi\")")
    })?;
    if number < 0.0 {
        return Err(format!("{text:?} is negative"));
    }
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let power: i32 = exp[1..]
                .parse()
                .map_err(|_| format!("{text:?} has a bad exponent"))?;
            10f64.powi(power)
        }
        other => return Err(format!("{text:?} has an unknown suffix {other:?}")),
    };
    Ok(number * multiplier)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_the_forms_kubernetes_accepts() {
        assert_eq!(parse("4").unwrap(), 4.0);
        assert_eq!(parse("500m").unwrap(), 0.5);
        assert_eq!(parse("0.5").unwrap(), 0.5);
        assert_eq!(parse("16Gi").unwrap(), 16.0 * 1024.0 * 1024.0 * 1024.0);
        assert_eq!(parse("1G").unwrap(), 1e9);
        assert_eq!(parse("1e3").unwrap(), 1000.0);
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("lots").unwrap_err().contains("not a quantity"));
        assert!(parse("4Qi").unwrap_err().contains("unknown suffix"));
        assert!(parse("-1").unwrap_err().contains("negative"));
    }
}
