//! `device_add` and `device_del` for virtio-blk on PCI bus 0.
//!
//! The bus has no hotplug controller (no ACPI, SHPC or PCIe slot), so the
//! guest is not interrupted: a device added while it runs appears in a free
//! slot of `pci.0`, where a guest finds it when it scans the bus (Linux:
//! `echo 1 > /sys/bus/pci/rescan`; the embedded guest rescans by itself
//! while it has no disk). `device_del` follows QEMU's protocol: it returns
//! at once, and the device goes, with its DEVICE_DELETED events and its
//! BlockBackend released, as soon as the driver has let go of it (its
//! virtio status is 0: never initialised, reset, or the guest removed it,
//! Linux: `echo 1 > /sys/bus/pci/devices/0000:00:NN.0/remove`); a machine
//! reset completes every pending removal, as QEMU documents.
//!
//! `device_add` takes the device's properties beside `driver`, `bus` and
//! `id`, as QEMU does (its schema declares only those three and lets the
//! rest through): it is registered with its own argument type,
//! [`DeviceAddArgs`], which decodes the declared members strictly and keeps
//! the others as the device's properties.
//!
//! `query-pci` lists bus 0 as the guest sees it (BARs where they decode
//! now), so management software can follow what was plugged where.

use qapi_types::runtime::{CommandSpec, DecodeError, Decoder};
use qapi_types::{
    cmd, event, Dispatcher, PciDeviceClass, PciDeviceId, PciDeviceInfo, PciInfo, PciMemoryRegion,
    QapiType,
};
use qmp_proto::QmpError;
use serde_json::{Map, Value};

use crate::cli::DeviceSpec;
use crate::vm::Vmm;

/// The bus QEMU names PCI bus 0.
const PCI_BUS: &str = "pci.0";
/// The bus the virtio-mmio devices are on (nothing hot-plugs there).
const MMIO_BUS: &str = "virtio-mmio-bus.0";
/// The members of device_add the schema declares.
const DECLARED: [&str; 3] = ["driver", "bus", "id"];

/// The arguments of `device_add`: the members the schema declares, decoded
/// strictly, and every other member as a device property.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceAddArgs {
    /// `driver`, `bus` and `id`.
    pub declared: cmd::DeviceAddArguments,
    /// The device's properties (`drive`, `num-queues`, ...).
    pub properties: Map<String, Value>,
}

impl QapiType for DeviceAddArgs {
    fn to_qmp(&self) -> Value {
        let mut v = self.declared.to_qmp();
        if let Value::Object(m) = &mut v {
            m.extend(self.properties.clone());
        }
        v
    }

    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        let Value::Object(all) = v else {
            return cmd::DeviceAddArguments::from_qmp(v, d).map(|declared| DeviceAddArgs {
                declared,
                properties: Map::new(),
            });
        };
        let (declared, properties): (Map<_, _>, Map<_, _>) = all
            .into_iter()
            .partition(|(k, _)| DECLARED.contains(&k.as_str()));
        let declared = cmd::DeviceAddArguments::from_qmp(Value::Object(declared), d)?;
        Ok(DeviceAddArgs {
            declared,
            properties,
        })
    }
}

/// `device_add` with [`DeviceAddArgs`] (registered in place of the generated
/// marker, whose strict decoder would refuse the device properties).
pub struct DeviceAdd;

impl CommandSpec for DeviceAdd {
    const NAME: &'static str = "device_add";
    type Args = DeviceAddArgs;
    type Ret = ();
    const ALLOW_OOB: bool = false;
    const GROUP: &'static str = "misc";
    const DEPRECATED: bool = false;
}

/// Registers `device_add` and `device_del` (with a guest only).
pub fn register(d: &mut Dispatcher<Vmm>) {
    d.register::<DeviceAdd>(|vmm, a| {
        let DeviceAddArgs {
            declared,
            properties,
        } = a;
        device_add(
            vmm,
            &declared.driver,
            declared.bus.as_deref(),
            declared.id.as_deref(),
            &properties,
        )
    });
    d.register::<cmd::DeviceDel>(|vmm, a| device_del(vmm, &a.id));
    d.register::<cmd::QueryPci>(|vmm, _| Ok(query_pci(vmm)));
}

/// Registers with the event loop the queue notifiers it does not watch yet
/// (the machine's at start, then those of hot-added devices); `watched`
/// counts the ones already registered, whose tokens are `tokens.start + i`.
pub fn watch_notifiers(
    registry: &mio::Registry,
    vmm: &Vmm,
    watched: &mut usize,
    tokens: std::ops::Range<usize>,
) -> Result<(), String> {
    let Some(machine) = &vmm.machine else {
        return Ok(());
    };
    for n in machine.notifiers().iter().skip(*watched) {
        let token = tokens.start + *watched;
        if !tokens.contains(&token) {
            return Err("too many virtqueue notifiers for the event loop".into());
        }
        registry
            .register(
                &mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&n.fd)),
                mio::Token(token),
                mio::Interest::READABLE,
            )
            .map_err(|e| format!("cannot watch a virtqueue notifier: {e}"))?;
        *watched += 1;
    }
    Ok(())
}

