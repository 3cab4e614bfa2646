//! The QMP monitors: a `qmp_proto` server over every `--qmp` address, with
//! requests routed through the generated dispatcher to the VMM's handlers.

use std::io;
use std::net::ToSocketAddrs;
use std::time::Duration;

use mio::event::Event;
use mio::{Registry, Token};
use qapi_types::Dispatcher;
use qmp_proto::server::{CallContext, Handler, QmpServer, ServerConfig};
use qmp_proto::session::SessionConfig;
use qmp_proto::{QmpError, Request};
use serde_json::Value;

use crate::cli::MonitorAddr;
use crate::vm::{self, Vmm};

/// Every QMP monitor of the VMM and the command table they share.
pub struct Monitors {
    server: QmpServer,
    dispatcher: Dispatcher<Vmm>,
}

/// Routes one request to the dispatcher with the VMM as context.
struct Call<'a> {
    dispatcher: &'a Dispatcher<Vmm>,
    vmm: &'a mut Vmm,
}

impl Handler for Call<'_> {
    fn execute(
        &mut self,
        call: &mut CallContext<'_>,
        request: &Request,
    ) -> Result<Value, QmpError> {
        log::debug!("QMP request {} {:?}", request.command, request.arguments);
        // Descriptors that came with the request are there for getfd/add-fd;
        // whatever the command does not take is closed after it.
        self.vmm.fds.incoming = call.take_fds();
        let result = self.dispatcher.dispatch(self.vmm, request);
        self.vmm.fds.incoming.clear();
        if self.vmm.quit {
            call.request_shutdown();
        }
        result
    }
}

impl Monitors {
    /// Opens a listener for every address; the first token of the range they use is `base`.
    pub fn new(addrs: &[MonitorAddr], base: Token, with_guest: bool) -> io::Result<Monitors> {
        let greeting = qapi_types::QapiType::to_qmp(&vm::version_info());
        let mut config = ServerConfig::new(SessionConfig::new(greeting));
        config.first_token = base.0;
        let mut server = QmpServer::new(config);
        for addr in addrs {
            match addr {
                MonitorAddr::Unix(path) => server.add_unix_listener(path)?,
                MonitorAddr::Tcp(host, port) => {
                    let sockaddr = (host.as_str(), *port)
                        .to_socket_addrs()?
                        .next()
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::NotFound,
                                format!("'{host}' has no address"),
                            )
                        })?;
                    server.add_tcp_listener(sockaddr)?;
                }
            }
        }
        let mut dispatcher = Dispatcher::new();
        vm::register(&mut dispatcher, with_guest);
        Ok(Monitors { server, dispatcher })
    }

    /// Registers the listeners with the event loop.
    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        self.server.register(registry)
    }

    /// Whether an event belongs to a monitor.
    pub fn owns(&self, token: Token) -> bool {
        self.server.owns(token)
    }

    /// Handles readiness of a monitor socket, executing whatever requests arrived.
    pub fn handle_event(&mut self, registry: &Registry, event: &Event, vmm: &mut Vmm) {
        let mut call = Call {
            dispatcher: &self.dispatcher,
            vmm,
        };
        self.server.handle_event(registry, event, &mut call);
    }

    /// Sends the events the handlers raised to every negotiated client,
    /// after stopping the VM if a disk asked for it (an I/O error with the
    /// `stop` policy: the main loop calls this after every wake-up).
    pub fn flush_events(&mut self, vmm: &mut Vmm) {
        vmm.handle_io_error_stop();
        for e in vmm.events.drain(..) {
            self.server.broadcast(&e);
        }
    }

    /// Whether a handler asked to stop (after `quit`).
    pub fn shutdown_requested(&self) -> bool {
        self.server.shutdown_requested()
    }

    /// Sends whatever output is pending, waiting at most `timeout`, then
    /// closes every client and removes the Unix socket files.
    pub fn shutdown(&mut self, timeout: Duration) {
        self.server.flush_all(timeout);
        self.server.shutdown();
    }
}
