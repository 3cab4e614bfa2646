//! A sans-I/O QMP server session: one client connection's protocol state.
//!
//! The session owns everything between the socket and the command handler:
//! the greeting, capabilities negotiation, framing, envelope checks, error
//! replies, and the ordered output queue. It does no I/O: the caller moves
//! bytes in with [`Session::feed`] and out with [`Session::pending_output`] /
//! [`Session::consume_output`], and executes the requests that
//! [`Session::next_request`] hands out.
//!
//! Ordering is right by construction: `next_request` processes buffered
//! input in order, writing the replies it can produce itself (parse errors,
//! envelope errors, `qmp_capabilities`) into the output queue as it meets
//! them, and stops at the first request the caller must execute. Until the
//! caller [replies](Session::reply), no further input is processed, so
//! replies keep request order and an error without `id` never overtakes an
//! earlier reply.
//!
//! ```
//! use qmp_proto::session::{Session, SessionConfig};
//! use qmp_proto::Response;
//! use serde_json::json;
//!
//! let mut s = Session::new(SessionConfig::new(json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""})));
//! let greeting = String::from_utf8(s.pending_output().to_vec()).unwrap();
//! assert!(greeting.starts_with("{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}"));
//! s.consume_output(greeting.len());
//!
//! s.feed(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-status\", \"id\": 7}\n");
//! let req = s.next_request().expect("a request for the caller");
//! assert_eq!(req.command, "query-status");
//! s.reply(Response { id: req.id, result: Ok(json!({"status": "running"})) });
//! assert_eq!(
//!     s.pending_output(),
//!     b"{\"return\": {}}\r\n{\"return\": {\"status\": \"running\"}, \"id\": 7}\r\n"
//! );
//! ```

use std::ops::Range;

use serde_json::{json, Map, Value};

use crate::encode::{ordered_members, write_message, KeyOrder};
use crate::error::{ErrorClass, QmpError};
use crate::framer::Framer;
use crate::json::Limits;
use crate::message::{EventMessage, Request, Response};

/// How much unprocessed input a session accepts before [`Session::wants_input`]
/// turns false.
pub const READ_AHEAD: usize = 64 * 1024;

/// Settings of a [`Session`].
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The greeting's `version` member (what `query-version` returns).
    pub version: Value,
    /// Whether to offer the `oob` capability (QEMU does on QMP monitors).
    pub offer_oob: bool,
    /// Framing limits (QEMU's by default).
    pub limits: Limits,
    /// Member order of the output (QEMU's by default).
    pub key_order: KeyOrder,
    /// When this many output bytes are waiting for the client, the session
    /// stops processing input (back-pressure, like QEMU suspending its
    /// monitor) until the client reads.
    pub output_high_water: usize,
    /// When events would push the waiting output past this many bytes, the
    /// client is not reading at all: the session asks to be disconnected.
    pub output_hard_limit: usize,
}

impl SessionConfig {
    /// Defaults: `oob` offered, QEMU's limits and member order, 1 MiB high
    /// water mark, 64 MiB hard limit.
    pub fn new(version: Value) -> Self {
        SessionConfig {
            version,
            offer_oob: true,
            limits: Limits::default(),
            key_order: KeyOrder::Qemu,
            output_high_water: 1 << 20,
            output_hard_limit: 64 << 20,
        }
    }
}

/// The state of one QMP connection (see the [module docs](self)).
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    framer: Framer,
    input: Vec<u8>,
    in_pos: usize,
    /// Stream offset of `input[in_pos]`.
    consumed: u64,
    /// Stream offset where the message being read began.
    msg_start: u64,
    output: Vec<u8>,
    out_pos: usize,
    negotiated: bool,
    oob: bool,
    in_flight: Option<InFlight>,
    disconnect: bool,
}

#[derive(Debug)]
struct InFlight {
    id: Option<Value>,
    span: Range<u64>,
}

impl Session {
    /// A new session; its greeting is already queued as output.
    pub fn new(config: SessionConfig) -> Self {
        let framer = Framer::with_limits(config.limits);
        let mut s = Session {
            config,
            framer,
            input: Vec::new(),
            in_pos: 0,
            consumed: 0,
            msg_start: 0,
            output: Vec::new(),
            out_pos: 0,
            negotiated: false,
            oob: false,
            in_flight: None,
            disconnect: false,
        };
        let greeting = s.greeting();
        s.queue(&greeting);
        s
    }