/// QEMU's names of the PCI classes this bus has.
fn class_desc(class: u16) -> Option<&'static str> {
    match class {
        0x0100 => Some("SCSI controller"),
        0x0600 => Some("Host bridge"),
        _ => None,
    }
}

fn query_pci(vmm: &Vmm) -> Vec<PciInfo> {
    let Some(machine) = &vmm.machine else {
        return Vec::new();
    };
    let mut devices = Vec::new();
    for (slot, dev) in machine.bus().pci().functions() {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        let mut cfg = [0u8; 64];
        d.config_read(0, &mut cfg);
        let word = |at: usize| i64::from(u16::from_le_bytes([cfg[at], cfg[at + 1]]));
        let class = u16::from_le_bytes([cfg[0x0a], cfg[0x0b]]);
        let regions = d
            .bar0()
            .map(|(address, size)| PciMemoryRegion {
                bar: 0,
                r#type: "memory".into(),
                address: address as i64,
                size: size as i64,
                prefetch: Some(false),
                mem_type_64: Some(false),
            })
            .into_iter()
            .collect();
        let qdev_id = machine
            .pci_disks()
            .iter()
            .find(|p| usize::from(p.slot) == slot)
            .map(|p| p.id.clone())
            .unwrap_or_default();
        devices.push(PciDeviceInfo {
            bus: 0,
            slot: slot as i64,
            function: 0,
            class_info: PciDeviceClass {
                desc: class_desc(class).map(str::to_owned),
                class: i64::from(class),
            },
            id: PciDeviceId {
                device: word(2),
                vendor: word(0),
            },
            irq: (cfg[0x3d] != 0).then_some(i64::from(cfg[0x3c])),
            qdev_id,
            pci_bridge: None,
            regions,
        });
    }
    vec![PciInfo { bus: 0, devices }]
}

/// A property value in the `-device` syntax: strings as they are, booleans
/// as on/off, numbers in decimal except `addr`, which QEMU takes as devfn
/// (slot * 8 + function) when it is a number.
fn property_text(key: &str, v: &Value) -> Result<String, QmpError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
        Value::Number(n) if key == "addr" => match n.as_u64() {
            Some(devfn) if devfn & 7 == 0 && devfn < 256 => format!("{:x}", devfn >> 3),
            _ => {
                return Err(QmpError::generic(format!(
                    "Property 'virtio-blk-pci.addr' doesn't take value '{n}'"
                )))
            }
        },
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(QmpError::generic(format!(
                "Parameter '{key}' expects a string, number or boolean"
            )))
        }
    };
    if text.contains(',') || key.contains(',') || key.contains('=') {
        return Err(QmpError::generic(format!(
            "Property '{key}' has a value this VMM cannot pass: '{text}'"
        )));
    }
    Ok(text)
}

fn device_add(
    vmm: &mut Vmm,
    driver: &str,
    bus: Option<&str>,
    id: Option<&str>,
    props: &Map<String, Value>,
) -> Result<(), QmpError> {
    match driver {
        "virtio-blk" | "virtio-blk-pci" => {}
        "virtio-blk-device" => {
            return Err(QmpError::generic(format!(
                "Bus '{MMIO_BUS}' does not support hotplugging"
            )))
        }
        _ => {
            return Err(QmpError::generic(format!(
                "'{driver}' is not a valid device model name"
            )))
        }
    }
    if let Some(b) = bus.filter(|b| *b != PCI_BUS) {
        return Err(QmpError::device_not_found(format!("Bus '{b}' not found")));
    }
    let Some(id) = id else {
        return Err(QmpError::generic(
            "Parameter 'id' is missing: this VMM finds hot-plugged devices by their id",
        ));
    };
    let mut spec = format!("{driver},id={id}");
    for (k, v) in props {
        spec.push(',');
        spec.push_str(k);
        spec.push('=');
        spec.push_str(&property_text(k, v)?);
    }
    let dev: DeviceSpec = spec.parse().map_err(QmpError::generic)?;
    let Some(machine) = &vmm.machine else {
        return Err(QmpError::generic("there is no guest to add a device to"));
    };
    if machine.pci_disks().iter().any(|d| d.id == dev.id) || machine.mmio_ids().contains(&dev.id) {
        return Err(QmpError::generic(format!(
            "Duplicate device ID '{}'",
            dev.id
        )));
    }
    let node = vmm.block.lookup_either(&dev.drive).map_err(|e| {
        QmpError::generic(format!(
            "Property '{driver}.drive' can't find value '{}': {}",
            dev.drive,
            QmpError::from(e).desc
        ))
    })?;
    let backend = vmm
        .block
        .create_backend(&dev.id, Some(&node), dev.backend_options())?;
    let attached = vmm.block.attach_device(&backend, dev.device_attach());
    let plugged = attached.map_err(QmpError::from).and_then(|()| {
        let machine = vmm
            .machine
            .as_mut()
            .ok_or_else(|| QmpError::generic("there is no guest to add a device to"))?;
        machine
            .hot_add_pci_disk(dev.block_device(backend.clone()))
            .map_err(|e| QmpError::generic(e.to_string()))
    });
    match plugged {
        Ok(slot) => {
            log::info!("device_add: {} in PCI slot {slot}", dev.id);
            Ok(())
        }
        Err(e) => {
            // Nothing of the failed device stays behind.
            vmm.block.detach_device(&backend);
            let _ = vmm.block.delete_backend(&dev.id);
            Err(e)
        }
    }
}

