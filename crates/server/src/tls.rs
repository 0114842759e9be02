//! The server's TLS (`[server.tls]`): its certificate chain, key and client CA, which a reload
//! replaces while serving.
//!
//! Why not tonic's own TLS: it reads the certificate once, at start. A certificate renewed on
//! disk (cert-manager rewrites a Kubernetes Secret's files weeks before the old one expires)
//! would then be served only after a restart, and a renewal nobody followed up would end every
//! TLS call on the day the old one expired. Here each new connection's handshake uses the
//! configuration in force at that moment; connections already open keep theirs.
//!
//! What is built is what tonic builds: rustls with its default provider, client certificates
//! verified against `client_ca` when set (then required), ALPN `h2`. The connections that come
//! out are `tokio_rustls` streams, whose client certificates tonic puts in each request
//! (`Request::peer_certs`) as with its own TLS.

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The TLS a server accepts connections with, replaceable while it serves.
pub struct ServerTls {
    config: RwLock<Arc<rustls::ServerConfig>>,
    /// How long a handshake may take (`server.handshake_timeout_s`).
    handshake: Duration,
}

impl ServerTls {
    /// Reads `tls`'s files; an error names the file that does not load.
    pub fn new(tls: &TlsConfig, handshake: Duration) -> Result<ServerTls> {
        Ok(ServerTls { config: RwLock::new(Arc::new(server_config(tls)?)), handshake })
    }

    /// Reads `tls`'s files into what [`ServerTls::install`] serves; an error (a file missing
    /// mid-rotation, a key that does not go with the certificate) names the file.
    pub fn load(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>> {
        Ok(Arc::new(server_config(tls)?))
    }

    /// Serves `config` from the next handshake on; open connections keep theirs.
    pub fn install(&self, config: Arc<rustls::ServerConfig>) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// The TLS handshake of a new connection, with the configuration in force now, in at most
    /// the handshake timeout.
    pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(&self, io: IO) -> io::Result<TlsStream<IO>> {
        let acceptor = TlsAcceptor::from(self.config.read().unwrap_or_else(|p| p.into_inner()).clone());
        match tokio::time::timeout(self.handshake, acceptor.accept(io)).await {
            Ok(done) => done,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
        }
    }
}

/// The rustls configuration of `tls`: its chain and key, and with `client_ca` the client
/// certificates it requires.
fn server_config(tls: &TlsConfig) -> Result<rustls::ServerConfig> {
    let chain = certificates(&tls.cert, "server.tls.cert")?;
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key, "server.tls.key")?)
        .map_err(|e| anyhow::anyhow!("server.tls.key: no private key in {} ({e})", tls.key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certificates(ca, "server.tls.client_ca")?);
            anyhow::ensure!(added > 0, "server.tls.client_ca: no CA certificate in {} that rustls takes", ca.display());
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .with_context(|| format!("server.tls.client_ca: {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .with_context(|| format!("server.tls: the key {} does not go with the certificate {}", tls.key.display(), tls.cert.display()))?;
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(config)
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))
}

/// The certificates of a PEM file, at least one.
fn certificates(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, key)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{key}: {} is not PEM certificates ({e})", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{key}: no certificate in {}", path.display());
    Ok(certs)
}
