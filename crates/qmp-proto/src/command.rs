//! Typed commands and events: the link between this wire-level crate and a
//! generated schema crate such as `qapi-types`.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A QMP command with typed arguments and return value.
///
/// Generated schema crates implement this for one marker type per command;
/// the [`client`](crate::client) executes any implementor, and servers use
/// [`Command::NAME`] to route requests.
pub trait Command {
    /// The wire name of the command, e.g. `query-version`.
    const NAME: &'static str;
    /// The arguments object (`()` serializes to nothing for commands without arguments).
    type Arguments: Serialize;
    /// The value of a successful reply's `return` member.
    type Returns: DeserializeOwned;
}

/// A QMP event with a typed payload (its `data` member).
pub trait Event {
    /// The wire name of the event, e.g. `SHUTDOWN`.
    const NAME: &'static str;
    /// The type of the event's `data` member.
    type Data: Serialize + DeserializeOwned;
}