fn device_del(vmm: &mut Vmm, id: &str) -> Result<(), QmpError> {
    let Some(machine) = &mut vmm.machine else {
        return Err(QmpError::device_not_found(format!(
            "Device '{id}' not found"
        )));
    };
    // QEMU accepts the device's QOM path as well.
    let id = id.strip_prefix("/machine/peripheral/").unwrap_or(id);
    if machine.mmio_ids().iter().any(|m| m == id) {
        return Err(QmpError::generic(format!(
            "Bus '{MMIO_BUS}' does not support hotplugging"
        )));
    }
    let Some(disk) = machine.pci_disk_mut(id) else {
        return Err(QmpError::device_not_found(format!(
            "Device '{id}' not found"
        )));
    };
    if disk.unplug_requested {
        return Err(QmpError::generic(format!(
            "Device {id} is already in the process of unplug"
        )));
    }
    disk.unplug_requested = true;
    complete_unplugs(vmm);
    Ok(())
}

/// Removes the devices whose unplug was asked and whose driver has let go
/// of them: off the bus, their BlockBackend released, DEVICE_DELETED sent
/// (for the virtio backend, then the device, as QEMU does). The main loop
/// calls it when a device reports a reset.
pub fn complete_unplugs(vmm: &mut Vmm) {
    let Some(machine) = &mut vmm.machine else {
        return;
    };
    machine.bus().take_device_check();
    let ready: Vec<String> = machine
        .pci_disks()
        .iter()
        .filter(|d| {
            d.unplug_requested && !d.device.lock().unwrap_or_else(|e| e.into_inner()).in_use()
        })
        .map(|d| d.id.clone())
        .collect();
    for id in ready {
        let Some(disk) = machine.remove_pci_disk(&id) else {
            continue;
        };
        vmm.block.detach_device(&disk.backend);
        if let Err(e) = vmm.block.delete_backend(&id) {
            log::warn!("device_del {id}: releasing its block backend: {e}");
        }
        let path = format!("/machine/peripheral/{id}");
        vmm.events
            .push(event::DeviceDeleted::message(&event::DeviceDeletedData {
                device: None,
                path: format!("{path}/virtio-backend"),
            }));
        vmm.events
            .push(event::DeviceDeleted::message(&event::DeviceDeletedData {
                device: Some(id.clone()),
                path,
            }));
        log::info!("device_del: {id} removed from PCI slot {}", disk.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn device_add_properties_are_set_aside_for_the_handler() {
        let args = json!({"driver": "virtio-blk-pci", "id": "vd1", "drive": "d", "addr": 40});
        let a = DeviceAddArgs::from_qmp(args.clone(), &mut Decoder::strict()).unwrap();
        assert_eq!(a.declared.driver, "virtio-blk-pci");
        assert_eq!(a.declared.id.as_deref(), Some("vd1"));
        assert_eq!(
            Value::Object(a.properties.clone()),
            json!({"drive": "d", "addr": 40})
        );
        assert_eq!(a.to_qmp(), args);
        let props = a.properties;
        assert_eq!(property_text("addr", &props["addr"]).unwrap(), "5");
        assert_eq!(property_text("ioeventfd", &json!(false)).unwrap(), "off");
        assert_eq!(property_text("num-queues", &json!(2)).unwrap(), "2");
        assert!(property_text("addr", &json!(41)).is_err(), "function 1");
        assert!(property_text("drive", &json!("a,b")).is_err());
        assert!(property_text("drive", &json!({"x": 1})).is_err());
    }

    #[test]
    fn device_add_declared_members_stay_strict() {
        let e = DeviceAddArgs::from_qmp(json!({"id": "vd1"}), &mut Decoder::strict()).unwrap_err();
        assert!(e.to_string().contains("driver"), "{e}");
        let e = DeviceAddArgs::from_qmp(json!({"driver": 1}), &mut Decoder::strict()).unwrap_err();
        assert!(e.to_string().contains("driver"), "{e}");
    }
}
