//! Expected against actual, field by field: each difference is a path and both sides, printed
//! as pretty JSON under `-` (expected) and `+` (actual) lines.

use std::fmt::Write as _;

use serde_json::Value;

/// One difference. `None` on a side: the field is absent there.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub path: String,
    pub expected: Option<Value>,
    pub actual: Option<Value>,
}

impl Mismatch {
    pub fn new(path: impl Into<String>, expected: Option<Value>, actual: Option<Value>) -> Self {
        Mismatch {
            path: path.into(),
            expected,
            actual,
        }
    }

    /// `path:` then the expected side as `-` lines and the actual side as `+` lines.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "  {}:", self.path);
        for (sign, side) in [('-', &self.expected), ('+', &self.actual)] {
            let text = match side {
                Some(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
                None => "(absent)".to_string(),
            };
            for line in text.lines() {
                let _ = writeln!(out, "    {sign} {line}");
            }
        }
    }
}

/// Compares two JSON values: objects key by key, arrays of one length element by element,
/// numbers by value (`1` equals `1.0`); anything else as a whole.
pub fn json(path: &str, expected: &Value, actual: &Value, out: &mut Vec<Mismatch>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let mut keys: Vec<&String> = e.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{path}.{}", field(k));
                match (e.get(k), a.get(k)) {
                    (Some(x), Some(y)) => json(&p, x, y, out),
                    (x, y) => out.push(Mismatch::new(p, x.cloned(), y.cloned())),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (x, y)) in e.iter().zip(a).enumerate() {
                json(&format!("{path}[{i}]"), x, y, out);
            }
        }
        (Value::Number(e), Value::Number(a)) if e.as_f64() == a.as_f64() => {}
        _ if expected == actual => {}
        _ => out.push(Mismatch::new(
            path,
            Some(expected.clone()),
            Some(actual.clone()),
        )),
    }
}

/// A key as a path segment: bare when it is an identifier, quoted otherwise (`"a.b"`).
pub fn field(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json as j;

    #[test]
    fn names_each_differing_field_with_both_values() {
        let mut out = Vec::new();
        json(
            "value",
            &j!({"a": 1, "b": {"c": "x", "d": [1, 2]}, "gone": true, "saga.step": "ship"}),
            &j!({"a": 1.0, "b": {"c": "y", "d": [1, 3]}, "new": null, "saga.step": "ship"}),
            &mut out,
        );
        assert_eq!(
            out,
            [
                Mismatch::new("value.b.c", Some(j!("x")), Some(j!("y"))),
                Mismatch::new("value.b.d[1]", Some(j!(2)), Some(j!(3))),
                Mismatch::new("value.gone", Some(j!(true)), None),
                Mismatch::new("value.new", None, Some(j!(null))),
            ]
        );
        let mut text = String::new();
        out[0].render(&mut text);
        assert_eq!(text, "  value.b.c:\n    - \"x\"\n    + \"y\"\n");
    }

    #[test]
    fn arrays_of_other_lengths_show_whole() {
        let mut out = Vec::new();
        json("v", &j!([1]), &j!([1, 2]), &mut out);
        let mut text = String::new();
        out[0].render(&mut text);
        assert_eq!(
            text,
            "  v:\n    - [\n    -   1\n    - ]\n    + [\n    +   1,\n    +   2\n    + ]\n"
        );
    }
}
