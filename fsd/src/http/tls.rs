//! TLS for TCP listeners (`bandsox serve --tls-cert F --tls-key F`): rustls with the
//! `ring` provider, from PEM files.
//!
//! Both processes need it: the daemon terminates TLS on the connections it receives,
//! and the front process on the connections it answers itself while the daemon is away
//! (a 503 must reach a TLS client as TLS). Invariant: configurations are cached per
//! pair of paths and rebuilt when either file changes (a renewed certificate is used by
//! the next connection, no restart).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, Result};

/// Load a server configuration (HTTP/1.1 only).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| {
            Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("{}: {e}", p.display()),
            )
        })
    };
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::invalid(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no certificate in it",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| Error::invalid(format!("{}: no private key in it ({e})", key.display())))?;
    // ring, not aws-lc-rs: aws-lc-rs needs cmake and a C toolchain at build time. ring's
    // provider is deprecated only for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| Error::invalid(format!("TLS certificate/key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

type Key = (PathBuf, PathBuf);
/// The files' modification times when the acceptor was built, and the acceptor.
type Built = (Option<SystemTime>, Option<SystemTime>, TlsAcceptor);

/// Acceptors per (certificate, key), rebuilt when a file changes.
#[derive(Default)]
pub struct Acceptors(Mutex<HashMap<Key, Built>>);

impl Acceptors {
    pub fn get(&self, cert: &Path, key: &Path) -> Result<TlsAcceptor> {
        let stamps = (mtime(cert), mtime(key));
        let k = (cert.to_path_buf(), key.to_path_buf());
        if let Some((c, kk, a)) = self.0.lock().get(&k) {
            if (*c, *kk) == stamps {
                return Ok(a.clone());
            }
        }
        let acceptor = TlsAcceptor::from(server_config(cert, key)?);
        self.0
            .lock()
            .insert(k, (stamps.0, stamps.1, acceptor.clone()));
        Ok(acceptor)
    }
}