    /// The greeting this session sent.
    pub fn greeting(&self) -> Value {
        let caps: Vec<&str> = if self.config.offer_oob {
            vec!["oob"]
        } else {
            vec![]
        };
        json!({"QMP": {"version": self.config.version, "capabilities": caps}})
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Buffers bytes received from the client. Nothing is processed until
    /// [`next_request`](Self::next_request).
    pub fn feed(&mut self, data: &[u8]) {
        if self.in_pos > 0 && self.in_pos == self.input.len() {
            self.input.clear();
            self.in_pos = 0;
        }
        self.input.extend_from_slice(data);
    }

    /// Bytes fed but not yet processed.
    pub fn buffered_input(&self) -> usize {
        self.input.len() - self.in_pos
    }

    /// Whether the caller should read more from the client now: false while
    /// enough unprocessed input is buffered, or once the client must be
    /// disconnected.
    pub fn wants_input(&self) -> bool {
        !self.disconnect && self.buffered_input() < READ_AHEAD
    }

    /// Processes buffered input up to the next request the caller must
    /// execute, queueing every reply the session produces itself on the way.
    ///
    /// Returns `None` when the input is used up, while a request is awaiting
    /// its [`reply`](Self::reply), while output is backed up past the high
    /// water mark, or when the client must be disconnected.
    pub fn next_request(&mut self) -> Option<Request> {
        if self.in_flight.is_some() || self.disconnect {
            return None;
        }
        loop {
            if self.output_len() >= self.config.output_high_water {
                return None;
            }
            if self.in_pos >= self.input.len() {
                self.input.clear();
                self.in_pos = 0;
                if self.input.capacity() > 4 * READ_AHEAD {
                    self.input = Vec::new();
                }
                return None;
            }
            let (used, item) = self.framer.advance(&self.input[self.in_pos..]);
            self.in_pos += used;
            self.consumed += used as u64;
            let Some(item) = item else {
                continue;
            };
            let span = self.msg_start..self.consumed;
            self.msg_start = self.consumed;
            match item {
                Err(e) => {
                    log::debug!("QMP input error: {e}");
                    self.queue_response(None, Err(e.into()));
                }
                Ok(value) => {
                    if let Some(req) = self.dispatch(value) {
                        self.in_flight = Some(InFlight {
                            id: req.id.clone(),
                            span,
                        });
                        return Some(req);
                    }
                }
            }
        }
    }

    /// Whether a request handed out by `next_request` awaits its reply.
    pub fn is_awaiting_reply(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The stream byte range (offsets since the connection began) of the
    /// request awaiting its reply, whitespace before it included. Servers
    /// use it to tell which passed file descriptors came with the request.
    pub fn request_span(&self) -> Option<Range<u64>> {
        self.in_flight.as_ref().map(|f| f.span.clone())
    }

    /// Queues the reply to the request handed out by `next_request`.
    pub fn reply(&mut self, response: Response) {
        if self.in_flight.take().is_none() {
            log::warn!("QMP reply without a request awaiting it; sending it anyway");
        }
        self.queue_response(response.id, response.result);
    }

    /// Queues the reply to the request awaiting it, with that request's `id`.
    pub fn respond(&mut self, result: Result<Value, QmpError>) {
        let id = self.in_flight.as_ref().and_then(|f| f.id.clone());
        self.reply(Response { id, result });
    }

    /// Queues an event if capabilities negotiation is complete (QEMU sends
    /// events only then). Returns whether it was queued.
    ///
    /// If the client lets output pile up past the hard limit, the event is
    /// dropped and [`must_disconnect`](Self::must_disconnect) turns true.
    pub fn push_event(&mut self, event: &EventMessage) -> bool {
        if !self.negotiated || self.disconnect {
            return false;
        }
        let mut obj = Map::new();
        obj.insert("event".into(), Value::String(event.event.clone()));
        obj.insert(
            "timestamp".into(),
            json!({"seconds": event.timestamp.seconds, "microseconds": event.timestamp.microseconds}),
        );
        if let Some(data) = &event.data {
            obj.insert("data".into(), data.clone());
        }
        let mut line = Vec::new();
        write_message(&mut line, &Value::Object(obj), self.config.key_order);
        if self.output_len() + line.len() > self.config.output_hard_limit {
            log::warn!(
                "QMP client is not reading ({} bytes waiting); disconnecting it",
                self.output_len()
            );
            self.disconnect = true;
            return false;
        }
        self.output.extend_from_slice(&line);
        true
    }

    /// Output waiting to be sent to the client.
    pub fn pending_output(&self) -> &[u8] {
        &self.output[self.out_pos..]
    }

    /// Number of output bytes waiting.
    pub fn output_len(&self) -> usize {
        self.output.len() - self.out_pos
    }

    /// Marks `n` bytes of [`pending_output`](Self::pending_output) as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.output.len());
        if self.out_pos == self.output.len() {
            self.output.clear();
            self.out_pos = 0;
            if self.output.capacity() > 4 * self.config.output_high_water.max(READ_AHEAD) {
                self.output = Vec::new();
            }
        } else if self.out_pos > READ_AHEAD && self.out_pos > self.output.len() / 2 {
            self.output.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Whether output is backed up past the high water mark (input is not
    /// processed until the client reads).
    pub fn is_backpressured(&self) -> bool {
        self.output_len() >= self.config.output_high_water
    }

    /// Whether the client must be disconnected (it let output pile up past
    /// the hard limit).
    pub fn must_disconnect(&self) -> bool {
        self.disconnect
    }

    /// Whether `qmp_capabilities` has succeeded (command mode).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Whether the client enabled out-of-band execution.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    fn queue(&mut self, value: &Value) {
        write_message(&mut self.output, value, self.config.key_order);
    }

    fn queue_response(&mut self, id: Option<Value>, result: Result<Value, QmpError>) {
        let value = Response { id, result }.to_value();
        self.queue(&value);
    }

    /// QEMU's `qmp_dispatch` up to the point where the command table is
    /// consulted, plus `qmp_capabilities` itself.
    fn dispatch(&mut self, value: Value) -> Option<Request> {
        let Value::Object(mut map) = value else {
            self.queue_response(
                None,
                Err(QmpError::generic("QMP input must be a JSON object")),
            );
            return None;
        };
        let id = map.get("id").cloned();
        let exec_key = match check_envelope(&map, self.oob) {
            Ok(k) => k,
            Err(e) => {
                self.queue_response(id, Err(e));
                return None;
            }
        };
        let oob = exec_key == "exec-oob";
        let command = match map.remove(exec_key) {
            Some(Value::String(s)) => s,
            _ => String::new(),
        };
        let arguments = match map.remove("arguments") {
            Some(Value::Object(args)) => args,
            _ => Map::new(),
        };
        if !self.negotiated {
            let result = if command == "qmp_capabilities" {
                self.negotiate(&arguments)
            } else {
                Err(QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ))
            };
            self.queue_response(id, result);
            return None;
        }
        if command == "qmp_capabilities" {
            let result = if oob {
                Err(QmpError::oob_not_supported(&command))
            } else {
                parse_capabilities(&arguments).and(Err(QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                )))
            };
            self.queue_response(id, result);
            return None;
        }
        Some(Request {
            id,
            command,
            arguments,
            oob,
        })
    }

    fn negotiate(&mut self, arguments: &Map<String, Value>) -> Result<Value, QmpError> {
        let caps = parse_capabilities(arguments)?;
        let want_oob = caps.iter().any(|c| c == "oob");
        if want_oob && !self.config.offer_oob {
            return Err(QmpError::generic("Capability oob not available"));
        }
        self.negotiated = true;
        self.oob = want_oob;
        Ok(json!({}))
    }
}

/// QEMU's `qmp_dispatch_check_obj`, members visited in QEMU's order.
/// Returns the member naming the command.
fn check_envelope(map: &Map<String, Value>, allow_oob: bool) -> Result<&'static str, QmpError> {
    let mut exec_key: Option<&'static str> = None;
    for (key, value) in ordered_members(map, KeyOrder::Qemu) {
        match key.as_str() {
            k @ ("execute" | "exec-oob") if k == "execute" || allow_oob => {
                let k: &'static str = if k == "execute" {
                    "execute"
                } else {
                    "exec-oob"
                };
                if !value.is_string() {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{k}' must be a string"
                    )));
                }
                if let Some(prev) = exec_key {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{k}' clashes with '{prev}'"
                    )));
                }
                exec_key = Some(k);
            }
            "arguments" => {
                if !value.is_object() {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            }
            "id" => {}
            other => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )));
            }
        }
    }
    exec_key.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))
}

/// The arguments of `qmp_capabilities`, checked like QEMU's generated
/// marshaller (including its wording for an unknown capability, which
/// names the parameter 'null' in QEMU 7.2).
fn parse_capabilities(arguments: &Map<String, Value>) -> Result<Vec<String>, QmpError> {
    let mut caps = Vec::new();
    if let Some(enable) = arguments.get("enable") {
        let Value::Array(items) = enable else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        for (i, item) in items.iter().enumerate() {
            let Value::String(cap) = item else {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'enable[{i}]', expected: string"
                )));
            };
            if cap != "oob" {
                return Err(QmpError::generic(format!(
                    "Parameter 'null' does not accept value '{cap}'"
                )));
            }
            caps.push(cap.clone());
        }
    }
    if let Some((key, _)) = ordered_members(arguments, KeyOrder::Qemu)
        .into_iter()
        .find(|(k, _)| k.as_str() != "enable")
    {
        return Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        )));
    }
    Ok(caps)
}

#[cfg(test)]
mod tests;
