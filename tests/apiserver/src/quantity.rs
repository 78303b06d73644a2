//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `1e3`, `128M`) as
//! `k8s.io/apimachinery/pkg/api/resource.Quantity` reads them, exact: a
//! value is kept in nano-units (an `i128`), enough for every suffix up to
//! `Ei`/`E` and down to `n`.

use std::cmp::Ordering;

/// A parsed quantity, in nano-units (1 = 10⁻⁹).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity {
    nanos: i128,
}

const NANO: i128 = 1_000_000_000;

fn ceil_div(a: i128, b: i128) -> i128 {
    let q = a / b;
    if (a % b != 0) && ((a > 0) == (b > 0)) {
        q + 1
    } else {
        q
    }
}

impl Quantity {
    pub const ZERO: Quantity = Quantity { nanos: 0 };

    /// Parses `[+-]digits[.digits][suffix]`, suffix one of `n u m "" k M G T
    /// P E`, `Ki Mi Gi Ti Pi Ei`, or `e<exp>`/`E<exp>`. `None` when the
    /// string is not a quantity.
    pub fn parse(s: &str) -> Option<Quantity> {
        let s = s.trim();
        let (neg, rest) = match s.as_bytes().first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, suffix) = rest.split_at(num_end);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return None;
        }
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        // The number as digits × 10^-frac_len.
        let digits: String = format!("{int}{frac}");
        let mantissa: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        let mut exp10: i32 = -(frac.len() as i32);
        let mut mult: i128 = 1;
        match suffix {
            "" => {}
            "n" => exp10 -= 9,
            "u" => exp10 -= 6,
            "m" => exp10 -= 3,
            "k" => exp10 += 3,
            "M" => exp10 += 6,
            "G" => exp10 += 9,
            "T" => exp10 += 12,
            "P" => exp10 += 15,
            "E" => exp10 += 18,
            "Ki" => mult = 1 << 10,
            "Mi" => mult = 1 << 20,
            "Gi" => mult = 1 << 30,
            "Ti" => mult = 1 << 40,
            "Pi" => mult = 1 << 50,
            "Ei" => mult = 1 << 60,
            s if s.starts_with(['e', 'E']) => {
                let e: i32 = s[1..].parse().ok()?;
                exp10 += e;
            }
            _ => return None,
        }
        // nanos = mantissa * mult * 10^(exp10 + 9), rounded up (as the
        // real Quantity rounds values below its nano precision up).
        let e = exp10 + 9;
        let base = mantissa.checked_mul(mult)?;
        let nanos = if e >= 0 {
            base.checked_mul(10i128.checked_pow(e as u32)?)?
        } else {
            ceil_div(base, 10i128.checked_pow((-e) as u32)?)
        };
        Some(Quantity {
            nanos: if neg { -nanos } else { nanos },
        })
    }

    /// `Quantity.Value()`: the value rounded up to an integer.
    pub fn value(&self) -> i128 {
        ceil_div(self.nanos, NANO)
    }

    /// `Quantity.MilliValue()`: the value in thousandths, rounded up.
    pub fn milli_value(&self) -> i128 {
        ceil_div(self.nanos, 1_000_000)
    }

    pub fn is_zero(&self) -> bool {
        self.nanos == 0
    }

    pub fn nanos(&self) -> i128 {
        self.nanos
    }
}

/// Compares two quantity strings by value (`None` if one does not parse).
pub fn cmp_str(a: &str, b: &str) -> Option<Ordering> {
    Some(Quantity::parse(a)?.cmp(&Quantity::parse(b)?))
}

/// How a quantity was written, which its canonical form keeps
/// (`resource.Format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    DecimalSI,
    BinarySI,
    DecimalExponent,
}

fn format_of(s: &str) -> Format {
    let s = s.trim();
    if s.ends_with('i') {
        Format::BinarySI
    } else if s.trim_start_matches(['+', '-']).find(['e', 'E']).is_some() {
        Format::DecimalExponent
    } else {
        Format::DecimalSI
    }
}

