//! A TCP fault proxy between breakwater and a backend, built on `noxious` (a Rust
//! port of Toxiproxy): `slow` adds latency to every answer, `blackhole` stops all
//! data (connections hang), `reset` closes every connection as soon as data flows
//! (noxious has no reset_peer toxic; limit_data with 0 bytes is the nearest).
//!
//! Faults are lifted by removing each toxic by name: noxious 1.0's `RemoveAllToxics`
//! clears only the upstream list, so a downstream toxic (the blackhole's answer side,
//! the slow fault's latency) would stay forever.

use std::net::SocketAddr;

use noxious::proxy::{ProxyConfig, ProxyRunner, Runner, Toxics};
use noxious::signal::{Close, Stop, Stopper};
use noxious::socket::TcpListener;
use noxious::toxic::{StreamDirection, Toxic, ToxicEvent, ToxicEventKind, ToxicEventResult, ToxicKind};

pub struct FaultProxy {
    runtime: tokio::runtime::Runtime,
    sender: bmrng::RequestSender<ToxicEvent, ToxicEventResult>,
    name: String,
    pub listen: SocketAddr,
    /// Names of the toxics in place, so `clear` can remove each one.
    applied: std::sync::Mutex<Vec<String>>,
    _stopper: Stopper,
    _close: Close,
}

/// Which fault the proxy applies.
#[derive(Debug, Clone, Copy)]
pub enum ProxyFault {
    Slow,
    Blackhole,
    Reset,
}

impl FaultProxy {
    pub fn start(name: &str, upstream: SocketAddr) -> Result<FaultProxy, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let listen: SocketAddr = ([127, 0, 0, 1], breakwater_test_backends::free_port()).into();
        let config = ProxyConfig {
            name: name.to_string(),
            listen: listen.to_string(),
            upstream: upstream.to_string(),
            enabled: true,
            rand_seed: None,
        };
        let (stop, stopper) = Stop::new();
        let (close, closer) = Close::new();
        let (sender, receiver) = bmrng::channel(16);
        runtime.block_on(async {
            let (listener, info) = ProxyRunner::initialize_proxy::<TcpListener>(config, Toxics::empty())
                .await
                .map_err(|e| format!("proxy: {e}"))?;
            tokio::spawn(async move {
                let _ = ProxyRunner::run_proxy(listener, info, receiver, stop, closer).await;
            });
            Ok::<(), String>(())
        })?;
        Ok(FaultProxy {
            runtime,
            sender,
            name: name.to_string(),
            listen,
            applied: std::sync::Mutex::new(Vec::new()),
            _stopper: stopper,
            _close: close,
        })
    }

    /// Sends one toxic change and waits until every live connection carries it.
    /// A refused change is a broken scenario, not a fault to inject: it panics.
    fn send(&self, kind: ToxicEventKind) {
        let described = format!("{kind:?}");
        let event = ToxicEvent::new(self.name.clone(), kind);
        match self.runtime.block_on(self.sender.send_receive(event)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("fault proxy {}: {described} refused: {e:?}", self.name),
            Err(e) => panic!("fault proxy {}: {described} not delivered: {e:?}", self.name),
        }
    }

    pub fn apply(&self, fault: ProxyFault) {
        let toxics = match fault {
            ProxyFault::Slow => vec![(
                "slow",
                ToxicKind::Latency {
                    latency: 700,
                    jitter: 100,
                },
                StreamDirection::Downstream,
            )],
            ProxyFault::Blackhole => vec![
                (
                    "blackhole-up",
                    ToxicKind::Timeout { timeout: 1_000 },
                    StreamDirection::Upstream,
                ),
                (
                    "blackhole-down",
                    ToxicKind::Timeout { timeout: 1_000 },
                    StreamDirection::Downstream,
                ),
            ],
            ProxyFault::Reset => vec![("reset", ToxicKind::LimitData { bytes: 0 }, StreamDirection::Upstream)],
        };
        for (name, kind, direction) in toxics {
            self.applied.lock().unwrap().push(name.to_string());
            self.send(ToxicEventKind::AddToxic(Toxic {
                kind,
                name: name.to_string(),
                toxicity: 1.0,
                direction,
            }));
        }
    }

    pub fn clear(&self) {
        let names = std::mem::take(&mut *self.applied.lock().unwrap());
        for name in names {
            self.send(ToxicEventKind::RemoveToxic(name));
        }
    }
}
