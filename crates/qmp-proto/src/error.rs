//! QMP errors as they appear on the wire: `{"error": {"class": ..., "desc": ...}}`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The class of a QMP error (QEMU's `QapiErrorClass`).
///
/// Servers only produce the known classes; a client decoding a reply keeps
/// any class it does not know in [`ErrorClass::Other`] instead of failing, so
/// that a newer server never breaks an older client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Any error that has no more specific class. QEMU uses it for nearly everything.
    GenericError,
    /// The command does not exist, or is not available in the current state
    /// (for example before capabilities negotiation).
    CommandNotFound,
    /// The device exists but is not active (for example a balloon without a driver).
    DeviceNotActive,
    /// The named device, node or object does not exist.
    DeviceNotFound,
    /// KVM lacks a capability the command needs.
    KvmMissingCap,
    /// The operation needs an incoming migration that has not been set up.
    MigrationExpected,
    /// A class this crate does not know (sent by a newer server).
    Other(String),
}

impl ErrorClass {
    /// The wire name of the class.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
            ErrorClass::MigrationExpected => "MigrationExpected",
            ErrorClass::Other(s) => s,
        }
    }

    /// Parses a wire name; unknown names become [`ErrorClass::Other`].
    pub fn from_wire(s: &str) -> Self {
        match s {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KvmMissingCap,
            "MigrationExpected" => ErrorClass::MigrationExpected,
            other => ErrorClass::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorClass {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ErrorClass::from_wire(&s))
    }
}

/// An error reply of a QMP command: a class and a human-readable description.
///
/// This is what every command handler returns on failure; the session turns
/// it into `{"error": {"class": ..., "desc": ...}, "id": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// A message a person can act on.
    pub desc: String,
}

impl QmpError {
    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class QEMU uses for almost every failure.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// QEMU's reply to `exec-oob` of a command that cannot run out of band:
    /// `The command NAME does not support OOB` (a `GenericError`).
    ///
    /// QEMU checks this after looking the command up, so an unknown command
    /// sent with `exec-oob` still gets [`QmpError::command_not_found`].
    pub fn oob_not_supported(command: &str) -> Self {
        Self::generic(format!("The command {command} does not support OOB"))
    }

    /// QEMU's reply to an unknown command: `The command NAME has not been found`.
    pub fn command_not_found(command: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_round_trips_and_tolerates_unknown() {
        for name in [
            "GenericError",
            "CommandNotFound",
            "DeviceNotActive",
            "DeviceNotFound",
            "KVMMissingCap",
            "MigrationExpected",
            "SomethingNew",
        ] {
            let class: ErrorClass = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(
                serde_json::to_value(&class).unwrap(),
                serde_json::json!(name)
            );
        }
        assert_eq!(
            ErrorClass::from_wire("SomethingNew"),
            ErrorClass::Other("SomethingNew".into())
        );
    }

    #[test]
    fn error_serializes_in_qemu_shape() {
        let e = QmpError::command_not_found("frobnicate");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"class": "CommandNotFound", "desc": "The command frobnicate has not been found"})
        );
    }
}
