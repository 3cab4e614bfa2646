//! The messages of the QMP wire protocol, independent of any transport.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::QmpError;

/// Wall-clock time of an event, as QMP sends it: `{"seconds": S, "microseconds": US}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second (0..1_000_000).
    pub microseconds: i64,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            microseconds: i64::from(d.subsec_micros()),
        }
    }
}

/// A command request from a client, after QMP's envelope checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The `id` member, any JSON value, echoed in the reply.
    pub id: Option<Value>,
    /// The command name (the value of `execute` or `exec-oob`).
    pub command: String,
    /// The `arguments` object, empty when absent.
    pub arguments: Map<String, Value>,
    /// Whether the request came as `exec-oob` (out-of-band execution).
    pub oob: bool,
}

/// A reply to one request: either `return` or `error`, with the request's `id`.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The `id` of the request, if it had one.
    pub id: Option<Value>,
    /// The returned value or the error.
    pub result: Result<Value, QmpError>,
}

impl Response {
    /// Encodes the reply as the JSON object QEMU sends.
    pub fn to_value(&self) -> Value {
        let mut obj = Map::new();
        match &self.result {
            Ok(v) => {
                obj.insert("return".into(), v.clone());
            }
            Err(e) => {
                obj.insert(
                    "error".into(),
                    serde_json::to_value(e).unwrap_or(Value::Null),
                );
            }
        }
        if let Some(id) = &self.id {
            obj.insert("id".into(), id.clone());
        }
        Value::Object(obj)
    }
}

/// An asynchronous event: `{"event": NAME, "data": {...}, "timestamp": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    /// The event name, e.g. `SHUTDOWN`.
    pub event: String,
    /// The event's data; QEMU omits it for events without data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// When the event happened.
    pub timestamp: Timestamp,
}

impl EventMessage {
    /// An event stamped with the current time.
    pub fn new(event: impl Into<String>, data: Option<Value>) -> Self {
        EventMessage {
            event: event.into(),
            data,
            timestamp: Timestamp::now(),
        }
    }

    /// A typed event stamped with the current time.
    pub fn typed<E: crate::Event>(data: &E::Data) -> Result<Self, serde_json::Error> {
        let data = serde_json::to_value(data)?;
        // QEMU leaves `data` out for events that carry nothing.
        let data = match data {
            Value::Null => None,
            Value::Object(ref m) if m.is_empty() => None,
            other => Some(other),
        };
        Ok(Self::new(E::NAME, data))
    }
}
