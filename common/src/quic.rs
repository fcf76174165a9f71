//! quinn endpoints for both sides, built from the TLS configurations in [`crate::tls`].
//!
//! Both sides use the same transport settings: keep-alives every 3 s so NATs and idle timers
//! do not drop a quiet agent, and a 15 s idle timeout after which a silent peer is gone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Why an endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The TLS configuration does not suit QUIC (e.g. no TLS 1.3).
    #[error("TLS configuration is not usable for QUIC")]
    Crypto(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The UDP socket could not be bound.
    #[error("binding UDP {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS reason.
        #[source]
        source: std::io::Error,
    },
}

/// Transport settings shared by both sides.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(3)));
    // 15 s always fits a VarInt.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(15)).ok());
    // Each open stream may hold one frame being read (up to the frame limit), so this bounds
    // what one peer can make us buffer; agents use at most 16 batch streams at once.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(32));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// A server endpoint bound to `addr`.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
) -> Result<quinn::Endpoint, QuicError> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(QuicError::Crypto)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    quinn::Endpoint::server(config, addr).map_err(|source| QuicError::Bind { addr, source })
}

/// A client endpoint on an ephemeral port with `tls` as its default configuration.
pub fn client_endpoint(
    bind: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<quinn::Endpoint, QuicError> {
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|source| QuicError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(client_config(tls)?);
    Ok(endpoint)
}

/// A quinn client configuration from a rustls one.
pub fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, QuicError> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(QuicError::Crypto)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}