/// The canonical form the real API server stores and returns a quantity in
/// (`Quantity.String()` after decoding: `0.5` → `500m`, `1000m` → `1`,
/// `1024Mi` → `1Gi`, `1000000` → `1M`, `1e4` → `10e3`, `1.5Gi` →
/// `1536Mi`). `None` when `s` is not a quantity.
pub fn canonical(s: &str) -> Option<String> {
    let q = Quantity::parse(s)?;
    if q.nanos == 0 {
        return Some("0".to_string());
    }
    let mut format = format_of(s);
    if format == Format::BinarySI && (q.nanos.abs() < 1024 * NANO || q.nanos % NANO != 0) {
        format = Format::DecimalSI;
    }
    if format == Format::BinarySI {
        let mut amount = q.nanos / NANO;
        let mut times = 0;
        while amount % 1024 == 0 && times < 6 {
            amount /= 1024;
            times += 1;
        }
        let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][times];
        return Some(format!("{amount}{suffix}"));
    }
    // Decimal: remove factors of 10, then make the exponent a multiple of 3.
    let mut amount = q.nanos;
    let mut exponent: i32 = -9;
    while amount % 10 == 0 {
        amount /= 10;
        exponent += 1;
    }
    match exponent.rem_euclid(3) {
        1 => {
            amount *= 10;
            exponent -= 1;
        }
        2 => {
            amount *= 100;
            exponent -= 2;
        }
        _ => {}
    }
    let suffix = match format {
        Format::DecimalExponent => {
            if exponent == 0 {
                String::new()
            } else {
                format!("e{exponent}")
            }
        }
        _ => match exponent {
            -9 => "n".into(),
            -6 => "u".into(),
            -3 => "m".into(),
            0 => String::new(),
            3 => "k".into(),
            6 => "M".into(),
            9 => "G".into(),
            12 => "T".into(),
            15 => "P".into(),
            18 => "E".into(),
            e => format!("e{e}"),
        },
    };
    Some(format!("{amount}{suffix}"))
}

/// The downward API's `convertQuantityToString` (cpu, memory, ephemeral
/// storage): ceil(value / divisor), exact; a zero divisor means 1, as
/// `ExtractContainerResourceValue` does.
pub fn with_divisor(v: Quantity, divisor: Quantity) -> String {
    let d = if divisor.is_zero() {
        NANO
    } else {
        divisor.nanos
    };
    if d < 0 {
        return "0".to_string();
    }
    ceil_div(v.nanos, d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap_or_else(|| panic!("{s} parses"))
    }

    #[test]
    fn parses_like_apimachinery() {
        assert_eq!(q("500m").milli_value(), 500);
        assert_eq!(q("500m").value(), 1);
        assert_eq!(q("2").milli_value(), 2000);
        assert_eq!(q("1.5").milli_value(), 1500);
        assert_eq!(q("0.1").milli_value(), 100);
        assert_eq!(q("1Gi").value(), 1 << 30);
        assert_eq!(q("4Gi").value(), 4 << 30);
        assert_eq!(q("1.5Gi").value(), 3 << 29);
        assert_eq!(q("128M").value(), 128_000_000);
        assert_eq!(q("1e3").value(), 1000);
        assert_eq!(q("1E3").value(), 1000);
        assert_eq!(q("1k").value(), 1000);
        assert_eq!(q("1Ki").value(), 1024);
        assert_eq!(q("250u").milli_value(), 1);
        assert_eq!(q("1n").value(), 1);
        assert_eq!(q("+3").value(), 3);
        assert_eq!(q("-1").value(), -1);
        assert!(Quantity::parse("").is_none());
        assert!(Quantity::parse("abc").is_none());
        assert!(Quantity::parse("1.2.3").is_none());
        assert!(Quantity::parse("1Qi").is_none());
        assert_eq!(cmp_str("1000m", "1"), Some(Ordering::Equal));
        assert_eq!(cmp_str("1Gi", "1G"), Some(Ordering::Greater));
    }

    #[test]
    fn canonical_forms() {
        for (input, want) in [
            ("0.5", "500m"),
            ("1000m", "1"),
            ("1500m", "1500m"),
            ("1.5", "1500m"),
            ("2", "2"),
            ("1000", "1k"),
            ("1500", "1500"),
            ("1000000", "1M"),
            ("128Mi", "128Mi"),
            ("1024Mi", "1Gi"),
            ("1.5Gi", "1536Mi"),
            ("512Ki", "512Ki"),
            ("0.5Ki", "512"),
            ("100Mi", "100Mi"),
            ("1e3", "1e3"),
            ("1e4", "10e3"),
            ("0", "0"),
            ("0m", "0"),
            ("128M", "128M"),
            ("1G", "1G"),
            ("250u", "250u"),
        ] {
            assert_eq!(canonical(input).as_deref(), Some(want), "{input}");
        }
        assert_eq!(canonical("x"), None);
    }

    #[test]
    fn divisors_round_up() {
        assert_eq!(with_divisor(q("500m"), q("1")), "1");
        assert_eq!(with_divisor(q("500m"), Quantity::ZERO), "1");
        assert_eq!(with_divisor(q("500m"), q("1m")), "500");
        assert_eq!(with_divisor(q("2"), q("1")), "2");
        assert_eq!(with_divisor(q("2"), q("1m")), "2000");
        assert_eq!(with_divisor(q("1500m"), q("1")), "2");
        assert_eq!(with_divisor(q("64Mi"), q("1Mi")), "64");
        assert_eq!(with_divisor(q("64Mi"), q("1")), "67108864");
        assert_eq!(with_divisor(q("100M"), q("1Mi")), "96");
        assert_eq!(with_divisor(q("4Gi"), q("1Gi")), "4");
        assert_eq!(with_divisor(q("20Gi"), q("1G")), "22");
        assert_eq!(with_divisor(Quantity::ZERO, q("1Mi")), "0");
    }
}
