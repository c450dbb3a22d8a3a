//! Shared by the JSON processors: parsing the payload, dotted field paths, and the document an
//! expression (`filter`, `route`) is evaluated against.

use bytes::Bytes;
use rdkafka::message::Headers;
use serde_json::{Map, Value};

use super::ProcessError;
use crate::message::Message;

/// Parses the payload as JSON; a missing or malformed payload is a permanent `decode` error.
pub fn parse(msg: &Message) -> Result<Value, ProcessError> {
    let Some(p) = msg.payload.as_deref() else {
        return Err(ProcessError::permanent(
            "decode",
            "the message has no value",
        ));
    };
    serde_json::from_slice(p)
        .map_err(|e| ProcessError::permanent("decode", format!("value is not JSON: {e}")))
}

/// Replaces the payload with `v` serialized.
pub fn store(msg: &mut Message, v: &Value) {
    // Serializing a `Value` cannot fail (string keys only).
    msg.payload = Some(Bytes::from(serde_json::to_vec(v).unwrap_or_default()));
}

/// `a.b.c` → the value at that path, if every step is an object member.
pub fn get<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.as_object()?.get(k))
}

/// Sets `a.b.c`, creating intermediate objects; `false` if a step is not an object.
pub fn set(v: &mut Value, path: &str, new: Value) -> bool {
    let mut cur = v;
    let mut parts = path.split('.').peekable();
    while let Some(k) = parts.next() {
        let Some(obj) = cur.as_object_mut() else {
            return false;
        };
        if parts.peek().is_none() {
            obj.insert(k.to_string(), new);
            return true;
        }
        cur = obj
            .entry(k.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    false
}

/// Removes `a.b.c` and returns it.
pub fn remove(v: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = match path.rsplit_once('.') {
        Some((p, l)) => (get_mut(v, p)?, l),
        None => (v, path),
    };
    parent.as_object_mut()?.remove(last)
}

fn get_mut<'a>(v: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.')
        .try_fold(v, |v, k| v.as_object_mut()?.get_mut(k))
}

/// A scalar as text (strings without quotes), for keys and ids; `None` for null, objects, arrays.
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The document expressions see: `{"value": <payload JSON or null>, "key": <key text or null>,
/// "headers": {name: text}, "topic": …, "partition": …, "offset": …}`.
pub fn expression_input(msg: &Message) -> Value {
    let value = msg
        .payload
        .as_deref()
        .and_then(|p| serde_json::from_slice(p).ok())
        .unwrap_or(Value::Null);
    let key = msg.key.as_deref().map_or(Value::Null, |k| {
        Value::String(String::from_utf8_lossy(k).into_owned())
    });
    let mut headers = Map::new();
    if let Some(h) = &msg.headers {
        for hd in h.iter() {
            let v = hd.value.map_or(Value::Null, |v| {
                Value::String(String::from_utf8_lossy(v).into_owned())
            });
            headers.insert(hd.key.to_string(), v);
        }
    }
    let mut doc = Map::new();
    doc.insert("value".into(), value);
    doc.insert("key".into(), key);
    doc.insert("headers".into(), Value::Object(headers));
    doc.insert("topic".into(), Value::String(msg.topic.to_string()));
    doc.insert("partition".into(), msg.partition.into());
    doc.insert("offset".into(), msg.offset.into());
    Value::Object(doc)
}

/// Compiles a JMESPath expression, with the error as text for config validation.
pub fn compile(expr: &str) -> Result<jmespath::Expression<'static>, String> {
    jmespath::compile(expr).map_err(|e| {
        // The parser's message spans lines (it draws a caret under the expression).
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default().to_string();
        format!("{expr:?} is not a valid JMESPath expression: {first}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        let mut v = json!({"a": {"b": 1}, "c": "x"});
        assert_eq!(get(&v, "a.b"), Some(&json!(1)));
        assert!(set(&mut v, "a.d.e", json!(true)));
        assert_eq!(v["a"]["d"]["e"], json!(true));
        assert_eq!(remove(&mut v, "a.b"), Some(json!(1)));
        assert_eq!(remove(&mut v, "c"), Some(json!("x")));
        assert!(!set(&mut v, "a.d.e.f", json!(1)), "e is not an object");
    }

    #[test]
    fn expressions_see_value_key_and_headers() {
        let msg = Message::new("t", 0, 5, Some(b"k1"), br#"{"amount": 12}"#);
        let doc = expression_input(&msg);
        let e = compile("value.amount > `10` && key == 'k1'").unwrap();
        assert!(e.search(&doc).unwrap().is_truthy());
        let e = compile("offset == `5`").unwrap();
        assert!(e.search(&doc).unwrap().is_truthy());
    }
}
